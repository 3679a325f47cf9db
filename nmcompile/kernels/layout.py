"""cuSPARSELt's compressed 2:4 layout for 16-bit types, as public reverse-engineering describes
it, in pure torch: the reference that the Triton sparsify kernels (:mod:`.sparsify`) are tested
against bit for bit, and the encoder of CPU tensors under ``NMCOMPILE_CSLT_ON_CPU=1``.

NVIDIA calls the blob private ("can change at any time", NVIDIA/CUDALibrarySamples#167): nothing
here is trusted on a GPU before :mod:`.layout_check` has compared it with
``torch._cslt_compress`` there. A ``[rows, cols]`` matrix that is 2:4 along ``cols`` becomes
``rows * cols / 2`` values followed by ``rows * cols / 8`` bytes of metadata, stored as a
``(rows, 9 * cols / 16)`` tensor of the input's dtype (the 2-D shape is nominal: values and
metadata are two flat regions, the metadata starting at byte ``rows * cols``):

* **values**: row-major ``[rows, cols / 2]``; each aligned group of 4 along ``cols`` keeps two
  values, in ascending column order;
* **metadata**: one nibble per group, ``idx0 | idx1 << 2`` (the two kept positions 0-3,
  ascending). Where a group holds fewer than two non-zeros it still names two distinct
  positions: here the non-zeros first, then the lowest free positions (cuSPARSELt's own choice
  there is unknown, so such groups are compared by their products, never by bits). The
  groups' order differs by architecture:

  - ``sm90`` (H100/H200; xformers'/torchao's deleted ``activation24`` sparsify kernels and
    FlagGems PR #5281): for row ``r`` and group ``g`` (columns ``4g..4g+3``), ``g8 = g % 8``,
    ``byte = (r // 64) * 8 * cols + (g // 8) * 256 + ((r % 64) // 16) * 64 + (r % 8) * 8
    + 2 * (g8 % 4) + g8 // 4``, the low nibble when ``r % 16 < 8``, else the high one. Rows
    in blocks of 64, columns in blocks of 32.
  - ``sm80`` (A100; torch's ``MetadataCuSparseLt`` in
    ``aten/src/ATen/native/sparse/cuda/SparseSemiStructuredTile.cu``, what
    ``torch._sparse_semi_structured_tile(use_cutlass=False)`` writes): 128 x 64 super-tiles of
    1 KiB stored column-block-major, each of two 64-column halves of four 32 x 32 tiles of 128
    bytes; inside a 32 x 32 tile, 32-bit word ``4 * (r % 8) + 2 * ((r % 32) // 16) + (c % 32)
    // 16`` holds row ``r`` in its low and row ``r + 8`` in its high 16 bits, four groups
    (``(c % 16) // 4``) per 16 bits from the least significant nibble. Rows and columns in
    blocks of 128 and 64. Not checked on an sm80 device by this project.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["ARCHS", "BLOCKS", "SPARSIFY_BLOCK", "arch_of", "decode", "encode", "group_positions",
           "meta_places", "shape_reason"]

#: Architectures whose layout is described here.
ARCHS = ("sm80", "sm90")
#: Row and column multiples each layout is defined for.
BLOCKS = {"sm80": (128, 64), "sm90": (64, 32)}
#: Rows and columns of the weight block one program of the Triton sparsify kernels owns
#: (:mod:`.sparsify`): the weights they take are multiples of it.
SPARSIFY_BLOCK = (64, 16)
#: The element types of the layout (2 bytes per value).
_DTYPES = (torch.bfloat16, torch.float16)


def arch_of(capability: tuple[int, int]) -> str | None:
    """The layout of a GPU of compute ``capability``: ``"sm90"`` for 9.x, ``"sm80"`` for 8.x,
    ``None`` for others (no layout described here)."""
    if capability[0] == 9:
        return "sm90"
    if capability[0] == 8:
        return "sm80"
    return None


def shape_reason(rows: int, cols: int, arch: str) -> str | None:
    """Why a ``[rows, cols]`` operand has no layout here (``None``: it has)."""
    block_rows, block_cols = BLOCKS[arch]
    if rows % block_rows or cols % block_cols or not rows or not cols:
        return (f"{rows}x{cols}: the {arch} layout needs rows in multiples of {block_rows} and "
                f"columns in multiples of {block_cols}")
    return None


def _check(rows: int, cols: int, arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown layout {arch!r}; known: {ARCHS}")
    reason = shape_reason(rows, cols, arch)
    if reason is not None:
        raise ValueError(reason)


@functools.lru_cache(maxsize=64)
def _places(rows: int, cols: int, arch: str) -> tuple[Tensor, Tensor]:
    """Metadata byte index and nibble shift (0 or 4) of every group, both ``[rows, cols/4]``."""
    r = torch.arange(rows, dtype=torch.int64)[:, None]
    g = torch.arange(cols // 4, dtype=torch.int64)[None, :]
    if arch == "sm90":
        g8 = g % 8
        byte = ((r // 64) * 8 * cols + (g // 8) * 256 + ((r % 64) // 16) * 64 + (r % 8) * 8
                + 2 * (g8 % 4) + g8 // 4)
        shift = torch.where(r % 16 < 8, 0, 4)
    else:
        c = 4 * g
        tile = ((c // 64) * (rows // 128) + r // 128) * 1024 + ((r % 128) // 32) * 128 \
            + ((c % 64) // 32) * 512
        word = 4 * (r % 8) + 2 * ((r % 32) // 16) + (c % 32) // 16
        nibble = (c % 16) // 4
        byte = tile + 4 * word + 2 * ((r % 16) // 8) + nibble // 2
        shift = 4 * (nibble % 2)
    byte, shift = torch.broadcast_tensors(byte, shift)
    return byte.contiguous(), shift.to(torch.uint8).contiguous()


def meta_places(rows: int, cols: int, arch: str) -> tuple[Tensor, Tensor]:
    """Where each group's nibble lives in the metadata region of a ``[rows, cols]`` operand:
    byte index (int64, counted from the region's start) and bit shift (uint8, 0 or 4), both
    ``[rows, cols / 4]``. Raises ``ValueError`` for an unknown ``arch`` or a shape the layout
    does not cover (:func:`shape_reason`)."""
    _check(rows, cols, arch)
    return _places(rows, cols, arch)


def group_positions(keep: Tensor) -> tuple[Tensor, Tensor]:
    """The two ascending positions (int64, 0-3) that name each group of ``keep`` (bool
    ``[..., 4]``, at most two kept per group: not checked here): the kept positions first, then
    the lowest free ones."""
    order = torch.argsort((~keep).to(torch.int8) * 4 + torch.arange(4, device=keep.device),
                          dim=-1, stable=True)[..., :2]
    first, second = order.sort(dim=-1).values.unbind(-1)
    return first, second


def encode(a: Tensor, arch: str, mask: Tensor | None = None, *, check: bool = True) -> Tensor:
    """The blob of ``a`` (2-D bf16/fp16, 2:4 along dim 1) in ``arch``'s layout.

    ``mask`` (bool, ``a``'s shape; at most 2 per group): compress ``where(mask, a, 0)`` and name
    each group by the mask's kept positions (what the Triton kernels write) instead of by
    ``a``'s non-zeros. Returns a ``(rows, 9 * cols / 16)`` tensor of ``a``'s dtype on ``a``'s
    device. Raises ``ValueError`` for another dtype or dim count, a shape the layout does not
    cover, or (``check``, a host sync) a group with more than two non-zeros (kept entries);
    ``check=False`` is for masks that are 2:4 by construction (the mask bank's).
    """
    if a.dim() != 2 or a.dtype not in _DTYPES:
        raise ValueError(f"encode takes a 2-D bf16/fp16 matrix, got {a.dtype} {tuple(a.shape)}")
    rows, cols = a.shape
    _check(rows, cols, arch)
    keep = (a != 0 if mask is None else mask).reshape(rows, cols // 4, 4)
    if check and bool((keep.sum(-1) > 2).any()):
        raise ValueError("a group of 4 keeps more than 2 entries: the operand is not 2:4")
    # selections on the bit patterns: float selects may rewrite NaN payloads
    groups = a.view(torch.int16).reshape(rows, cols // 4, 4)
    groups = torch.where(keep, groups, torch.zeros((), dtype=torch.int16, device=a.device))
    first, second = group_positions(keep)
    values = torch.stack([groups.gather(-1, first[..., None]),
                          groups.gather(-1, second[..., None])], dim=-1).reshape(-1)
    nibbles = (first | (second << 2)).to(torch.uint8)
    byte, shift = (t.to(a.device) for t in _places(rows, cols, arch))
    meta = torch.zeros(rows * cols // 8, dtype=torch.uint8, device=a.device)
    meta.index_put_((byte.reshape(-1),), (nibbles << shift).reshape(-1), accumulate=True)
    blob = torch.cat([values.view(torch.uint8), meta])
    return blob.view(a.dtype).view(rows, 9 * cols // 16)


def decode(blob: Tensor, rows: int, cols: int, arch: str) -> Tensor:
    """The dense ``[rows, cols]`` matrix a blob holds (inverse of :func:`encode`).

    Raises ``ValueError`` if the blob does not have ``rows * 9 * cols / 16`` elements or a
    group's nibble does not name two distinct ascending positions.
    """
    _check(rows, cols, arch)
    if blob.numel() != rows * 9 * cols // 16 or blob.dtype not in _DTYPES:
        raise ValueError(f"blob {blob.dtype} {tuple(blob.shape)} does not hold a {rows}x{cols} "
                         "bf16/fp16 operand")
    flat = blob.contiguous().reshape(-1)
    values = flat[: rows * cols // 2].reshape(rows, cols // 4, 2)
    meta = flat[rows * cols // 2:].view(torch.uint8)
    byte, shift = (t.to(blob.device) for t in _places(rows, cols, arch))
    nibbles = (meta[byte] >> shift) & 15
    first, second = (nibbles & 3).long(), (nibbles >> 2).long()
    if bool((first >= second).any()):
        raise ValueError(f"blob metadata is not a {arch} 2:4 layout (a group names positions "
                         "that are not distinct and ascending)")
    dense = torch.zeros(rows, cols // 4, 4, dtype=blob.dtype, device=blob.device)
    dense.scatter_(-1, torch.stack([first, second], dim=-1), values)
    return dense.reshape(rows, cols)
