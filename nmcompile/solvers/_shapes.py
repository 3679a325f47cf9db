"""Shape checks shared by the mask solvers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["as_matrix", "check_ratio", "check_tiles", "from_matrix", "ranking_magnitude"]


def ranking_magnitude(w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``|w|`` in ``dtype`` as every solver ranks it: NaN and +-Inf count as the dtype's largest
    finite value, so a non-finite weight is kept like the largest ones (a diverged weight shows
    in the outputs, as a dense step shows it, instead of being masked away) and every sum of
    magnitudes stays finite. A fresh contiguous tensor (one copy of ``w``)."""
    largest = torch.finfo(dtype).max
    magnitude = w.detach().to(dtype, copy=True, memory_format=torch.contiguous_format).abs_()
    return magnitude.nan_to_num_(nan=largest, posinf=largest)


def check_ratio(n: int, m: int) -> None:
    """Raise ``ValueError`` unless ``0 < n < m`` are integers."""
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (n, m)):
        raise ValueError(f"n and m must be integers, got n={n!r}, m={m!r}")
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < n < m, got n={n}, m={m}")


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """View ``w`` as the 2-D matrix its N:M groups and tiles are laid out in.

    A 2-D weight is returned as is. A weight with more dims is a convolution kernel
    ``[out, in/groups, *kernel]`` (1-D, 2-D or 3-D convolutions): it becomes
    ``[out, prod(kernel) * in/groups]`` with the input channels innermost, so every ``[out, in]``
    slice at a fixed kernel position ``(i, j)`` is a block of ``in/groups`` consecutive columns.
    A row-wise N:M group is then ``m`` input channels at one kernel position, and an ``m x m``
    tile is ``m`` output by ``m`` input channels at one kernel position: the layout NVIDIA's
    ASP and TensorRT's sparse convolutions use (implicit GEMM in channels-last order), provided
    ``in/groups`` is a multiple of ``m``. :func:`from_matrix` undoes it. 0-D and 1-D tensors
    are rejected.
    """
    if w.dim() < 2:
        raise ValueError(f"a mask needs a tensor with at least 2 dims, got shape {tuple(w.shape)}")
    return w if w.dim() == 2 else w.movedim(1, -1).reshape(w.shape[0], -1)


def from_matrix(w2d: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The contiguous tensor of ``shape`` whose :func:`as_matrix` is ``w2d`` (a mask back in its
    weight's layout)."""
    if len(shape) == 2:
        return w2d.reshape(shape)
    return w2d.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1).contiguous()


def check_tiles(w: torch.Tensor, m: int) -> None:
    """Raise ``ValueError`` unless ``w``'s out and in dims (0 and 1; for a convolution kernel
    its out- and per-group in-channels) are multiples of ``m``: a 2-D weight divides into
    ``m x m`` tiles, a kernel into tiles at each kernel position (:func:`as_matrix`)."""
    rows, cols = w.shape[0], w.shape[1]
    if rows % m or cols % m:
        which = "both dims" if w.dim() == 2 else "dims 0 and 1 (out- and in-channels)"
        raise ValueError(
            f"shape {tuple(w.shape)} is not divisible into {m}x{m} tiles: "
            f"{which} must be multiples of m={m}"
        )
