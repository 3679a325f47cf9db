"""The plan cache of the cached-plan path (:mod:`.cusparselt_plans`): cuSPARSELt's descriptors,
algorithm selection and plan for one :class:`PlanKey`, built once and reused.

A :class:`PlanCache` belongs to one thread and one device and holds its own library handle
(cuSPARSELt, like cuSPARSE, wants a handle per thread; torch keeps its own per thread too).
Every object lives in a 512-byte buffer at a fixed, 16-byte aligned host address for the life
of its plan: the library's objects point at each other (the plan at the matmul descriptor, that
at the matrix descriptors), so they are initialised where they stay. The calls mirror torch's
``_cslt_sparse_mm_impl`` (``aten/src/ATen/native/sparse/cuda/cuSPARSELtOps.cpp``): a
structured row-major ``A [m, k]``; ``B`` row-major ``[k, n]``, or ``[n, k]`` read transposed;
the result ``D`` (also ``C``, with beta 0) ``[m, n]`` row-major, or column-major when the result
is transposed; fp32 compute; alpha 1 and beta 0 as host floats. Past ``max_plans`` the least
recently used plan is destroyed.
"""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import cusparselt_lib as lt

__all__ = ["MAX_PLANS", "Plan", "PlanCache", "PlanKey", "key_of", "operand_pointers"]

log = logging.getLogger(__name__)
#: Plans one (thread, device) cache keeps before it evicts the least recently used
MAX_PLANS = 1024
_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16"}


class PlanKey(NamedTuple):
    """What a plan depends on: ``A [m, k]`` (compressed) times ``B [k, n]`` in ``dtype``, ``B``
    stored transposed (``B^T`` contiguous) or not, the result transposed (``[n, m]``) or not,
    with a bias (length ``m``) or not, with cuSPARSELt algorithm ``alg_id``."""

    m: int
    k: int
    n: int
    dtype: torch.dtype
    b_transposed: bool
    transpose_result: bool
    bias: bool
    alg_id: int

    def label(self) -> str:
        """``"4096x1024x16384 bf16, B transposed, result transposed, bias, alg 0"``."""
        parts = [f"{self.m}x{self.k}x{self.n} {_SHORT.get(self.dtype, self.dtype)}"]
        parts += [text for flag, text in ((self.b_transposed, "B transposed"),
                                          (self.transpose_result, "result transposed"),
                                          (self.bias, "bias")) if flag]
        return ", ".join([*parts, f"alg {self.alg_id}"])


def key_of(a: Tensor, b: Tensor, bias: Tensor | None, transpose_result: bool,
           alg_id: int) -> PlanKey:
    """The key of ``_cslt_sparse_mm(a, b, bias, transpose_result=..., alg_id=...)`` (``b``
    contiguous or the transpose of a contiguous matrix, as torch reads it)."""
    return PlanKey(a.shape[0], b.shape[0], b.shape[1], a.dtype, not b.is_contiguous(),
                   transpose_result, bias is not None, alg_id)


def operand_pointers(key: PlanKey, a: Tensor, b: Tensor,
                      bias: Tensor | None) -> tuple[int, int, int | None]:
    """The data pointers of ``a``, ``b`` and ``bias``; raises ``ValueError`` for what the
    library would misread: a strided or misaligned operand, another dtype or length."""
    tight = (b.stride(0) == 1 and b.stride(1) == key.k) or b.t().is_contiguous() \
        if key.b_transposed else True  # not transposed: contiguous (the key says so)
    if not tight or not a.is_contiguous():
        raise ValueError(f"cuSPARSELt plans: operands {tuple(a.shape)} {a.stride()} and "
                         f"{tuple(b.shape)} {b.stride()} are not laid out as the library reads "
                         "them")
    if b.dtype != a.dtype or key.dtype not in lt.DATA_TYPES:
        raise ValueError(f"cuSPARSELt plans: dtypes {a.dtype} and {b.dtype}")
    if bias is None:
        ptrs = a.data_ptr(), b.data_ptr(), None
    else:
        if bias.dim() != 1 or bias.shape[0] != key.m or bias.dtype != a.dtype or (
                bias.stride(0) != 1):
            raise ValueError(f"cuSPARSELt plans: bias {bias.dtype} {tuple(bias.shape)} for "
                             f"m={key.m}")
        ptrs = a.data_ptr(), b.data_ptr(), bias.data_ptr()
    if (ptrs[0] | ptrs[1] | (ptrs[2] or 0)) % lt.ALIGNMENT:
        raise ValueError(f"cuSPARSELt plans: an operand is not {lt.ALIGNMENT}-byte aligned "
                         f"({', '.join(hex(p) for p in ptrs if p is not None)})")
    return ptrs


def _opaque(keep: list) -> int:
    """The address of a fresh zeroed 512-byte opaque structure aligned to 16 bytes (its buffer
    appended to ``keep``, which must outlive it: cuSPARSELt objects point at each other)."""
    buf = (ctypes.c_uint8 * (lt.OPAQUE_BYTES + lt.ALIGNMENT))()
    keep.append(buf)
    address = ctypes.addressof(buf)
    return address + (-address % lt.ALIGNMENT)


class Plan(NamedTuple):
    """The cuSPARSELt objects of one key (host addresses), the workspace bytes its calls need
    and the bytes of the compressed operand it reads."""

    key: PlanKey
    a: int
    b: int
    d: int
    matmul: int
    alg: int
    plan: int
    workspace: int
    compressed_bytes: int
    buffers: list


class PlanCache:
    """The plans of one thread on one device, on its own library handle; LRU past
    ``max_plans``. ``hits``, ``misses`` and ``evictions`` count lookups."""

    def __init__(self, lib: Any, max_plans: int = MAX_PLANS) -> None:
        self.lib, self.max_plans = lib, max_plans
        self._keep: list = []
        self.handle = _opaque(self._keep)
        lt.check(lib, "cusparseLtInit", lib.cusparseLtInit(self.handle))
        self.plans: OrderedDict[PlanKey, Plan] = OrderedDict()
        self.hits = self.misses = self.evictions = 0
        self._bias = ctypes.c_void_p()
        self._stream = ctypes.c_void_p()
        self._alpha, self._beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self._addr = {name: ctypes.addressof(getattr(self, name))
                      for name in ("_bias", "_stream", "_alpha", "_beta")}
        self._matmul_fn = lib.cusparseLtMatmul  # the per-call functions, looked up once
        self._set_attribute_fn = lib.cusparseLtMatmulDescSetAttribute

    def plan(self, key: PlanKey, bias_ptr: int | None) -> Plan:
        """The plan of ``key``, built at the first lookup (``bias_ptr``: the call's bias)."""
        found = self.plans.get(key)
        if found is not None:
            self.hits += 1
            self.plans.move_to_end(key)
            return found
        self.misses += 1
        while len(self.plans) >= self.max_plans:
            self._destroy(self.plans.popitem(last=False)[1])
            self.evictions += 1
        self.plans[key] = found = self._build(key, bias_ptr)
        return found

    def _call(self, name: str, *args: Any) -> None:
        lt.check(self.lib, name, getattr(self.lib, name)(*args))

    def _build(self, key: PlanKey, bias_ptr: int | None) -> Plan:
        m, k, n, dtype, bt, tr, has_bias, alg_id = key
        keep: list = []
        a, b, d, mm, alg, plan = (_opaque(keep) for _ in range(6))
        made: list[tuple[str, int]] = []  # what to destroy if a later step fails
        dt, h = lt.DATA_TYPES[dtype], self.handle
        try:
            self._call("cusparseLtStructuredDescriptorInit", h, a, m, k, k, lt.ALIGNMENT, dt,
                       lt.ORDER_ROW, lt.SPARSITY_50_PERCENT)
            made.append(("cusparseLtMatDescriptorDestroy", a))
            rows, cols = (n, k) if bt else (k, n)
            self._call("cusparseLtDenseDescriptorInit", h, b, rows, cols, cols, lt.ALIGNMENT, dt,
                       lt.ORDER_ROW)
            made.append(("cusparseLtMatDescriptorDestroy", b))
            self._call("cusparseLtDenseDescriptorInit", h, d, m, n, m if tr else n,
                       lt.ALIGNMENT, dt, lt.ORDER_COL if tr else lt.ORDER_ROW)
            made.append(("cusparseLtMatDescriptorDestroy", d))
            self._call("cusparseLtMatmulDescriptorInit", h, mm, lt.OPERATION_NON_TRANSPOSE,
                       lt.OPERATION_TRANSPOSE if bt else lt.OPERATION_NON_TRANSPOSE, a, b, d, d,
                       lt.COMPUTE_32F)
            if has_bias:
                self._set_bias(mm, bias_ptr)
            self._call("cusparseLtMatmulAlgSelectionInit", h, alg, mm, lt.ALG_DEFAULT)
            if hasattr(self.lib, "cusparseLtMatmulAlgSelectionDestroy"):
                made.append(("cusparseLtMatmulAlgSelectionDestroy", alg))
            value = ctypes.c_int(alg_id)
            self._call("cusparseLtMatmulAlgSetAttribute", h, alg, lt.ALG_CONFIG_ID,
                       ctypes.addressof(value), ctypes.sizeof(value))
            self._call("cusparseLtMatmulPlanInit", h, plan, mm, alg)
            made.append(("cusparseLtMatmulPlanDestroy", plan))
            sizes = (ctypes.c_size_t * 3)()
            self._call("cusparseLtMatmulGetWorkspace", h, plan, ctypes.addressof(sizes))
            self._call("cusparseLtSpMMACompressedSize2", h, a, ctypes.addressof(sizes) + 8,
                       ctypes.addressof(sizes) + 16)
        except Exception:
            self._undo(made)
            raise
        return Plan(key, a, b, d, mm, alg, plan, sizes[0], sizes[1], keep)

    def _set_bias(self, matmul: int, bias_ptr: int | None) -> None:
        self._bias.value = bias_ptr
        status = self._set_attribute_fn(self.handle, matmul, lt.BIAS_POINTER,
                                        self._addr["_bias"], 8)
        if status:
            lt.check(self.lib, "cusparseLtMatmulDescSetAttribute", status)

    def _undo(self, made: list[tuple[str, int]]) -> None:
        for name, address in reversed(made):
            try:
                self._call(name, address)
            except lt.CusparseltError as error:
                log.warning("nm cuSPARSELt plans: %s", error)

    def _destroy(self, plan: Plan) -> None:
        made = [("cusparseLtMatDescriptorDestroy", x) for x in (plan.a, plan.b, plan.d)]
        if hasattr(self.lib, "cusparseLtMatmulAlgSelectionDestroy"):
            made.append(("cusparseLtMatmulAlgSelectionDestroy", plan.alg))
        self._undo([*made, ("cusparseLtMatmulPlanDestroy", plan.plan)])

    def run(self, plan: Plan, a: int, b: int, bias: int | None, out: int,
            workspace: int | None, stream: int) -> None:
        """``out = a @ b (+ bias)`` with ``plan``, enqueued on ``stream`` (device addresses)."""
        if plan.key.bias:
            self._set_bias(plan.matmul, bias)
        self._stream.value = stream
        addr = self._addr
        status = self._matmul_fn(self.handle, plan.plan, addr["_alpha"], a, b, addr["_beta"],
                                 out, out, workspace, addr["_stream"], 1)
        if status:
            lt.check(self.lib, "cusparseLtMatmul", status)

    def clear(self) -> None:
        """Destroy every plan (the handle stays)."""
        while self.plans:
            self._destroy(self.plans.popitem()[1])
