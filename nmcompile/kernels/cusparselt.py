"""Semi-structured (2:4) sparse GEMMs on NVIDIA sparse tensor cores through cuSPARSELt.

The library is reached only as ``torch._cslt_compress`` and ``torch._cslt_sparse_mm``, looked up
on ``torch`` at every call, so tests can put a model of the library in their place. What the
two functions accept (torch 2.11–2.13 sources, ``aten/src/ATen/native/sparse/cuda/
cuSPARSELtOps.cpp``, and ``torch/sparse/semi_structured.py``):

* ``_cslt_compress(A)``: ``A`` 2-D, bf16 or fp16 (fp32 is compressed 1:2, not 2:4, so it is
  never used here), at most 2 non-zeros in every aligned group of 4 along the LAST dim, which
  becomes the reduction dim ``k``. Both dims >= 16 and multiples of 16. No stride check: a
  non-contiguous input is read as if contiguous, so :func:`compress` always passes a contiguous
  tensor. The result is an opaque blob (never reshaped or sliced here).
* ``_cslt_sparse_mm(A_c, B, bias, transpose_result=...)`` = ``A @ B``: ``B`` is ``[k, n]``,
  contiguous or exactly the transpose of a contiguous matrix (any other view is misread), both
  dims multiples of 8; ``bias`` has one entry per row of ``A`` (``m``); with
  ``transpose_result=True`` the result is a fresh contiguous ``(A @ B)^T`` of shape ``[n, m]``,
  so the bias lands on its last dim. bf16 in, bf16 out, fp32 accumulation. ``alpha`` is never
  passed (a one-element alpha is read with ``.item()``, a host sync). ``alg_id`` is 0 unless
  the cost rule validated another one for that shape on that device (non-zero ids gave wrong
  results on some shapes elsewhere, pytorch/pytorch#155333).

The three GEMMs of a linear layer ``Y = X W^T + b`` (``W`` is ``[out, in]``) map onto it as:

==============  ======================================  ==========================================
GEMM            call                                    compressed (sparse, LEFT) operand
==============  ======================================  ==========================================
forward         ``sparse_mm(c(W*M), X^T, b, T=True)``   ``W*M`` ``[out, in]``, 2:4 along in
grad-input      ``sparse_mm(c((W*M)^T), dY^T, T=True)`` ``(W*M)^T`` ``[in, out]``, 2:4 along out
grad-weight     ``sparse_mm(c(dY^T pruned), X)``        ``dY^T`` ``[out, tokens]``, 2:4 along tokens
==============  ======================================  ==========================================

``X^T`` and ``dY^T`` are transposed views of the contiguous activations (no copy). Token counts
that are not multiples of 8 are padded with zero rows (exact: the padded outputs are dropped).

Checked on an NVIDIA H200 with torch 2.11.0+cu130 and cuSPARSELt 0.8.0 (2026-11-29,
``benchmarks/results/h200-2026-11-29-*``): the op schemas are torch 2.13's
(``_cslt_sparse_mm(compressed_A, dense_B, bias, alpha, out_dtype, transpose_result, alg_id,
split_k, split_k_mode)``); the blob is 2-D, exactly ``(m, 9k/16)`` elements in the input dtype
for every shape tried (768 x 768 to 32768 x 8192, bf16 and fp16); the runtime library is the
``nvidia-cusparselt-cu13`` 0.8.0 package and ``torch.backends.cusparselt.get_max_alg_id()``
returns ``None``. Every op above matched fp64 there (``tests/cuda``). Algorithm 0 was slower
than cuBLAS at every FFN shape; the algorithm ``torch._cslt_sparse_mm_search`` picked (17 for
every shape) was 1.22-1.56x faster with the same error, which is why the cost rule searches
(:mod:`.cost`). An eager ``_cslt_sparse_mm`` call costs about 0.4 ms of host time (the
library's descriptors and plan are rebuilt at each call); CUDA graphs remove it.

**Which torch releases cache cuSPARSELt plans themselves** (pytorch/pytorch PR #179642, April
2026: a per-thread plan cache inside ``_cslt_sparse_mm``, logging ``[cuSPARSELt CACHE MISS]`` /
``[cuSPARSELt CACHE HIT]``): **none, through torch 2.14.1**. Checked on 2026-12-03 in the Linux
x86-64 CUDA 13.0 wheels on PyPI (cp312, ``manylinux_2_28``) of torch 2.11.0, 2.12.0, 2.12.1,
2.13.0, 2.14.0 and 2.14.1 (2.15.0 could not be fetched from here): ``torch/lib/
libtorch_cuda.so`` of each holds neither log string, but holds torch's own cuSPARSELt messages
(the control); and in case the strings were dropped before landing, its machine code calls
``cusparseLtMatmulPlanInit``, ``cusparseLtMatmulPlanDestroy``, ``cusparseLtMatmul`` and
``cusparseLtMatmulSearch`` from one call site each and ``cusparseLtMatDescriptorDestroy`` from
three: one function that builds, runs and destroys a plan at every call, as before the PR (whose
code adds a second ``PlanInit`` site and destroys four cached descriptors on eviction).
``scripts/torch_plan_cache.py WHEEL...`` repeats the check. The wheels pin
``nvidia-cusparselt-cu13`` 0.8.0 (torch 2.11.0) and 0.8.1 (2.12.0 on). So every torch version
gets nmcompile's own plan cache: the calls below go through :mod:`.cusparselt_plans` (the same
library, descriptors and plan built once per shape and reused; about 0.4 ms less host time per
call) wherever it serves, else through ``torch._cslt_sparse_mm``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import cusparselt_plans
from .cusparselt_plans import PlanKey

__all__ = [
    "DENSE_ALIGN",
    "ENV_ON_CPU",
    "SPARSE_ALIGN",
    "SPARSE_DTYPES",
    "compress",
    "dense_operand",
    "device_reason",
    "implies_2_4",
    "linear_forward",
    "linear_grad_input",
    "plan_keys",
    "plans_note",
    "runtime_version",
    "sparse_mm",
    "sparse_mm_packed",
    "sparse_mm_reason",
    "sparse_operand_reason",
]

#: Element types with 2:4 sparse tensor-core GEMMs in cuSPARSELt (fp32 is 1:2).
SPARSE_DTYPES = (torch.bfloat16, torch.float16)
#: Sparse operand: both dims multiples of (and at least) this many elements (16-bit types).
SPARSE_ALIGN = 16
#: Dense operand: both dims multiples of this many elements (16 bytes of a 16-bit type).
DENSE_ALIGN = 8
#: Every operand starts on a boundary of this many bytes (the alignment the library is told).
ALIGN_BYTES = 16
#: For tests only: ``1`` lets CPU tensors take the sparse-kernel path, through whatever
#: ``torch._cslt_compress`` / ``torch._cslt_sparse_mm`` are at that moment (a model of them),
#: with weights compressed in the sm90 layout by nmcompile's pure-torch encoder
#: (:mod:`.layout`); ``triton``: the same, compressed by the Triton sparsify kernels, which
#: then need Triton's interpreter (``TRITON_INTERPRET=1`` before they are first imported).
ENV_ON_CPU = "NMCOMPILE_CSLT_ON_CPU"
#: The values of :data:`ENV_ON_CPU` that turn the CPU path on.
ON_CPU_VALUES = ("1", "triton")
#: Oldest compute capability with sparse tensor cores (A100).
MIN_CAPABILITY = (8, 0)


def implies_2_4(n: int, m: int) -> bool:
    """Whether every ``n:m`` pattern has at most 2 non-zeros in each aligned group of 4."""
    if m % 4 == 0:
        return n <= 2
    return 4 % m == 0 and n * (4 // m) <= 2


def device_reason(device: torch.device | str) -> str | None:
    """Why the sparse kernels cannot serve tensors on ``device`` (``None``: they can)."""
    device = torch.device(device)
    if device.type == "cpu":
        if os.environ.get(ENV_ON_CPU) in ON_CPU_VALUES:
            return None
        return "no sparse kernel on cpu (masked-dense emulation)"
    if device.type != "cuda":
        return f"no sparse kernel on {device.type}"
    if not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"GPU compute capability {capability} has no sparse tensor cores (needs 8.0+)"
    return None


def sparse_operand_reason(rows: int, cols: int, dtype: torch.dtype) -> str | None:
    """Why a ``[rows, cols]`` ``dtype`` matrix cannot be a compressed operand, or ``None``."""
    if dtype not in SPARSE_DTYPES:
        if dtype == torch.float32:
            return ("float32 GEMM (cuSPARSELt's float32 sparsity is 1:2, not 2:4; use bf16/fp16 "
                    "weights or torch.autocast)")
        return f"{dtype} GEMM (2:4 kernels take bfloat16 and float16)"
    if min(rows, cols) < SPARSE_ALIGN or rows % SPARSE_ALIGN or cols % SPARSE_ALIGN:
        return (f"sparse operand {rows}x{cols}: cuSPARSELt needs both dims to be multiples of "
                f"{SPARSE_ALIGN}")
    return None


def runtime_version() -> str:
    """Version of the cuSPARSELt library torch loads: the installed ``nvidia-cusparselt-*``
    package if any, else the version torch was built against."""
    from importlib import metadata

    for name in ("nvidia-cusparselt-cu13", "nvidia-cusparselt-cu12", "nvidia-cusparselt"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    built = torch.backends.cusparselt.version()
    return f"built-{built}" if built is not None else "none"


def compress(a: Tensor) -> Tensor:
    """Compress ``a`` (2-D, 2:4 along dim 1, bf16/fp16) for :func:`torch._cslt_sparse_mm`.

    Any layout is accepted: a non-contiguous ``a`` is copied first (the library would misread
    it). Returns the library's opaque blob.
    """
    return torch._cslt_compress(a.contiguous())


def dense_operand(b: Tensor) -> Tensor:
    """``b`` in a layout ``_cslt_sparse_mm`` reads correctly: as is when it is contiguous or the
    transpose of a contiguous matrix (and starts on a 16-byte boundary, the alignment the
    library is told), else a contiguous copy."""
    if (b.is_contiguous() or b.t().is_contiguous()) and not b.data_ptr() % ALIGN_BYTES:
        return b
    return b.contiguous() if not b.is_contiguous() else b.clone()


def _matmul(packed: Tensor, b: Tensor, bias: Tensor | None, transpose_result: bool,
            alg_id: int) -> Tensor:
    """``torch._cslt_sparse_mm(packed, b, bias, transpose_result=..., alg_id=...)``, from a
    cached plan where :mod:`.cusparselt_plans` serves the call."""
    plans = cusparselt_plans.for_device(b.device)
    if plans is not None:
        out = plans.matmul(packed, b, bias, transpose_result, alg_id)
        if out is not None:
            return out
    return torch._cslt_sparse_mm(packed, b, bias, transpose_result=transpose_result,
                                 alg_id=alg_id)


def _pad_rows(x: Tensor, multiple: int) -> Tensor:
    extra = -x.shape[0] % multiple
    if not extra:
        return x
    return torch.cat([x, x.new_zeros(extra, x.shape[1])])


def _transposed_product(packed: Tensor, x: Tensor, bias: Tensor | None,
                        features: int, alg_id: int) -> Tensor:
    """``(A @ x^T)^T`` for the compressed ``A`` (``features`` rows): ``x`` ``[..., k]``."""
    x2 = x.reshape(-1, x.shape[-1])
    tokens = x2.shape[0]
    padded = _pad_rows(x2, DENSE_ALIGN)
    if bias is not None:  # the library takes a bare, 16-byte aligned pointer
        bias = bias.contiguous() if bias.data_ptr() % ALIGN_BYTES == 0 else bias.clone()
    out = _matmul(packed, dense_operand(padded.t()), bias, True, alg_id)
    if out.shape[0] != tokens:
        out = out[:tokens]  # a prefix of rows of a contiguous tensor: still contiguous
    return out.view(*x.shape[:-1], features)


def linear_forward(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int,
                   alg_id: int = 0) -> Tensor:
    """``x @ (W*M)^T + bias`` from ``packed = compress(W*M)``: ``[..., in]`` to ``[..., out]``.

    ``x`` is flattened to ``[tokens, in]`` without a copy when its layout allows; ``bias`` (if
    any) has ``x``'s dtype and ``out_features`` entries. ``alg_id``: the cuSPARSELt algorithm
    (0 unless the cost rule validated another for this shape on this device).
    """
    return _transposed_product(packed, x, bias, out_features, alg_id)


def linear_grad_input(grad_out: Tensor, packed_t: Tensor, in_features: int,
                      alg_id: int = 0) -> Tensor:
    """``grad_out @ (W*M)`` from ``packed_t = compress((W*M)^T)``: ``[..., out]`` to
    ``[..., in]``."""
    return _transposed_product(packed_t, grad_out, None, in_features, alg_id)


def sparse_mm(a: Tensor, b: Tensor, alg_id: int = 0) -> Tensor:
    """``a @ b``: ``a`` ``[M, K]`` is 2:4 along ``K`` (compressed here, at every call), ``b`` is
    ``[K, N]``."""
    return sparse_mm_packed(compress(a), b, alg_id)


def sparse_mm_packed(packed: Tensor, b: Tensor, alg_id: int = 0) -> Tensor:
    """``A @ b`` from ``packed = compress(A)``."""
    return _matmul(packed, dense_operand(b), None, False, alg_id)


def sparse_mm_reason(m: int, k: int, n: int, dtype: torch.dtype) -> str | None:
    """Why ``a [m, k] @ b [k, n]`` cannot run in :func:`sparse_mm` (``None``: it can)."""
    reason = sparse_operand_reason(m, k, dtype)
    if reason is None and n % DENSE_ALIGN:
        reason = f"dense operand {k}x{n}: cuSPARSELt needs multiples of {DENSE_ALIGN}"
    return reason


def plan_keys(role: str, m: int, k: int, n: int, dtype: torch.dtype,
              alg_id: int = 0) -> list[PlanKey]:
    """The cached-plan keys the calls of one GEMM use (:class:`.cusparselt_plans.PlanKey`), as
    the functions above make them from contiguous activations: ``role`` ``forward`` (with and
    without a bias) or ``grad_input`` (``[m, k]`` compressed weight times the transposed,
    padded ``[n, k]`` activation, transposed result), ``grad_weight`` (``a [m, k] @ b [k, n]``).
    """
    if role == "grad_weight":
        return [PlanKey(m, k, n, dtype, False, False, False, alg_id)]
    n += -n % DENSE_ALIGN
    biases = (False, True) if role == "forward" else (False,)
    return [PlanKey(m, k, n, dtype, True, True, bias, alg_id) for bias in biases]


def plans_note(device: torch.device | str, role: str, m: int, k: int, n: int,
               dtype: torch.dtype, alg_id: int = 0) -> str | None:
    """Why the calls of one GEMM (:func:`plan_keys`) go through ``torch._cslt_sparse_mm``'s
    per-call plans rather than cached plans, checking the keys now if they are new; ``None``
    when cached plans serve them, or on CPU without a test library (the model's calls)."""
    device = torch.device(device)
    plans = cusparselt_plans.for_device(device)
    if plans is None:
        return None if device.type == "cpu" else cusparselt_plans.status(device)
    for key in plan_keys(role, m, k, n, dtype, alg_id):
        reason = plans.check(key)
        if reason is not None:
            return f"cached plan failed its self-check at {key.label()}: {reason}"
    return None
