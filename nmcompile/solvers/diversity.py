"""Mask diversity: how many admissible N:M masks one block allows (Hubara et al., 2021).

Hubara et al. use the number of admissible masks of a block as a proxy for how much accuracy
a sparsity constraint costs. The block here is one ``m x m`` tile of the weight, the unit both
constraints are stated on, so the two kinds are directly comparable:

* ``row``: each of the ``m`` rows of the tile independently keeps ``n`` of its ``m`` entries
  (plain N:M along the reduction dim): ``C(m, n) ** m`` masks (1296 for 2:4).
* ``transposable``: every row AND every column of the tile keeps exactly ``n``: the number of
  ``m x m`` 0/1 matrices with all row and column sums equal to ``n`` (90 for 2:4).

Both count masks with exactly ``n`` per group, as Hubara et al. do.
"""

from __future__ import annotations

import functools
from math import comb
from typing import Literal

from ._shapes import check_ratio

__all__ = ["mask_diversity"]


def mask_diversity(n: int, m: int, kind: Literal["row", "transposable"] = "row") -> int:
    """Exact number of admissible masks of one ``m x m`` tile (a Python int, no overflow)."""
    check_ratio(n, m)
    if kind == "row":
        return comb(m, n) ** m
    if kind == "transposable":
        # Fill rows one by one; the state is how many columns still need 0, 1, ..., n entries.
        start = tuple(m if need == n else 0 for need in range(n + 1))
        return _count_fillings(start, m, n)
    raise ValueError(f"unknown kind {kind!r}; expected 'row' or 'transposable'")


@functools.cache
def _count_fillings(need: tuple[int, ...], rows_left: int, n: int) -> int:
    """Ways to fill ``rows_left`` rows with ``n`` ones each so every column gets what it needs.

    ``need[k]`` is the number of columns still needing ``k`` more ones. A row takes ``x[k]``
    columns from each class ``k >= 1`` (``sum(x) == n``); those columns move to class ``k-1``.
    """
    if rows_left == 0:
        return int(all(count == 0 for k, count in enumerate(need) if k > 0))
    total = 0
    for take in _splits(need, n):
        ways, nxt = 1, list(need)
        for k, x in enumerate(take):
            if x:
                ways *= comb(need[k], x)
                nxt[k] -= x
                nxt[k - 1] += x
        total += ways * _count_fillings(tuple(nxt), rows_left - 1, n)
    return total


def _splits(need: tuple[int, ...], n: int, k: int = 1) -> list[tuple[int, ...]]:
    """All ``x`` (indexed by class, ``x[0] == 0``) with ``x[k] <= need[k]`` and ``sum(x) == n``."""
    if k == len(need):
        return [(0,) * len(need)] if n == 0 else []
    out = []
    for x in range(min(n, need[k]) + 1):
        for rest in _splits(need, n - x, k + 1):
            out.append(rest[:k] + (x,) + rest[k + 1:])
    return out
