"""Exact transposable N:M masks for any ``m`` by min-cost flow (OR-Tools).

Finding the max-magnitude transposable mask of one ``m x m`` tile is a bipartite b-matching:
every row may keep ``n`` entries, every column may keep ``n``, entry ``(i, j)`` is worth
``|w_ij|``. As a flow: source -> row (capacity ``n``) -> column (capacity 1, cost ``-|w_ij|``)
-> sink (capacity ``n``). Every tile of the tensor goes into ONE flow problem, built from numpy
arrays (no Python loop over tiles). The tiles are independent, so a layer is cut into blocks of
tile rows of about :data:`TILES_PER_SOLVE` tiles, one flow problem each: OR-Tools solves many
small problems several times faster than one big one (its cost scaling grows with the size of
the graph), and the cost arrays of one block stay small.

*At most n* (the default) must let the total flow float: an optimum keeping fewer than
``n * m`` entries can beat every exactly-``n`` pattern. Each tile gets a zero-cost slack node
(row -> slack -> column) that carries the units a row or column does not keep.
``exact_n=True`` leaves the slack out, which forces exactly ``n`` per row and column.

Costs are integers: magnitudes are scaled by :func:`magnitude_costs` (documented there); the
result is unchanged when ``w`` is multiplied by any positive constant.

This solver runs outside the compiled graph (it calls into OR-Tools on the CPU).
"""

from __future__ import annotations

import numpy as np
import torch
from ortools.graph.python import min_cost_flow

from ._shapes import as_matrix, check_ratio, check_tiles, from_matrix

__all__ = ["COST_LEVELS", "TILES_PER_SOLVE", "magnitude_costs", "transposable_mask_mcf"]

#: Integer cost given to the largest finite magnitude (and to NaN, +-Inf); 2**30 keeps a relative
#: resolution of ~1e-9 while every path cost, times OR-Tools' cost-scaling factor
#: (number of nodes + 1), stays far below 2**63.
COST_LEVELS = 1 << 30

#: Tiles per flow problem. 4096x4096 4:8 on the shared 2-core CPU at load ~4.5: blocks of 256
#: tiles 14 s, of 1024 tiles 19 s, of 4096 tiles 16 s (one problem: 26 s at load ~4). The
#: optimum is the same whatever the blocks: the tiles are independent.
TILES_PER_SOLVE = 256


def magnitude_costs(magnitude: np.ndarray, levels: int = COST_LEVELS) -> np.ndarray:
    """Integer costs ``round(|x| / max|x| * levels)`` as int64, invariant to scaling ``x``.

    The scale is relative to the largest *finite* magnitude, so multiplying the weight by a
    positive constant (1e-6, 1e6) leaves the costs unchanged up to floating-point rounding
    of the ratio. NaN and +-Inf get ``levels`` (tied with the largest finite value), so that
    a non-finite weight is kept like the largest ones without overflowing the integer costs.
    An all-zero input gives all-zero costs.
    """
    mag = np.abs(np.asarray(magnitude, dtype=np.float64))
    finite = np.isfinite(mag)
    top = mag[finite].max() if finite.any() else 0.0
    return _scaled_costs(mag, top, levels)


def _scaled_costs(mag: np.ndarray, top: float, levels: int) -> np.ndarray:
    """:func:`magnitude_costs` of non-negative ``mag`` given its largest finite value ``top``."""
    finite = np.isfinite(mag)  # NaN and +-Inf alike
    if top > 0.0:
        scaled = np.where(finite, mag / top, 1.0) * levels
    else:
        scaled = np.where(finite, 0.0, float(levels))
    return np.rint(scaled).astype(np.int64)


def _largest_finite(w2d: torch.Tensor) -> float:
    """Largest finite ``|w|`` (0.0 if none), the scale of every block's costs."""
    mag = torch.nan_to_num(w2d.detach().abs(), nan=0.0, posinf=0.0)  # max is exact in any dtype
    return float(mag.max()) if mag.numel() else 0.0


def _tile_costs(block: torch.Tensor, m: int, top: float) -> np.ndarray:
    """Costs of a block of tile rows as ``[tiles, m, m]`` (tile-major, tile rows, tile cols)."""
    rows, cols = block.shape
    mag = block.detach().to(device="cpu", dtype=torch.float64).abs().numpy()
    tiles = mag.reshape(rows // m, m, cols // m, m).transpose(0, 2, 1, 3)
    return _scaled_costs(tiles.reshape(-1, m, m), top, COST_LEVELS)


def _build_flow(costs: np.ndarray, n: int, exact_n: bool):
    """One flow problem for every tile. Returns the solver and the row->col arc ids.

    Rows supply ``n`` units and columns demand ``n`` (no global source or sink: hub nodes with
    millions of arcs slow the solver down). For at-most-n each tile gets a zero-cost slack
    node: row -> slack -> column carries the units a row or column does not keep.
    """
    n_tiles, m, _ = costs.shape
    per_tile = 2 * m + (0 if exact_n else 1)
    base = per_tile * np.arange(n_tiles, dtype=np.int64)[:, None]
    row_nodes = base + np.arange(m)  # [T, m]
    col_nodes = base + m + np.arange(m)  # [T, m]
    tails = [np.repeat(row_nodes.reshape(-1), m)]
    heads = [np.broadcast_to(col_nodes[:, None, :], (n_tiles, m, m)).reshape(-1)]
    caps = [np.ones(n_tiles * m * m, dtype=np.int64)]
    unit_costs = [-costs.reshape(-1)]
    if not exact_n:
        slack = np.broadcast_to(base + 2 * m, (n_tiles, m)).reshape(-1)
        tails += [row_nodes.reshape(-1), slack]
        heads += [slack, col_nodes.reshape(-1)]
        caps += [np.full(2 * n_tiles * m, n, dtype=np.int64)]
        unit_costs += [np.zeros(2 * n_tiles * m, dtype=np.int64)]
    solver = min_cost_flow.SimpleMinCostFlow()
    arcs = solver.add_arcs_with_capacity_and_unit_cost(
        np.concatenate(tails).astype(np.int32), np.concatenate(heads).astype(np.int32),
        np.concatenate(caps), np.concatenate(unit_costs).astype(np.int64),
    )
    nodes = np.concatenate([row_nodes.reshape(-1), col_nodes.reshape(-1)]).astype(np.int32)
    supplies = np.repeat(np.array([n, -n], dtype=np.int64), n_tiles * m)
    solver.set_nodes_supplies(nodes, supplies)
    return solver, np.asarray(arcs)[: n_tiles * m * m]


def transposable_mask_mcf(
    w: torch.Tensor, n: int, m: int, exact_n: bool = False
) -> torch.Tensor:
    """Max-magnitude transposable N:M mask of ``w`` for any ``n:m``, by min-cost flow.

    Tile ``(i, j)`` is ``w[i*m:(i+1)*m, j*m:(j+1)*m]``; the mask keeps at most (``exact_n``:
    exactly) ``n`` entries per row and per column of every tile, maximising the kept
    (integer-scaled) magnitude. Weights with more than two dims are flattened as in
    :func:`nmcompile.solvers._shapes.as_matrix`; the mask has ``w``'s shape and device.
    Raises ``RuntimeError`` naming the status if OR-Tools does not report OPTIMAL.
    """
    check_ratio(n, m)
    w2d = as_matrix(w)
    check_tiles(w, m)
    rows, cols = w2d.shape
    top = _largest_finite(w2d)
    block_rows = m * max(1, TILES_PER_SOLVE // (cols // m))
    kept = np.empty((rows, cols), dtype=bool)
    for start in range(0, rows, block_rows):
        block = w2d[start:start + block_rows]
        kept[start:start + block.shape[0]] = _solve_block(block, n, m, exact_n, top)
    return from_matrix(torch.from_numpy(kept).to(w.device), w.shape)


def _solve_block(block: torch.Tensor, n: int, m: int, exact_n: bool, top: float) -> np.ndarray:
    """Optimal boolean mask of one block of tile rows, as a numpy array of its shape."""
    rows, cols = block.shape
    solver, match_arcs = _build_flow(_tile_costs(block, m, top), n, exact_n)
    status = solver.solve()
    if status != solver.OPTIMAL:
        name = getattr(status, "name", str(status))
        raise RuntimeError(f"min-cost flow for a {n}:{m} transposable mask failed: {name}")
    kept = np.asarray(solver.flows(match_arcs)) > 0
    return kept.reshape(rows // m, cols // m, m, m).transpose(0, 2, 1, 3).reshape(rows, cols)
