"""S-STE's continuous pruning function and its fixed per-tensor scale.

Hu, Zhu and Chen, "S-STE: Continuous Pruning Function for Efficient 2:4 Sparse Pre-training"
(NeurIPS 2024). Hard thresholding, ``W * M``, jumps whenever the mask changes: an entry leaves
the support while it still has the magnitude of the one that replaces it. S-STE's soft
thresholding shrinks every kept entry by the largest magnitude its group prunes,

    S(W)_i = sign(W_i) * max(|W_i| - t, 0),    t = the (n+1)-th largest |W| of the group

(for 2:4 the third largest of four), so an entry enters or leaves the support at value 0 and
``S`` is continuous in ``W``. Shrinking makes the weights smaller, so the paper multiplies by
one scale per tensor, ``beta = <W, S(W)> / <S(W), S(W)>`` (the least-squares fit of ``W`` by
``beta * S(W)``), computed once, when the tensor starts training sparse, and then kept
fixed, as the paper prescribes. The straight-through estimator hands the dense ``W`` the
gradient of ``beta * S(W)`` unchanged.

The threshold is taken from a mask: ``t`` is the largest ``|W|`` the mask prunes among the
entries an entry competes with. With the row-wise top-``n`` mask (the paper's form: ``n:m``
along the GEMM's reduction dim) those are its group of ``m``, and ``t`` is exactly the paper's.
With a transposable mask (not in the paper) they are the entry's row group and column group
of its ``m x m`` tile, and ``t`` is the larger of the two largest pruned magnitudes: the
result keeps at most ``n`` per row and per column of every tile (a valid transposable
pattern, often with fewer than ``n`` non-zeros) and is continuous wherever the mask does not
change; where the transposable mask itself switches between two patterns, an entry that
leaves the support is zero only if a pruned entry of its row or column is at least as large
(always the case in a 4-cycle of the switch, not in longer ones).

NaN and +-Inf entries the mask prunes count as the largest finite magnitude (as the solvers
rank them), so the threshold stays finite; kept non-finite entries pass through, as in ``W*M``.
"""

from __future__ import annotations

import torch

from ._shapes import ranking_magnitude

__all__ = ["soft_threshold", "soft_threshold_scale"]


def _group_max(pruned: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """The max of ``pruned`` [R, C] over groups of ``m`` consecutive entries along ``dim``,
    broadcast back to [R, C]."""
    rows, cols = pruned.shape
    if dim == 1:
        return pruned.reshape(rows, cols // m, m).amax(-1, keepdim=True).expand(
            rows, cols // m, m).reshape(rows, cols)
    return pruned.reshape(rows // m, m, cols).amax(1, keepdim=True).expand(
        rows // m, m, cols).reshape(rows, cols)


def soft_threshold(weight: torch.Tensor, mask: torch.Tensor, m: int,
                   transposable: bool = False) -> torch.Tensor:
    """S-STE's soft thresholding ``S(W)`` of a 2-D ``weight`` on ``mask``, without the scale.

    Args:
        weight: ``[R, C]`` floating tensor.
        mask: bool ``[R, C]``, at most ``n`` kept in every group of ``m`` along dim 1 (and,
            with ``transposable``, along dim 0 too: every ``m x m`` tile).
        m: the group size.
        transposable: take the threshold over the row and the column group of each entry.

    Returns ``[R, C]`` in ``weight``'s dtype, zero outside ``mask``. Raises ``ValueError`` for
    shapes the groups do not divide or a mask of another shape or dtype. Plain torch ops with
    no data-dependent control flow: the backend traces it into training graphs.
    """
    if weight.dim() != 2 or mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(f"soft_threshold needs a 2-D weight and a bool mask of its shape, got "
                         f"{tuple(weight.shape)} and {mask.dtype} {tuple(mask.shape)}")
    rows, cols = weight.shape
    if cols % m or (transposable and rows % m):
        raise ValueError(f"shape {tuple(weight.shape)}: groups of m={m} must divide the "
                         f"columns{' and rows' if transposable else ''}")
    magnitude = ranking_magnitude(weight, weight.dtype)
    pruned = torch.where(mask, torch.zeros((), dtype=weight.dtype, device=weight.device),
                         magnitude)
    threshold = _group_max(pruned, m, 1)
    if transposable:
        threshold = torch.maximum(threshold, _group_max(pruned, m, 0))
    shrunk = torch.sign(weight) * torch.clamp_min(weight.abs() - threshold, 0)
    return torch.where(mask, shrunk, torch.zeros((), dtype=weight.dtype, device=weight.device))


def soft_threshold_scale(weight: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """S-STE's per-tensor scale ``beta = <W, S> / <S, S>`` (float32, 0-d, on ``weight``'s
    device), the least-squares fit of ``weight`` by ``beta * soft``; 1 when ``soft`` is all
    zero or the sums are not finite. Computed in float64."""
    w, s = weight.detach().double(), soft.detach().double()
    num, den = (w * s).sum(), (s * s).sum()
    ok = (den > 0) & torch.isfinite(num) & torch.isfinite(den)
    beta = torch.where(ok, num / torch.where(ok, den, 1.0), 1.0)
    return beta.float()
