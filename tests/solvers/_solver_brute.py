"""Independent references for the solver tests: brute force and CP-SAT, written apart from the
library (no import from nmcompile.solvers)."""

from __future__ import annotations

import functools
import itertools

import numpy as np
from ortools.sat.python import cp_model


@functools.cache
def all_tile_masks(n: int, m: int, exact_n: bool) -> np.ndarray:
    """Every m x m 0/1 matrix with <= n (or == n) per row and column, as [K, m*m] float64."""
    bits = np.array(list(itertools.product((0, 1), repeat=m * m)), dtype=np.int8)
    cube = bits.reshape(-1, m, m)
    rs, cs = cube.sum(axis=2), cube.sum(axis=1)
    ok = (rs == n).all(1) & (cs == n).all(1) if exact_n else (rs <= n).all(1) & (cs <= n).all(1)
    return bits[ok].astype(np.float64)


def tiles_of(a: np.ndarray, m: int) -> np.ndarray:
    """[T, m, m] tiles of a 2-D array, tile (i, j) = a[i*m:(i+1)*m, j*m:(j+1)*m], row-major."""
    r, c = a.shape
    return a.reshape(r // m, m, c // m, m).transpose(0, 2, 1, 3).reshape(-1, m, m)


def brute_best(tile_mag: np.ndarray, n: int, m: int, exact_n: bool) -> np.ndarray:
    """Best kept magnitude of each tile by enumerating every admissible mask (m <= 4)."""
    masks = all_tile_masks(n, m, exact_n)
    return (tile_mag.reshape(-1, m * m) @ masks.T).max(axis=1)


def cpsat_best(tile_int: np.ndarray, n: int, exact_n: bool) -> int:
    """Best kept integer magnitude of ONE tile by CP-SAT (any m)."""
    m = tile_int.shape[0]
    model = cp_model.CpModel()
    x = [[model.new_bool_var(f"x{i}_{j}") for j in range(m)] for i in range(m)]
    for i in range(m):
        row, col = sum(x[i]), sum(x[k][i] for k in range(m))
        model.add(row == n if exact_n else row <= n)
        model.add(col == n if exact_n else col <= n)
    model.maximize(sum(int(tile_int[i, j]) * x[i][j] for i in range(m) for j in range(m)))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    assert solver.solve(model) == cp_model.OPTIMAL
    return int(round(solver.objective_value))


def brute_row_best(group_mag: np.ndarray, n: int) -> np.ndarray:
    """Best kept magnitude of each group (last dim) over every n-subset."""
    m = group_mag.shape[-1]
    subsets = [list(s) for s in itertools.combinations(range(m), n)]
    return np.stack([group_mag[..., s].sum(-1) for s in subsets], axis=-1).max(axis=-1)


def count_masks(n: int, m: int, exact_n: bool = True) -> int:
    """Number of m x m 0/1 matrices with n per row and column, by enumeration."""
    return len(all_tile_masks(n, m, exact_n))
