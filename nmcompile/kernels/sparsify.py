"""Per-step weight sparsify in Triton: each weight read once, its exact transposable 2:4 mask and
both compressed operands, ``compress(W*M)`` and ``compress((W*M)^T)``, written in one pass.

This module imports Triton; :mod:`nmcompile.refresh` loads it only where it serves (a CUDA
device whose layout :mod:`.layout_check` verified, or CPU tensors under ``TRITON_INTERPRET=1``
with ``NMCOMPILE_CSLT_ON_CPU=1`` in the tests).

One launch handles every weight of one (weight dtype, compressed dtype, work) kind: a work table
lists, per program, the weight and the 64 x 16 block it owns; a pointer table gives each
weight's tensors and shape. A program

* loads its block once (bf16, fp16, or fp32 cast on load to the compressed dtype);
* with ``SCORE``, solves the block's sixteen 4 x 4 tiles exactly as
  :func:`nmcompile.solvers.transposable_masks_scored` does: the same integer magnitudes
  (:func:`_int_scores`, computed from the bit patterns, so no flush-to-zero can change them;
  NaN and +-Inf score as the largest finite magnitude), every admissible pattern scored by two
  fp16 dots (high and low 11 bits of the integers: exact), ties to the lowest pattern index;
  without ``SCORE`` it reads the mask it is given;
* writes the bool mask (``WRITE_MASK``), and with ``STATS`` adds the block's flips against the
  mask it overwrites, kept count, kept and total ``|W|`` to the weight's row of a float64
  ``[weights, 4]`` buffer;
* writes ``compress(W*M)`` (``PACK_W``, groups along the weight's columns) and
  ``compress((W*M)^T)`` (``PACK_WT``, groups along its rows) in the layout of ``ARCH`` (80 or
  90, :mod:`.layout`): values row-major, two ascending positions per group (the mask's kept
  positions, then the lowest free ones), one metadata byte per nibble pair.

Weights must have rows and columns in multiples of the layout's blocks both ways
(:func:`nmcompile.refresh` checks; other shapes keep ``torch._cslt_compress``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..solvers.patterns import score_bits
from . import layout

__all__ = ["BLOCK_COLS", "BLOCK_ROWS", "Item", "launch", "sparsify_kernel"]

#: Rows and columns of the block one program owns.
BLOCK_ROWS, BLOCK_COLS = layout.SPARSIFY_BLOCK


@triton.jit
def _int_scores(w, BITS: tl.constexpr):
    """Exact integer magnitudes of tile-major ``w`` (fp32 ``[T, 16]``, a 4 x 4 tile per row):
    ``ceil(|w| * 2**S)``, ``S`` putting the tile's largest magnitude in ``[2**(BITS-1),
    2**BITS]``, from the bit patterns (``nmcompile.solvers.patterns._element_scores``)."""
    bits = tl.minimum(w.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0x7F7FFFFF)
    exponent = bits >> 23
    significand = tl.where(exponent > 0, (bits & 0x7FFFFF) | 0x800000, bits & 0x7FFFFF)
    top = tl.minimum(BITS - 1 + 254 - tl.max(exponent, axis=1), 254)
    drop = tl.minimum(277 - tl.maximum(exponent, 1) - top[:, None], 25)
    return (significand + (1 << drop) - 1) >> drop


@triton.jit
def _best_codes(scores, patterns_ptr, codes_ptr, NP: tl.constexpr):
    """Bit code (cell ``4*r + c``) of the best pattern of each tile of ``scores`` (int32
    ``[T, 16]``); ``patterns_ptr``: fp16 ``[16, NP]`` 0/1 table, padded with empty columns."""
    cell = tl.arange(0, 16)
    table = tl.load(patterns_ptr + cell[:, None] * NP + tl.arange(0, NP)[None, :])
    high = tl.dot((scores >> 11).to(tl.float16), table)
    low = tl.dot((scores & 2047).to(tl.float16), table)
    total = (high.to(tl.int32) << 11) + low.to(tl.int32)
    best = tl.argmax(total, axis=1, tie_break_left=True)
    return tl.load(codes_ptr + best)


@triton.jit
def _to_f32(w, IN_DTYPE: tl.constexpr):
    """``w`` as float32, exactly: bf16 by its bit pattern (Triton's interpreter rounds bf16
    subnormals in a plain cast)."""
    if IN_DTYPE == tl.bfloat16:
        bits = (w.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) << 16
        return bits.to(tl.float32, bitcast=True)
    return w.to(tl.float32)


@triton.jit
def _block_keep(w, patterns_ptr, codes_ptr, BITS: tl.constexpr, NP: tl.constexpr):
    """The transposable mask of a ``[64, 16]`` float32 block (int32 0/1, the block's
    layout)."""
    tiles = tl.reshape(tl.permute(tl.reshape(w, (16, 4, 4, 4)), (0, 2, 1, 3)), (64, 16))
    codes = _best_codes(_int_scores(tiles, BITS), patterns_ptr, codes_ptr, NP)
    row = tl.arange(0, 4)[None, :, None, None]
    col = tl.arange(0, 4)[None, None, None, :]
    bits = (tl.reshape(codes, (16, 1, 4, 1)) >> (4 * row + col)) & 1
    return tl.reshape(bits, (64, 16))


@triton.jit
def _meta_byte(row, group, nrows, ncols, ARCH: tl.constexpr):
    """Metadata byte (from the region's start) of group ``group`` (columns ``4*group ..``) of
    row ``row`` of an ``[nrows, ncols]`` operand in the ``ARCH`` layout (:mod:`.layout`)."""
    if ARCH == 90:
        g8 = group % 8
        byte = ((row // 64) * 8 * ncols + (group // 8) * 256 + ((row % 64) // 16) * 64
                + (row % 8) * 8 + 2 * (g8 % 4) + g8 // 4)
    else:
        col = 4 * group
        word = 4 * (row % 8) + 2 * ((row % 32) // 16) + (col % 32) // 16
        byte = (((col // 64) * (nrows // 128) + row // 128) * 1024 + ((row % 128) // 32) * 128
                + ((col % 64) // 32) * 512 + 4 * word + 2 * ((row % 16) // 8)
                + ((col % 16) // 4) // 2)
    return byte


@triton.jit
def _bf16_rtne(x):
    """fp32 -> bf16 rounded to nearest even, NaN to 0x7FC0, as torch's ``.to(torch.bfloat16)``
    (in integer ops: Triton's interpreter truncates a plain cast)."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _pick(x0, x1, x2, x3, idx):
    return tl.where(idx == 0, x0, tl.where(idx == 1, x1, tl.where(idx == 2, x2, x3)))


@triton.jit
def _store_groups(blob_ptr, values, keep, nibble_lut, row0, col0, nrows, ncols,
                  RR: tl.constexpr, CC: tl.constexpr, ARCH: tl.constexpr):
    """Write the ``[RR, CC]`` block at ``(row0, col0)`` of an ``[nrows, ncols]`` operand,
    2:4 along its columns, into its blob: ``values`` already masked, ``keep`` its 0/1 mask."""
    weight = 1 << tl.arange(0, 4)
    pattern = tl.sum(tl.reshape(keep, (RR, CC // 4, 4)) * weight[None, None, :], axis=2)
    nibble = tl.load(nibble_lut + pattern)  # positions idx0 | idx1 << 2 (layout.group_positions)
    even, odd = tl.split(tl.reshape(values, (RR, CC // 4, 2, 2)))
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    kept = tl.join(_pick(x0, x1, x2, x3, nibble & 3), _pick(x0, x1, x2, x3, nibble >> 2))
    rows = row0 + tl.arange(0, RR)
    half = ncols // 2
    tl.store(blob_ptr + rows[:, None] * half + col0 // 2 + tl.arange(0, CC // 2)[None, :],
             tl.reshape(kept, (RR, CC // 2)))
    meta_ptr = blob_ptr.to(tl.pointer_type(tl.uint8)) + nrows * ncols
    if ARCH == 90:  # a byte holds rows r (low nibble) and r + 8 of one group
        low, high = tl.split(tl.permute(tl.reshape(nibble, (RR // 16, 2, 8, CC // 4)),
                                        (0, 2, 3, 1)))
        row = (row0 + 16 * tl.arange(0, RR // 16)[:, None, None]
               + tl.arange(0, 8)[None, :, None])
        group = col0 // 4 + tl.arange(0, CC // 4)[None, None, :]
    else:  # a byte holds groups 2k (low nibble) and 2k + 1 of one row
        low, high = tl.split(tl.reshape(nibble, (RR, CC // 8, 2)))
        row = rows[:, None]
        group = col0 // 4 + 2 * tl.arange(0, CC // 8)[None, :]
    tl.store(meta_ptr + _meta_byte(row, group, nrows, ncols, ARCH),
             (low | (high << 4)).to(tl.uint8))


@triton.jit
def sparsify_kernel(work_ptr, table_ptr, stats_ptr, patterns_ptr, codes_ptr, nibble_lut,
                    PACK: tl.constexpr, SCORE: tl.constexpr, WRITE_MASK: tl.constexpr,
                    STATS: tl.constexpr, PACK_W: tl.constexpr, PACK_WT: tl.constexpr,
                    ARCH: tl.constexpr, BITS: tl.constexpr, NP: tl.constexpr,
                    IN_DTYPE: tl.constexpr):
    """One ``[64, 16]`` block of one weight: see the module docstring. ``work_ptr``: int32
    ``[programs, 3]`` (weight, block row, block column); ``table_ptr``: int64 ``[weights, 6]``
    (weight, mask (uint8), blob, transposed blob addresses, rows, columns)."""
    pid = tl.program_id(0)
    index = tl.load(work_ptr + 3 * pid)
    row0 = tl.load(work_ptr + 3 * pid + 1) * 64
    col0 = tl.load(work_ptr + 3 * pid + 2) * 16
    entry = table_ptr + 6 * index
    nrows = tl.load(entry + 4)
    ncols = tl.load(entry + 5)
    rows = row0 + tl.arange(0, 64)
    cols = col0 + tl.arange(0, 16)
    offsets = rows[:, None] * ncols + cols[None, :]
    w = tl.load(tl.load(entry).to(tl.pointer_type(IN_DTYPE)) + offsets)
    mask_ptr = tl.load(entry + 1).to(tl.pointer_type(tl.uint8))
    if SCORE:
        keep = _block_keep(_to_f32(w, IN_DTYPE), patterns_ptr, codes_ptr, BITS, NP)
    else:
        keep = (tl.load(mask_ptr + offsets) != 0).to(tl.int32)
    if STATS:
        magnitude = tl.abs(_to_f32(w, IN_DTYPE))
        previous = tl.load(mask_ptr + offsets).to(tl.int32)
        row_stats = stats_ptr + 4 * index
        tl.atomic_add(row_stats, tl.sum(tl.sum((previous != keep).to(tl.float32), 1), 0)
                      .to(tl.float64))
        tl.atomic_add(row_stats + 1, tl.sum(tl.sum(keep.to(tl.float32), 1), 0).to(tl.float64))
        tl.atomic_add(row_stats + 2, tl.sum(tl.sum(tl.where(keep != 0, magnitude, 0.0), 1), 0)
                      .to(tl.float64))
        tl.atomic_add(row_stats + 3, tl.sum(tl.sum(magnitude, 1), 0).to(tl.float64))
    if WRITE_MASK:
        tl.store(mask_ptr + offsets, keep.to(tl.uint8))
    if IN_DTYPE == tl.float32 and PACK == tl.bfloat16:
        w = _bf16_rtne(w)
    w = w.to(PACK)
    values = tl.where(keep != 0, w, tl.zeros_like(w))  # a select: NaN payloads pass unchanged
    if PACK_W:
        _store_groups(tl.load(entry + 2).to(tl.pointer_type(PACK)), values, keep, nibble_lut,
                      row0, col0, nrows, ncols, 64, 16, ARCH)
    if PACK_WT:
        _store_groups(tl.load(entry + 3).to(tl.pointer_type(PACK)), tl.trans(values),
                      tl.trans(keep), nibble_lut, col0, row0, ncols, nrows, 16, 64, ARCH)


# -- launching ---------------------------------------------------------------------------------

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@dataclass(frozen=True)
class Item:
    """One weight of a launch: ``weight`` (2-D, contiguous), its bool ``mask`` (read, or written
    with ``score``), and the blobs to write (``None``: not written), each ``rows * 9 * cols /
    16`` elements of the compressed dtype."""

    weight: torch.Tensor
    mask: torch.Tensor
    blob: torch.Tensor | None = None
    blob_t: torch.Tensor | None = None


@functools.lru_cache(maxsize=16)
def _tables(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fp16 ``[16, NP]`` pattern table (padded with empty patterns), the patterns' int32 bit
    codes, and the 16-entry nibble table of :func:`.layout.group_positions`, on ``device``."""
    from ..solvers.patterns import tile_patterns

    patterns = torch.as_tensor(tile_patterns(n, 4))  # [P, 16], row-major cells, ordered by code
    padded = max(16, 1 << (patterns.shape[0] - 1).bit_length())
    table = torch.zeros(16, padded, dtype=torch.float16)
    table[:, : patterns.shape[0]] = patterns.t().to(torch.float16)
    codes = torch.zeros(padded, dtype=torch.int32)
    codes[: patterns.shape[0]] = (patterns.to(torch.int32) << torch.arange(16)).sum(1)
    keep = ((torch.arange(16)[:, None] >> torch.arange(4)) & 1).bool()
    keep[keep.sum(1) > 2] = False  # never read: masks handed in are 2:4 (checked on load)
    first, second = layout.group_positions(keep)
    nibbles = (first | (second << 2)).to(torch.int32)
    return table.to(device), codes.to(device), nibbles.to(device)


@functools.lru_cache(maxsize=64)
def _work(device: torch.device, shapes: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """int32 ``[programs, 3]``: (weight, block row, block column) of every program."""
    parts = []
    for index, (rows, cols) in enumerate(shapes):
        r, c = torch.meshgrid(torch.arange(rows // BLOCK_ROWS), torch.arange(cols // BLOCK_COLS),
                              indexing="ij")
        parts.append(torch.stack([torch.full_like(r, index), r, c], -1).reshape(-1, 3))
    return torch.cat(parts).to(torch.int32).to(device)


@functools.lru_cache(maxsize=64)
def _table(device: torch.device, rows: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """int64 ``[items, 6]`` on ``device``: each item's weight, mask and blob addresses and its
    shape. Cached by its content: the bank writes the same buffers in place at every step, so
    the table is copied to the device once, not with a host sync per step."""
    return torch.tensor(rows, dtype=torch.int64).to(device)


def launch(items: list[Item], pack_dtype: torch.dtype, arch: str, *, score: bool, n: int = 2,
           stats: bool = False) -> torch.Tensor | None:
    """Run :func:`sparsify_kernel` once over ``items`` (one weight dtype, one device).

    ``score``: solve the exact transposable ``n:4`` mask into each item's ``mask`` (else read
    it); ``stats``: also return float64 ``[len(items), 4]`` (flips against the overwritten mask,
    kept count, kept ``|W|``, total ``|W|``). Blobs are written where items give them (all
    items alike). ``arch``: ``"sm80"`` or ``"sm90"``.
    """
    device = items[0].weight.device
    in_dtype = items[0].weight.dtype
    pack_w, pack_wt = items[0].blob is not None, items[0].blob_t is not None
    shapes = tuple(tuple(item.weight.shape) for item in items)
    table = _table(device, tuple((item.weight.data_ptr(), item.mask.data_ptr(),
                                  item.blob.data_ptr() if pack_w else 0,
                                  item.blob_t.data_ptr() if pack_wt else 0, *item.weight.shape)
                                 for item in items))
    sums = torch.zeros(len(items), 4, dtype=torch.float64, device=device) if stats else table
    patterns, codes, nibbles = _tables(device, n)
    work = _work(device, shapes)
    sparsify_kernel[(work.shape[0],)](
        work, table, sums, patterns, codes, nibbles,
        PACK=_TL_DTYPES[pack_dtype], SCORE=score, WRITE_MASK=score, STATS=stats,
        PACK_W=pack_w, PACK_WT=pack_wt, ARCH=int(arch.removeprefix("sm")),
        BITS=score_bits(n, 4, torch.float32), NP=patterns.shape[1], IN_DTYPE=_TL_DTYPES[in_dtype],
        num_warps=4)
    return sums if stats else None
