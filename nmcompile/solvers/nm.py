"""Row-wise N:M masks: the top-``n`` magnitudes in every group of ``m`` along the last dim.

This is the mask inference-time 2:4 pruning uses. It accelerates only the GEMM that reduces
over the last dim (the forward GEMM of ``nn.Linear``); a transposable mask
(:mod:`nmcompile.solvers.patterns`) is needed to accelerate the grad-input GEMM too.

Written with plain torch ops and no data-dependent control flow, so the backend can trace it
into the training graph and let Inductor generate its kernel.
"""

from __future__ import annotations

import torch

from ._shapes import check_ratio, ranking_magnitude

__all__ = ["nm_mask"]


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-magnitude entries of each group of ``m``.

    Groups are ``m`` consecutive elements along the last dim, which must be a multiple of
    ``m``. Exactly ``n`` entries of every group are kept (ties broken by ``torch.topk``); NaN
    and +-Inf entries count as the largest finite magnitude
    (:func:`nmcompile.solvers._shapes.ranking_magnitude`): a diverged weight is kept, and
    shows in the outputs as a dense step would show it.
    """
    check_ratio(n, m)
    if w.dim() < 1 or w.shape[-1] % m:
        raise ValueError(
            f"shape {tuple(w.shape)}: the last dim must be a multiple of m={m} for {n}:{m} groups"
        )
    groups = w.detach().reshape(*w.shape[:-1], w.shape[-1] // m, m)
    magnitude = ranking_magnitude(groups)
    keep = magnitude.topk(n, dim=-1).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=w.device).scatter(-1, keep, True)
    return mask.reshape(w.shape)
