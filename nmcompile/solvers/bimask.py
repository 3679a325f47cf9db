"""Bi-Mask backward masks (Zhang et al., 2023): N:M along out-features after a channel permutation.

The forward GEMM ``Y = X W^T`` reduces over in-features and uses the forward mask ``F`` (N:M
along dim 1 of ``W [out, in]``). The grad-input GEMM ``dX = dY W`` reduces over out-features,
so its sparse operand must be N:M along dim 0. Bi-Mask gives it its own mask ``B`` instead of
forcing one transposable mask on both. Permuting the output channels does not change ``dX``::

    dX = dY (W * mask) = dY[:, perm] (W[perm] * mask[perm])

(the sum over out-features is the same sum in another order), so ``B`` only needs to be N:M
along dim 0 of the *row-permuted* weight ``W[perm]``: every group of ``m`` consecutive rows of
``W[perm]`` keeps at most ``n`` per column. The backward GEMM multiplies by ``F and B``, so
the objective is the kept magnitude ``sum(|W| * (F & B))``; for a fixed permutation the best
``B`` keeps, in each group and column, the ``n`` rows with the largest ``|W| * F``.

The permutation only matters through the partition of rows into groups of ``m``.
``method="random"`` is the paper's search: draw ``candidates`` random permutations, keep the
best. ``method="optimized"`` starts from that best candidate and improves it by exact
assignment moves (OR-Tools ``SimpleLinearSumAssignment``): take one row out of each of several
groups and give the rows back, one per group, in the best way. The current placement is one of
the assignments, and a move is applied only if it raises the real-valued objective, so the
result never keeps less than ``random`` with the same ``candidates`` and ``generator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from ortools.graph.python import linear_sum_assignment

from ._shapes import as_matrix, check_ratio, from_matrix, ranking_magnitude
from .nm import nm_mask

__all__ = ["BiMask", "bimask", "bimask_shape_reason"]

#: Groups exchanging rows in one assignment move (cost matrix ``MOVE_GROUPS**2 x in``).
MOVE_GROUPS = 64
#: Integer resolution of the assignment costs (moves are re-checked in floating point).
_COST_LEVELS = 1 << 30


class BiMask(NamedTuple):
    """Backward mask ``F & B`` in the original row order, and the permutation ``B`` is N:M under.

    ``mask[perm]`` keeps at most ``n`` per column in every group of ``m`` consecutive rows.
    """

    mask: torch.Tensor
    perm: torch.Tensor


def bimask_shape_reason(shape: Sequence[int], m: int) -> str | None:
    """Why :func:`bimask` cannot take a weight of ``shape`` (its out dim 0 is no multiple of
    ``m``: the backward mask groups whole rows ``m`` at a time), or ``None`` if it can."""
    if shape[0] % m:
        return f"Bi-Mask needs out-channels that are a multiple of m={m}, got {shape[0]}"
    return None


def bimask(
    w: torch.Tensor,
    n: int,
    m: int,
    candidates: int = 32,
    method: Literal["random", "optimized"] = "random",
    forward_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    sweeps: int = 3,
) -> BiMask:
    """Bi-Mask backward mask of ``w [out, in]``: returns ``BiMask(F & B, perm)``.

    ``forward_mask`` (``F``) defaults to :func:`nm_mask` of ``w`` (N:M along in-features); the
    returned mask is ``F & B`` and so is a subset of ``F``. ``perm`` is a LongTensor
    permutation of ``range(out)`` (``out`` must be a multiple of ``m``). ``candidates`` random
    permutations are drawn with ``generator``; ``method="optimized"`` then runs up to
    ``sweeps`` rounds of assignment moves. Weights with more than two dims are flattened as in
    :func:`nmcompile.solvers._shapes.as_matrix`.
    """
    check_ratio(n, m)
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if method not in ("random", "optimized"):
        raise ValueError(f"unknown method {method!r}; expected 'random' or 'optimized'")
    w2d = as_matrix(w).detach()
    if bimask_shape_reason(w.shape, m) is not None:
        raise ValueError(f"shape {tuple(w.shape)}: dim 0 must be a multiple of m={m}")
    if forward_mask is None:
        fwd = nm_mask(w2d, n, m)
    else:
        if forward_mask.shape != w.shape:
            raise ValueError(f"forward_mask shape {tuple(forward_mask.shape)} != {tuple(w.shape)}")
        fwd = as_matrix(forward_mask).bool()
    value = ranking_magnitude(w2d, torch.float64).clamp_(max=1e30) * fwd
    value = value.cpu()
    perm = _random_search(value, n, m, candidates, generator)
    if method == "optimized":
        perm = _local_search(value, n, m, perm, sweeps)
    backward = _backward_mask(value, n, m, perm).to(w.device)
    return BiMask(from_matrix(fwd & backward, w.shape), perm.to(w.device))


def _kept_value(value: torch.Tensor, n: int, m: int, perm: torch.Tensor) -> torch.Tensor:
    """``sum(value * B)`` for the best ``B`` under ``perm`` (top-``n`` per group and column)."""
    groups = value[perm].reshape(-1, m, value.shape[1])
    return groups.topk(n, dim=1).values.sum()


def _backward_mask(value: torch.Tensor, n: int, m: int, perm: torch.Tensor) -> torch.Tensor:
    """``B`` in the original row order: top-``n`` of ``value`` per group of ``perm`` and column."""
    permuted = nm_mask(value[perm].t(), n, m).t()  # groups of m rows of value[perm]
    mask = torch.empty_like(permuted)
    mask[perm] = permuted
    return mask


def _random_search(value, n, m, candidates, generator) -> torch.Tensor:
    """The paper's search: the best of ``candidates`` random permutations."""
    best, best_score = None, -1.0
    for _ in range(candidates):
        perm = torch.randperm(value.shape[0], generator=generator)
        score = float(_kept_value(value, n, m, perm))
        if score > best_score:
            best, best_score = perm, score
    return best


def _local_search(value, n, m, perm, sweeps) -> torch.Tensor:
    """Improve ``perm`` by assignment moves; the objective never decreases."""
    groups = perm.reshape(-1, m).clone()  # row ids, one group per line
    gen = torch.Generator().manual_seed(0)
    for _ in range(sweeps):
        improved = False
        order = torch.randperm(groups.shape[0], generator=gen)
        for block in order.split(MOVE_GROUPS):
            if block.numel() < 2:
                continue
            for slot in range(m):
                improved |= _assignment_move(value, n, groups, block, slot)
        if not improved:
            break
    return groups.reshape(-1)


def _assignment_move(value, n, groups, block, slot) -> bool:
    """Re-assign the ``slot``-th row of each group in ``block``, one row per group, optimally.

    With the other ``m - 1`` rows of group ``g`` fixed, its kept value after receiving row
    ``r`` is ``sum_j top_n(rest_gj) + relu(value_rj - nth_largest(rest_gj))``: a linear
    assignment between moving rows and groups. Applied only if the true objective rises.
    """
    members = groups[block]  # [K, m]
    keep_cols = [s for s in range(groups.shape[1]) if s != slot]
    rest = value[members[:, keep_cols]]  # [K, m-1, in]
    top = rest.topk(n, dim=1).values  # [K, n, in]
    base, nth = top.sum(dim=(1, 2)), top[:, -1, :]  # [K], [K, in]
    movers = value[members[:, slot]]  # [K, in]
    gain = (movers[:, None, :] - nth[None, :, :]).clamp_min(0).sum(dim=2)  # [row, group]
    old = (base + gain.diagonal()).sum()
    scale = float(gain.max())
    if scale <= 0.0:
        return False
    costs = np.rint(-gain.numpy() / scale * _COST_LEVELS).astype(np.int64)
    k = costs.shape[0]
    solver = linear_sum_assignment.SimpleLinearSumAssignment()
    solver.add_arcs_with_cost(np.repeat(np.arange(k), k), np.tile(np.arange(k), k),
                              costs.reshape(-1))
    status = solver.solve()
    if status != solver.OPTIMAL:
        raise RuntimeError(f"assignment move failed: {getattr(status, 'name', status)}")
    to_group = torch.as_tensor([solver.right_mate(i) for i in range(k)])
    new = (base[to_group] + gain[torch.arange(k), to_group]).sum()
    if new <= old:
        return False
    groups[block[to_group], slot] = members[:, slot]
    return True
