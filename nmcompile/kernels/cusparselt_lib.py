"""ctypes binding to the cuSPARSELt shared library torch already loaded.

Only the functions the cached-plan path (:mod:`.cusparselt_plans`) calls are bound, with the
signatures of ``cusparseLt.h`` as the ``nvidia-cusparselt-cu13`` 0.8.0 wheel ships it
(``nvidia/cusparselt/include/cusparseLt.h``; read there, not vendored) and the enum values of
``cusparseLt.h``, ``cusparse.h`` (``cusparseOrder_t``, ``cusparseOperation_t``) and CUDA's
``library_types.h`` (``cudaDataType``, ``libraryPropertyType``).

The library is the very one torch uses for ``torch._cslt_compress`` (the compressed layout is
private to a cuSPARSELt version): :func:`load` finds the ``libcusparseLt.so*`` mapped into this
process (``/proc/self/maps``) and opens that file, which returns the already loaded copy. It
never loads another one; without a CUDA build of torch it finds nothing and says why.

Pointers cross as Python ints (addresses) and enums and sizes as ints, so a test can hand the
plan code any object with these function names (``tests/cslt_library_fake.py``).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ALG_CONFIG_ID",
    "ALIGNMENT",
    "BIAS_POINTER",
    "COMPUTE_32F",
    "DATA_TYPES",
    "OPAQUE_BYTES",
    "OPERATION_NON_TRANSPOSE",
    "OPERATION_TRANSPOSE",
    "OPTIONAL",
    "ORDER_COL",
    "ORDER_ROW",
    "SIGNATURES",
    "SPARSITY_50_PERCENT",
    "CusparseltError",
    "check",
    "load",
    "loaded_path",
    "version",
]

#: ``cusparseStatus_t``: success
STATUS_SUCCESS = 0
#: ``cusparseOrder_t``
ORDER_COL, ORDER_ROW = 1, 2
#: ``cusparseOperation_t``
OPERATION_NON_TRANSPOSE, OPERATION_TRANSPOSE = 0, 1
#: ``cusparseLtSparsity_t``
SPARSITY_50_PERCENT = 0
#: ``cusparseComputeType`` (cuSPARSELt >= 0.5.2: 16-bit inputs accumulate in fp32)
COMPUTE_32F = 2
#: ``cusparseLtMatmulAlg_t``
ALG_DEFAULT = 0
#: ``cusparseLtMatmulAlgAttribute_t``
ALG_CONFIG_ID = 0
#: ``cusparseLtMatmulDescAttribute_t``
BIAS_POINTER = 8
#: ``cudaDataType`` of the 16-bit types the 2:4 GEMMs take
DATA_TYPES = {torch.float16: 2, torch.bfloat16: 14}
#: ``libraryPropertyType``
MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL = 0, 1, 2
#: bytes of each opaque structure (``cusparseLtHandle_t`` ... ``cusparseLtMatmulPlan_t``),
#: aligned to 16 bytes
OPAQUE_BYTES = 512
#: alignment (bytes) declared for every matrix, as torch declares it
ALIGNMENT = 16

_P = ctypes.c_void_p
_I = ctypes.c_int
#: name -> argument types of every function the plan code calls (all return cusparseStatus_t)
SIGNATURES: dict[str, tuple[Any, ...]] = {
    "cusparseLtInit": (_P,),
    "cusparseLtGetProperty": (_I, _P),
    "cusparseLtDenseDescriptorInit": (_P, _P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_uint32, _I, _I),
    "cusparseLtStructuredDescriptorInit": (_P, _P, ctypes.c_int64, ctypes.c_int64,
                                           ctypes.c_int64, ctypes.c_uint32, _I, _I, _I),
    "cusparseLtMatDescriptorDestroy": (_P,),
    "cusparseLtMatmulDescriptorInit": (_P, _P, _I, _I, _P, _P, _P, _P, _I),
    "cusparseLtMatmulDescSetAttribute": (_P, _P, _I, _P, ctypes.c_size_t),
    "cusparseLtMatmulAlgSelectionInit": (_P, _P, _P, _I),
    "cusparseLtMatmulAlgSetAttribute": (_P, _P, _I, _P, ctypes.c_size_t),
    "cusparseLtMatmulPlanInit": (_P, _P, _P, _P),
    "cusparseLtMatmulGetWorkspace": (_P, _P, _P),
    "cusparseLtMatmulPlanDestroy": (_P,),
    "cusparseLtSpMMACompressedSize2": (_P, _P, _P, _P),
    "cusparseLtMatmul": (_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int32),
}
#: functions used when the library has them (``cusparseLtMatmulAlgSelectionDestroy`` is not in
#: every 0.x release)
OPTIONAL: dict[str, tuple[Any, ...]] = {"cusparseLtMatmulAlgSelectionDestroy": (_P,)}


class CusparseltError(RuntimeError):
    """A cuSPARSELt call returned an error status."""


def check(lib: Any, name: str, status: int) -> None:
    """Raise :class:`CusparseltError` naming ``name`` and the status unless it is success."""
    if status == STATUS_SUCCESS:
        return
    text = ""
    describe = getattr(lib, "cusparseLtGetErrorString", None)
    if describe is not None:
        try:
            found = describe(status)
            text = f" ({found.decode() if isinstance(found, bytes) else found})"
        except Exception:  # noqa: BLE001  (the description is optional)
            text = ""
    raise CusparseltError(f"{name} returned status {status}{text}")


def loaded_path() -> str | None:
    """The file of the cuSPARSELt library mapped into this process, if any (Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and "/libcusparseLt.so" in parts[5]:
            return parts[5].strip()
    return None


def load() -> tuple[Any, str]:
    """The library torch loaded, with every function of :data:`SIGNATURES` typed, and the file
    it came from. Raises ``OSError`` naming what is missing (no CUDA build of torch, no
    cuSPARSELt mapped, a function absent)."""
    if not torch.backends.cusparselt.is_available():
        raise OSError("this torch build has no cuSPARSELt")
    path = loaded_path()
    if path is None:
        raise OSError("torch has not loaded a libcusparseLt.so into this process")
    lib = ctypes.CDLL(path)
    for name, argtypes in {**SIGNATURES, **OPTIONAL}.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            if name in OPTIONAL:
                continue
            raise OSError(f"{path} has no {name}") from None
        fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    describe = getattr(lib, "cusparseLtGetErrorString", None)
    if describe is not None:
        describe.argtypes, describe.restype = [ctypes.c_int], ctypes.c_char_p
    return lib, path


def version(lib: Any) -> str:
    """``"major.minor.patch"`` of a loaded library (``cusparseLtGetProperty``)."""
    parts = []
    for prop in (MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL):
        value = ctypes.c_int(0)
        check(lib, "cusparseLtGetProperty", lib.cusparseLtGetProperty(prop,
                                                                        ctypes.addressof(value)))
        parts.append(str(value.value))
    return ".".join(parts)
