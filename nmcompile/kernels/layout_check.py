"""Never wrong numbers from a guessed layout: before nmcompile writes compressed weights itself on a
device, it checks there that what it writes is what cuSPARSELt reads.

The compressed layout is NVIDIA's private format (:mod:`.layout`). So once per (device name,
torch and cuSPARSELt versions: :func:`.cost.device_key`; compressed dtype), on random matrices
of each shape class, the writer that would serve the device (the Triton kernels of
:mod:`.sparsify`, or on CPU tensors under ``NMCOMPILE_CSLT_ON_CPU=1`` the pure-torch encoder
when Triton's interpreter is not on) must

* give the mask :func:`nmcompile.solvers.transposable_masks_scored` gives (Triton, on the
  device itself: it is its own scorer);
* write blobs equal to ``torch._cslt_compress``'s bit for bit where every group holds two
  non-zeros (matrices drawn with an exact two-per-row-and-column pattern in every tile), both
  ``compress(W*M)`` and ``compress((W*M)^T)``, from its own mask and from a mask it is given;
* give, through ``torch._cslt_sparse_mm``, the dense product of ``W*M`` (within the
  cost rule's error bound) where groups hold fewer non-zeros (random normal weights).

A failure keeps ``torch._cslt_compress`` for that device and dtype, with the reason in the
dump and one ``RuntimeWarning``. Verdicts are cached in memory and beside the cost rule's cache
(``sparsify_check.json`` in nmcompile's cache folder), keyed the same way.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import warnings
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import cost, cusparselt, layout

__all__ = ["CACHE_NAME", "Verdict", "clear", "verdict"]

log = logging.getLogger(__name__)
FORMAT = 1
#: The verdicts' file, in the cost rule's cache folder.
CACHE_NAME = "sparsify_check.json"
#: Shapes checked per layout (rows, columns): square, tall and wide, several blocks each way.
SHAPES = {"sm90": ((64, 64), (192, 64), (64, 128)), "sm80": ((128, 128), (256, 128), (128, 256))}


@dataclass(frozen=True)
class Verdict:
    """Who writes compressed weights of one dtype on one device: ``writer`` is ``"triton"``
    (:mod:`.sparsify`), ``"encoder"`` (:func:`.layout.encode`, CPU tensors in tests) or
    ``None`` (``torch._cslt_compress``, with ``reason``); ``arch`` names the layout."""

    writer: str | None
    arch: str | None
    reason: str | None = None


_MEMORY: dict[tuple[str, str, str | None], Verdict] = {}
_WARNED: set[tuple[str, str, str | None]] = set()


def clear() -> None:
    """Forget the in-memory verdicts (tests that swap the library model)."""
    _MEMORY.clear()
    _WARNED.clear()


def _candidate(device: torch.device) -> Verdict:
    """The writer and layout that would serve ``device``, before any check."""
    if device.type == "cpu":  # a model of the library, in tests (cusparselt.ENV_ON_CPU)
        if os.environ.get(cusparselt.ENV_ON_CPU) != "triton":
            return Verdict("encoder", "sm90")
        if os.environ.get("TRITON_INTERPRET") != "1":
            return Verdict(None, "sm90", f"{cusparselt.ENV_ON_CPU}=triton needs "
                                         "TRITON_INTERPRET=1 (Triton's interpreter)")
        reason = _triton_reason()
        return Verdict(None if reason else "triton", "sm90", reason)
    if device.type != "cuda":
        return Verdict(None, None, f"no layout for {device.type}")
    arch = layout.arch_of(torch.cuda.get_device_capability(device))
    if arch is None:
        return Verdict(None, None, f"no compressed layout known for compute capability "
                                   f"{torch.cuda.get_device_capability(device)}")
    reason = _triton_reason()
    return Verdict(None if reason else "triton", arch, reason)


def _triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None


def verdict(device: torch.device | str, dtype: torch.dtype) -> Verdict:
    """The checked :class:`Verdict` for compressed ``dtype`` operands on ``device`` (checked now
    if neither memory nor disk has one). Never raises: a failure is a verdict."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    found = _candidate(device)
    key = (cost.device_key(device), str(dtype).removeprefix("torch."), found.writer)
    if key in _MEMORY:
        return _MEMORY[key]
    if found.writer is not None:
        name = f"{key[1]}/{found.writer}/{found.arch}"
        stored = _load().get(key[0], {}).get(name)
        if isinstance(stored, dict) and set(stored) == {"writer", "arch", "reason"}:
            found = Verdict(**stored)
        else:
            found = _checked(device, dtype, found)
            _save(key[0], name, found)
    _MEMORY[key] = found
    if found.writer is None and found.arch is not None and key not in _WARNED:
        _WARNED.add(key)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        warnings.warn(f"nmcompile: {key[1]} weights on {name} are compressed by "
                      f"torch._cslt_compress (slower): {found.reason}", RuntimeWarning,
                      stacklevel=3)
    return found


def _checked(device: torch.device, dtype: torch.dtype, found: Verdict) -> Verdict:
    try:
        with (_disable_current_modes(), torch.no_grad(),
              torch.autocast(device.type, enabled=False)):  # inside the user's autocast region
            problem = _problem(device, dtype, found)
    except Exception as error:  # noqa: BLE001  (any failure means: keep _cslt_compress)
        problem = f"{type(error).__name__}: {error}"
    log.info("nm layout check on %s (%s, %s, %s): %s", device, dtype, found.writer,
             found.arch, problem or "passed")
    if problem is None:
        return found
    return Verdict(None, found.arch, f"the {found.arch} layout failed its self-check against "
                                     f"torch._cslt_compress: {problem}")


def _exact_two(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A random 0/1 mask with exactly two per row and column of every 4 x 4 tile."""
    from ..solvers.patterns import tile_patterns

    table = torch.as_tensor(tile_patterns(2, 4, exact_n=True))
    pick = torch.randint(len(table), (rows // 4 * (cols // 4),), generator=gen)
    tiles = table[pick].reshape(rows // 4, cols // 4, 4, 4)
    return tiles.permute(0, 2, 1, 3).reshape(rows, cols)


def _problem(device: torch.device, dtype: torch.dtype, found: Verdict) -> str | None:
    """What is wrong with ``found.writer`` on ``device`` (``None``: nothing)."""
    from ..ops.emulation import masked_weight
    from ..refresh import write_packs

    gen = torch.Generator().manual_seed(0)
    for rows, cols in SHAPES[found.arch]:
        values = torch.randn(rows, cols, generator=gen).abs_().add_(0.5)
        signs = torch.randint(2, (rows, cols), generator=gen) * 2 - 1
        exact = (values * signs * _exact_two(rows, cols, gen)).to(dtype).to(device)
        normal = torch.randn(rows, cols, generator=gen).to(dtype).to(device)
        for w, full in ((exact, True), (normal, False)):
            mask, blob, blob_t = write_packs(found.writer, found.arch, w, dtype, score=True)
            if found.writer == "triton":
                from ..solvers import transposable_masks_scored

                if not torch.equal(mask, transposable_masks_scored([w])[0]):
                    return f"its {rows}x{cols} mask differs from the scorer's"
            masked = masked_weight(w, mask)
            for got, operand, side in ((blob, masked, ""), (blob_t, masked.t(), "transposed ")):
                expected = cusparselt.compress(operand)
                if full and not torch.equal(got.view(torch.int16), expected.view(torch.int16)):
                    return f"the {side}{rows}x{cols} blob differs from torch._cslt_compress's"
                if not full:
                    reason = _product_reason(got, operand, dtype)
                    if reason:
                        return f"{side}{rows}x{cols}: {reason}"
            if full:
                again = write_packs(found.writer, found.arch, w, dtype, score=False, mask=mask)
                if not all(torch.equal(a.view(torch.int16), b.view(torch.int16))
                           for a, b in zip(again[1:], (blob, blob_t), strict=True)):
                    return f"the {rows}x{cols} blobs from a given mask differ from its own"
    return None


def _product_reason(blob: torch.Tensor, operand: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why ``_cslt_sparse_mm(blob, X)`` is not the dense product ``operand @ X``."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(operand.shape[1], 64, generator=gen).to(dtype).to(operand.device)
    ref = operand.double() @ x.double()
    got = torch._cslt_sparse_mm(blob, x)
    dense = (operand.float() @ x.float()).to(dtype)
    err = (torch.linalg.vector_norm(got.double() - ref) / torch.linalg.vector_norm(ref)).item()
    dense_err = (torch.linalg.vector_norm(dense.double() - ref)
                 / torch.linalg.vector_norm(ref)).item()
    bound = cost.ERROR_FACTOR * max(dense_err, torch.finfo(dtype).eps / 4)
    if not err <= bound:
        return f"product error {err:.3g} through torch._cslt_sparse_mm (dense {dense_err:.3g})"
    return None


def _file():
    return cost._cache_file().with_name(CACHE_NAME)


def _load() -> dict:
    path = _file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return {}
    devices = data.get("devices")
    return devices if isinstance(devices, dict) else {}


def _save(key: str, name: str, found: Verdict) -> None:
    devices = _load()
    devices.setdefault(key, {})[name] = asdict(found)
    path = _file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps({"format": FORMAT, "devices": devices}, indent=1,
                                  sort_keys=True))
        os.replace(tmp, path)
    except OSError as error:
        log.warning("nm layout check: cannot write %s (%s)", path, error)
