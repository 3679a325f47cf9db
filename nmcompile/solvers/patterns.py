"""Exact transposable N:M masks by exhaustive pattern search (small ``m``).

A transposable mask keeps at most ``n`` entries in every row and every column of each
``m x m`` tile, so the same mask is N:M along both dims of the weight: it accelerates the
forward GEMM (reduction over in-features) and the grad-input GEMM (reduction over
out-features) alike. For ``m <= 4`` the admissible tile patterns can be listed: every tile is
scored against all of them by one matmul and the argmax is exact.

"At most n" (the default) lists only the *maximal* admissible patterns (no entry can be added
without breaking a row or column budget): with non-negative scores one of them is always
optimal, and it can keep more magnitude than any exactly-n pattern. For 2:4 that is 186
patterns (90 with eight entries, 96 with seven); ``exact_n=True`` lists the 90 patterns with
exactly two per row and column.

Plain torch ops, no data-dependent control flow: the backend traces this into the training
graph so Inductor generates its kernel, on CPU and CUDA alike.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch

from ._shapes import as_matrix, check_ratio, check_tiles

__all__ = ["MAX_PATTERN_M", "tile_patterns", "transposable_mask_patterns"]

#: Largest ``m`` whose tile patterns are enumerated (2**(m*m) candidates).
MAX_PATTERN_M = 4


@functools.lru_cache(maxsize=None)
def tile_patterns(n: int, m: int, exact_n: bool = False) -> np.ndarray:
    """All admissible ``m x m`` 0/1 tile patterns, shape ``[P, m*m]`` (row-major), dtype bool.

    ``exact_n=False``: the maximal patterns with at most ``n`` per row and column.
    ``exact_n=True``: the patterns with exactly ``n`` per row and column.
    Patterns are ordered by their row-major bit code, so ties are broken reproducibly.
    """
    check_ratio(n, m)
    if m > MAX_PATTERN_M:
        raise ValueError(
            f"pattern enumeration supports m <= {MAX_PATTERN_M}, got {n}:{m}; "
            "use the min-cost-flow or greedy solver for larger m"
        )
    rows = [r for r in itertools.product((0, 1), repeat=m) if sum(r) <= n]
    cand = np.array(list(itertools.product(rows, repeat=m)), dtype=np.int64)  # [K, m, m]
    row_sum, col_sum = cand.sum(axis=2), cand.sum(axis=1)
    ok = (col_sum <= n).all(axis=1)
    if exact_n:
        ok &= (row_sum == n).all(axis=1) & (col_sum == n).all(axis=1)
    else:
        # Maximal: no empty cell whose row and column both still have room.
        room = (row_sum[:, :, None] < n) & (col_sum[:, None, :] < n) & (cand == 0)
        ok &= ~room.any(axis=(1, 2))
    flat = cand[ok].reshape(-1, m * m)
    codes = flat @ (1 << np.arange(m * m - 1, -1, -1))
    return flat[np.argsort(codes, kind="stable")].astype(bool)


def transposable_mask_patterns(
    w: torch.Tensor, n: int = 2, m: int = 4, exact_n: bool = False
) -> torch.Tensor:
    """Max-magnitude transposable N:M mask of ``w`` (tile ``(i, j)`` = ``w[i*m:(i+1)*m, j*m:(j+1)*m]``).

    Exact: the result keeps the largest total ``|w|`` over all admissible patterns of each
    tile. NaN entries count as zero magnitude. Weights with more than two dims are flattened
    as in :func:`nmcompile.solvers._shapes.as_matrix`; the mask has ``w``'s shape.
    """
    check_ratio(n, m)
    w2d = as_matrix(w)
    check_tiles(w2d, m)
    rows, cols = w2d.shape
    table = torch.as_tensor(tile_patterns(n, m, exact_n), device=w.device)  # [P, m*m] bool
    score_dtype = torch.promote_types(w.dtype, torch.float32)
    magnitude = torch.nan_to_num(w2d.detach().abs().to(score_dtype), nan=0.0)
    tiles = magnitude.reshape(rows // m, m, cols // m, m).permute(0, 2, 1, 3)
    tiles = tiles.reshape(-1, m * m)
    best = (tiles @ table.to(score_dtype).t()).argmax(dim=1)
    mask = table[best].reshape(rows // m, cols // m, m, m).permute(0, 2, 1, 3)
    return mask.reshape(w.shape)
