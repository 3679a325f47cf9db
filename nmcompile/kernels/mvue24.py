"""MVUE's grad-weight operand in Triton: the unbiased 2:4 mask of ``dY^T`` along tokens and its
compressed form, written in one pass over ``dY``.

The grad-weight GEMM ``dW = dY^T X`` runs on the sparse kernel when ``dY^T`` (``[out, tokens]``)
is 2:4 along tokens. MVUE (Chmiel et al., ICLR 2023; :mod:`nmcompile.solvers.mvue`) keeps each
element ``a_i`` of a group of 4 with probability ``p_i`` and rescales it to ``a_i / p_i``, so
the pruned operand is unbiased. This kernel draws exactly the distribution of
:func:`nmcompile.solvers.mvue.mvue` with ``n, m = 2, 4``:

* ``exact``: ``p_i = min(1, |a_i| / d)`` with the water level ``d`` that makes the ``p_i`` sum
  to 2, drawn by systematic sampling with one uniform per group;
* ``approx``: two sequential magnitude-proportional draws (two uniforms per group), each kept
  element rescaled by its inclusion probability under that scheme;

groups with at most two non-zeros are kept as they are. The uniforms come from Philox
(``tl.rand``) keyed by a seed the caller draws from torch's generator, so ``torch.manual_seed``
makes runs reproducible; the tests hand the kernel torch's own uniforms instead
(``U_FROM_PTR``) and compare with :func:`~nmcompile.solvers.mvue.mvue` draw for draw.
The blob is written in the compressed layout of ``ARCH`` (:mod:`.layout`), as
:mod:`.sparsify` writes weights; nothing else is materialised (no pruned dense copy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import layout
from .sparsify import _TL_DTYPES, _bf16_rtne, _store_groups, _tables, _to_f32

__all__ = ["BLOCK_COLS", "BLOCK_ROWS", "launch", "mvue24_kernel", "padded_tokens", "sparse_mm"]

#: Rows (out-features) and columns (tokens) of the block one program owns.
BLOCK_ROWS, BLOCK_COLS = 64, 32


@triton.jit
def _systematic(p0, p1, p2, p3, s0, s1, s2, s3, u):
    """Systematic sampling of the non-sure elements (``s``: sure) with probabilities ``p``:
    the ones whose interval, laid end to end on ``[0, budget)``, holds one of ``u, u+1``."""
    budget = 2.0 - (s0.to(tl.float32) + s1.to(tl.float32) + s2.to(tl.float32)
                    + s3.to(tl.float32))
    q0 = tl.where(s0, 0.0, p0)
    q1 = tl.where(s1, 0.0, p1)
    q2 = tl.where(s2, 0.0, p2)
    q3 = tl.where(s3, 0.0, p3)
    e0 = q0
    e1 = e0 + q1
    e2 = e1 + q2
    e3 = budget  # the probabilities sum to the budget exactly (water-filling)
    c0 = tl.maximum(tl.ceil(0.0 - u), 0.0)
    c1 = tl.minimum(tl.maximum(tl.ceil(e0 - u), 0.0), budget)
    c2 = tl.minimum(tl.maximum(tl.ceil(e1 - u), 0.0), budget)
    c3 = tl.minimum(tl.maximum(tl.ceil(e2 - u), 0.0), budget)
    c4 = tl.minimum(tl.maximum(tl.ceil(e3 - u), 0.0), budget)
    c1s = tl.maximum(tl.ceil(e0 - u), 0.0)
    c2s = tl.maximum(tl.ceil(e1 - u), 0.0)
    c3s = tl.maximum(tl.ceil(e2 - u), 0.0)
    return ((c1 > c0) & (q0 > 0), (c2 > c1s) & (q1 > 0), (c3 > c2s) & (q2 > 0),
            (c4 > c3s) & (q3 > 0))


@triton.jit
def _exact(x0, x1, x2, x3, u):
    """Exact MVUE 2:4 of the groups ``(x0, x1, x2, x3)`` (float32): the pruned values."""
    a0, a1, a2, a3 = tl.abs(x0), tl.abs(x1), tl.abs(x2), tl.abs(x3)
    nz = (a0 > 0).to(tl.int32) + (a1 > 0).to(tl.int32) + (a2 > 0).to(tl.int32) \
        + (a3 > 0).to(tl.int32)
    few = nz <= 2
    top = tl.maximum(tl.maximum(a0, a1), tl.maximum(a2, a3))
    total = a0 + a1 + a2 + a3
    level = tl.where(top <= total / 2.0, total / 2.0, total - top)
    level = tl.where(few | (level <= 0), 1.0, level)
    p0 = tl.minimum(a0 / level, 1.0)
    p1 = tl.minimum(a1 / level, 1.0)
    p2 = tl.minimum(a2 / level, 1.0)
    p3 = tl.minimum(a3 / level, 1.0)
    s0 = (few & (a0 > 0)) | (p0 >= 1.0)
    s1 = (few & (a1 > 0)) | (p1 >= 1.0)
    s2 = (few & (a2 > 0)) | (p2 >= 1.0)
    s3 = (few & (a3 > 0)) | (p3 >= 1.0)
    p0 = tl.where(few, 0.0, p0)
    p1 = tl.where(few, 0.0, p1)
    p2 = tl.where(few, 0.0, p2)
    p3 = tl.where(few, 0.0, p3)
    k0, k1, k2, k3 = _systematic(p0, p1, p2, p3, s0, s1, s2, s3, u)
    return (_kept(x0, s0, k0, level), _kept(x1, s1, k1, level), _kept(x2, s2, k2, level),
            _kept(x3, s3, k3, level))


@triton.jit
def _kept(x, sure, picked, level):
    sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    return tl.where(sure, x, tl.where(picked, sign * level, 0.0))


@triton.jit
def _draw(w0, w1, w2, w3, u):
    """One-hot draw of an index with probability ``w / sum(w)`` (none if all 0)."""
    e0 = w0
    e1 = e0 + w1
    e2 = e1 + w2
    e3 = e2 + w3
    t = u * e3
    return ((t < e0) & (w0 > 0), (e0 <= t) & (t < e1) & (w1 > 0),
            (e1 <= t) & (t < e2) & (w2 > 0), (e2 <= t) & (t < e3) & (w3 > 0))


@triton.jit
def _ratio(q, rest):
    return tl.where(rest > 0, q / tl.where(rest > 0, rest, 1.0), 0.0)


@triton.jit
def _approx(x0, x1, x2, x3, u1, u2):
    """Approximate MVUE 2:4: two sequential magnitude-proportional draws, each kept element
    divided by its inclusion probability under them."""
    a0, a1, a2, a3 = tl.abs(x0), tl.abs(x1), tl.abs(x2), tl.abs(x3)
    nz = (a0 > 0).to(tl.int32) + (a1 > 0).to(tl.int32) + (a2 > 0).to(tl.int32) \
        + (a3 > 0).to(tl.int32)
    few = nz <= 2
    f0, f1, f2, f3 = _draw(a0, a1, a2, a3, u1)
    g0, g1, g2, g3 = _draw(tl.where(f0, 0.0, a0), tl.where(f1, 0.0, a1), tl.where(f2, 0.0, a2),
                           tl.where(f3, 0.0, a3), u2)
    total = a0 + a1 + a2 + a3
    safe = tl.where(total > 0, total, 1.0)
    q0, q1, q2, q3 = a0 / safe, a1 / safe, a2 / safe, a3 / safe
    r0, r1 = _ratio(q0, total - a0), _ratio(q1, total - a1)
    r2, r3 = _ratio(q2, total - a2), _ratio(q3, total - a3)
    r = r0 + r1 + r2 + r3
    return (_scaled(x0, a0, q0, r - r0, few, f0 | g0), _scaled(x1, a1, q1, r - r1, few, f1 | g1),
            _scaled(x2, a2, q2, r - r2, few, f2 | g2), _scaled(x3, a3, q3, r - r3, few, f3 | g3))


@triton.jit
def _scaled(x, a, q, others, few, drawn):
    keep = tl.where(few, a > 0, drawn)
    incl = tl.where(few | (keep == 0), 1.0, q + a * others)  # noqa: E712
    return tl.where(keep, x / incl, 0.0)


@triton.jit
def mvue24_kernel(a_ptr, stride_r, stride_c, rows, cols, seed_ptr, u_ptr, blob_ptr, nibble_lut,
                  padded_cols, EXACT: tl.constexpr, U_FROM_PTR: tl.constexpr,
                  ARCH: tl.constexpr, PACK: tl.constexpr, IN_DTYPE: tl.constexpr):
    """One ``[64, 32]`` block of ``A = dY^T`` (``[rows, cols]``, any strides; columns past
    ``cols`` up to ``padded_cols`` read as zeros): its MVUE 2:4 draw along the columns,
    compressed into ``blob_ptr`` (a ``[rows, padded_cols]`` operand). Uniforms: Philox keyed
    by ``seed_ptr[0]`` and the group's index, or (``U_FROM_PTR``) ``u_ptr`` ``[rows,
    padded_cols / 4, 2]`` float32."""
    row0 = tl.program_id(0) * 64
    col0 = tl.program_id(1) * 32
    r = row0 + tl.arange(0, 64)
    c = col0 + tl.arange(0, 32)
    inside = (r[:, None] < rows) & (c[None, :] < cols)
    x = tl.load(a_ptr + r[:, None] * stride_r + c[None, :] * stride_c, mask=inside, other=0.0)
    x = _to_f32(x, IN_DTYPE)
    even, odd = tl.split(tl.reshape(x, (64, 8, 2, 2)))
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    group = r[:, None] * (padded_cols // 4) + col0 // 4 + tl.arange(0, 8)[None, :]
    if U_FROM_PTR:
        u1 = tl.load(u_ptr + 2 * group)
        u2 = tl.load(u_ptr + 2 * group + 1)
    else:
        seed = tl.load(seed_ptr)
        u1 = tl.rand(seed, 2 * group)
        u2 = tl.rand(seed, 2 * group + 1)
    if EXACT:
        y0, y1, y2, y3 = _exact(x0, x1, x2, x3, u1)
    else:
        y0, y1, y2, y3 = _approx(x0, x1, x2, x3, u1, u2)
    values = tl.reshape(tl.join(tl.join(y0, y2), tl.join(y1, y3)), (64, 32))
    keep = (values != 0).to(tl.int32)
    if PACK == tl.bfloat16:
        packed = _bf16_rtne(values)
    else:
        packed = values.to(PACK)
    _store_groups(blob_ptr, packed, keep, nibble_lut, row0, col0, rows, padded_cols,
                  64, 32, ARCH)


def padded_tokens(tokens: int, arch: str) -> int:
    """Columns of the compressed operand: ``tokens`` rounded up to the kernel's block and the
    layout's column block."""
    step = max(BLOCK_COLS, layout.BLOCKS[arch][1])
    return -(-tokens // step) * step


def rows_reason(rows: int, arch: str) -> str | None:
    """Why a ``rows``-row operand (out-features) is not one the kernel writes (``None``: it is)."""
    step = max(BLOCK_ROWS, layout.BLOCKS[arch][0])
    if rows % step:
        return f"{rows} out-features: the MVUE kernel writes multiples of {step} rows ({arch})"
    return None


def sparse_mm(a: torch.Tensor, b: torch.Tensor, arch: str, *, exact: bool,
              alg_id: int = 0) -> torch.Tensor:
    """``mvue(a, 2, 4) @ b`` on the sparse kernel: ``a`` ``[out, tokens]`` (``dY^T``, any
    strides), ``b`` ``[tokens, in]``; ``[out, in]`` in ``a``'s dtype. The draw's seed comes from
    torch's generator of ``a``'s device (one ``randint`` per call, no host sync)."""
    from . import cusparselt

    rows, tokens = a.shape
    padded = padded_tokens(tokens, arch)
    blob = torch.empty(rows, 9 * padded // 16, dtype=a.dtype, device=a.device)
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=a.device)
    launch(a, blob, arch, exact=exact, seed=seed)
    if padded != tokens:
        b = torch.cat([b, b.new_zeros(padded - tokens, b.shape[1])])
    return cusparselt.sparse_mm_packed(blob, b, alg_id)


def launch(a: torch.Tensor, blob: torch.Tensor, arch: str, *, exact: bool,
           seed: torch.Tensor | None = None, uniforms: torch.Tensor | None = None) -> None:
    """Write the compressed MVUE 2:4 draw of ``a`` (``[rows, tokens]``, 2-D, any strides,
    bf16/fp16; :func:`rows_reason`) into ``blob``, a ``rows * 9 * padded / 16``-element tensor
    of ``a``'s dtype, ``padded`` = :func:`padded_tokens` (the zero tokens added are exact: they
    add nothing to the product). ``seed``: int64 ``[1]`` on
    ``a``'s device (drawn from torch's generator by the caller); ``uniforms``: float32
    ``[rows, padded / 4, 2]`` to use instead (tests)."""
    rows, cols = a.shape
    padded = padded_tokens(cols, arch)
    if reason := rows_reason(rows, arch):
        raise ValueError(f"mvue24: {reason}")
    if blob.numel() != rows * 9 * padded // 16 or blob.dtype != a.dtype:
        raise ValueError(f"mvue24: blob {blob.dtype} {tuple(blob.shape)} does not hold a "
                         f"{rows}x{padded} {a.dtype} operand")
    _, _, nibbles = _tables(a.device, 2)
    if uniforms is None:
        if seed is None:
            raise ValueError("mvue24: give a seed (or uniforms)")
        uniforms = blob  # never read
    else:
        seed = torch.zeros(1, dtype=torch.int64, device=a.device)
    mvue24_kernel[(rows // BLOCK_ROWS, padded // BLOCK_COLS)](
        a, a.stride(0), a.stride(1), rows, cols, seed, uniforms, blob, nibbles, padded,
        EXACT=exact, U_FROM_PTR=uniforms is not blob, ARCH=int(arch.removeprefix("sm")),
        PACK=_TL_DTYPES[a.dtype], IN_DTYPE=_TL_DTYPES[a.dtype], num_warps=4)
