"""Shape checks shared by the mask solvers."""

from __future__ import annotations

import torch

__all__ = ["as_matrix", "check_ratio", "check_tiles", "ranking_magnitude"]


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
    """View ``w`` as the 2-D matrix its GEMM uses.

    A 2-D weight is returned as is. A weight with more dimensions (a convolution kernel
    ``[out, in, kh, kw]``, a stacked projection) is flattened to ``[shape[0], prod(shape[1:])]``:
    rows are output channels and the reduction runs over everything else, which is how the
    convolution's implicit GEMM reads it. 0-D and 1-D tensors are rejected.
    """
    if w.dim() < 2:
        raise ValueError(f"a mask needs a tensor with at least 2 dims, got shape {tuple(w.shape)}")
    return w if w.dim() == 2 else w.reshape(w.shape[0], -1)


def check_tiles(w2d: torch.Tensor, m: int) -> None:
    """Raise ``ValueError`` unless both dims of ``w2d`` are multiples of ``m``."""
    rows, cols = w2d.shape
    if rows % m or cols % m:
        raise ValueError(
            f"shape {tuple(w2d.shape)} is not divisible into {m}x{m} tiles: "
            f"both dims must be multiples of m={m}"
        )
