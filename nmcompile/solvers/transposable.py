"""One entry point for transposable N:M masks, choosing among the solvers.

A transposable mask keeps at most ``n`` entries in every row and every column of each true
``m x m`` tile of ``W`` (tile ``(i, j)`` = ``W[i*m:(i+1)*m, j*m:(j+1)*m]``), so both ``W`` and
``W^T`` are N:M along their reduction dims: one mask serves the forward GEMM and the
grad-input GEMM. The solvers trade speed for optimality:

========== ===================================== ============== ==========================
method     algorithm                              optimal        where
========== ===================================== ============== ==========================
patterns   best admissible pattern per tile       yes            ``m <= 4``; C kernel on CPU
mcf        one min-cost flow over all tiles       yes (integer   any ``m``; OR-Tools, CPU
                                                  costs, 2**30
                                                  levels)
greedy     descending magnitude, keep if room     >= 1/2         any ``m``; traceable
auto       patterns if ``m <= 4`` else mcf        yes
========== ===================================== ============== ==========================
"""

from __future__ import annotations

from typing import Literal

import torch

from ._shapes import check_ratio, check_tiles
from .greedy import transposable_mask_greedy
from .mcf import transposable_mask_mcf
from .patterns import MAX_PATTERN_M, transposable_mask_patterns

__all__ = ["METHODS", "transposable_mask"]

Method = Literal["auto", "mcf", "patterns", "greedy"]
METHODS: tuple[str, ...] = ("auto", "mcf", "patterns", "greedy")


def transposable_mask(
    w: torch.Tensor, n: int, m: int, method: Method = "auto", exact_n: bool = False
) -> torch.Tensor:
    """Transposable N:M mask of ``w`` maximising the kept ``|w|`` (boolean, ``w``'s shape).

    ``exact_n=False`` keeps at most ``n`` per row and column of each tile (an optimum may keep
    fewer, and can beat every exactly-``n`` pattern); ``exact_n=True`` keeps exactly ``n``.
    ``method="auto"`` picks the fastest exact solver for the ratio. ``greedy`` cannot promise
    exactly ``n`` and rejects ``exact_n=True``. NaN and +-Inf count as the largest finite
    magnitude, in every method; the mask is always admissible. Shapes whose (flattened) dims
    are not multiples of ``m`` raise ``ValueError``.
    """
    check_ratio(n, m)
    check_tiles(w, m)
    if method == "auto":
        method = "patterns" if m <= MAX_PATTERN_M else "mcf"
    if method == "patterns":
        return transposable_mask_patterns(w, n, m, exact_n)
    if method == "mcf":
        return transposable_mask_mcf(w, n, m, exact_n)
    if method == "greedy":
        if exact_n:
            raise ValueError("method='greedy' cannot guarantee exactly n per row and column; "
                             "use 'mcf' or 'patterns' with exact_n=True")
        return transposable_mask_greedy(w, n, m)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
