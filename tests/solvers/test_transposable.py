"""Transposable N:M masks: validity, optimality against independent references, scaling."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from _solver_brute import brute_best, cpsat_best, tiles_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from nmcompile.solvers import (
    as_matrix,
    from_matrix,
    transposable_mask,
    transposable_mask_greedy,
    transposable_mask_mcf,
    transposable_mask_patterns,
)
from nmcompile.solvers import mcf as mcf_module
from nmcompile.solvers.mcf import COST_LEVELS, magnitude_costs

EXACT = ("mcf", "patterns")


def tile_counts(mask: torch.Tensor, m: int) -> tuple[np.ndarray, np.ndarray]:
    t = tiles_of(mask.reshape(mask.shape[0], -1).numpy().astype(np.int64), m)
    return t.sum(axis=2), t.sum(axis=1)


def assert_admissible(mask: torch.Tensor, w: torch.Tensor, n: int, m: int, exact_n: bool):
    assert mask.dtype == torch.bool and mask.shape == w.shape
    rows, cols = tile_counts(mask, m)
    if exact_n:
        assert (rows == n).all() and (cols == n).all()
    else:
        assert (rows <= n).all() and (cols <= n).all()


def kept_per_tile(mask: torch.Tensor, mag: np.ndarray, m: int) -> np.ndarray:
    return (tiles_of(mag, m) * tiles_of(mask.numpy(), m)).sum(axis=(1, 2))


def methods_for(m: int, exact_n: bool) -> list[str]:
    out = ["auto", "mcf"] + (["patterns"] if m <= 4 else [])
    return out + ([] if exact_n else ["greedy"])


@pytest.mark.parametrize("n,m", [(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8)])
@pytest.mark.parametrize("exact_n", [False, True])
def test_every_method_is_admissible(n, m, exact_n):
    w = torch.randn(2 * m, 3 * m, generator=torch.Generator().manual_seed(n * 10 + m))
    for method in methods_for(m, exact_n):
        assert_admissible(transposable_mask(w, n, m, method, exact_n), w, n, m, exact_n)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("exact_n", [False, True])
@pytest.mark.parametrize("method", EXACT)
def test_m4_exact_methods_match_brute_force(n, exact_n, method):
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mag = w.abs().numpy()
    mask = transposable_mask(w, n, 4, method, exact_n)
    want = brute_best(tiles_of(mag, 4), n, 4, exact_n)
    np.testing.assert_allclose(kept_per_tile(mask, mag, 4), want, rtol=1e-7)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("exact_n", [False, True])
def test_m8_mcf_matches_cpsat(n, exact_n):
    # Integer magnitudes: CP-SAT's objective is exact and the comparison can be exact too.
    rng = np.random.default_rng(n + 7 * exact_n)
    w = rng.integers(-1000, 1001, size=(16, 16)).astype(np.float64)
    mask = transposable_mask(torch.from_numpy(w), n, 8, "auto", exact_n)
    kept = kept_per_tile(mask, np.abs(w), 8)
    want = [cpsat_best(t, n, exact_n) for t in tiles_of(np.abs(w), 8)]
    np.testing.assert_array_equal(kept, want)


def test_at_most_beats_exactly_n_on_a_constructed_tile():
    # A dominant entry alone in its row and column: at most 2 keeps 100 + 6 (row 0 and column
    # 0 keep one entry each); exactly 2 must add a zero to both and loses one of the ones.
    tile = torch.ones(4, 4, dtype=torch.float64)
    tile[0, :], tile[:, 0] = 0.0, 0.0
    tile[0, 0] = 100.0
    for method in EXACT:
        at_most = (tile * transposable_mask(tile, 2, 4, method)).sum()
        exactly = (tile * transposable_mask(tile, 2, 4, method, exact_n=True)).sum()
        assert at_most == 106.0 and exactly == 105.0
    assert brute_best(tile.numpy()[None], 2, 4, False)[0] == 106.0


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (2, 8), (4, 8)])
def test_greedy_is_a_two_approximation(n, m):
    w = torch.randn(4 * m, 4 * m, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    mag = w.abs().numpy()
    greedy = kept_per_tile(transposable_mask(w, n, m, "greedy"), mag, m)
    best = kept_per_tile(transposable_mask(w, n, m, "mcf"), mag, m)
    assert (greedy >= 0.5 * best - 1e-9).all() and (greedy <= best + 1e-9).all()


def test_greedy_is_strictly_suboptimal_on_a_constructed_tile():
    tile = torch.tensor([[3.0, 2.0], [2.0, 0.0]])  # greedy keeps 3; the optimum keeps 2 + 2
    assert (tile * transposable_mask(tile, 1, 2, "greedy")).sum() == 3.0
    assert (tile * transposable_mask(tile, 1, 2, "mcf")).sum() == 4.0


def test_greedy_follows_descending_magnitude_with_ties_by_position():
    tile = torch.tensor([[5.0, -5.0, 1.0, 0.0],
                         [-5.0, 4.0, 0.0, 0.0],
                         [0.0, 0.0, 3.0, 3.0],
                         [9.0, 0.0, 0.0, 2.0]])
    # order: 9 (3,0); 5 (0,0) col 0 now full; -5 (0,1); -5 (1,0) col 0 full -> skip; 4 (1,1);
    # 3 (2,2); 3 (2,3); 2 (3,3); 1 (0,2) row 0 full -> skip; zeros fill remaining room.
    want = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=bool)
    assert torch.equal(transposable_mask_greedy(tile, 2, 4), want)


@pytest.mark.parametrize("scale", [1e-6, 1e6])
@pytest.mark.parametrize("method", ["mcf", "patterns", "greedy"])
def test_masks_are_unchanged_by_scaling(method, scale):
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for n, m in ([(2, 4), (4, 8)] if method != "patterns" else [(2, 4)]):
        base = transposable_mask(w, n, m, method)
        assert torch.equal(transposable_mask(w * scale, n, m, method), base)


def test_magnitude_costs_rounding_is_documented():
    costs = magnitude_costs(np.array([0.0, -1.0, 0.25, float("nan"), float("inf"), 1e-12]))
    assert costs.dtype == np.int64
    assert costs.tolist() == [0, COST_LEVELS, COST_LEVELS // 4, COST_LEVELS, COST_LEVELS, 0]
    assert magnitude_costs(np.zeros(3)).tolist() == [0, 0, 0]
    assert magnitude_costs(np.array([float("nan"), float("-inf")])).tolist() == [COST_LEVELS,
                                                                               COST_LEVELS]
    x = np.random.default_rng(0).standard_normal(1000)
    for s in (1e-6, 1e6):
        np.testing.assert_array_equal(magnitude_costs(x * s), magnitude_costs(x))


def test_mcf_raises_with_the_status_name(monkeypatch):
    class Stub:
        OPTIMAL = "OPTIMAL"

        def add_arcs_with_capacity_and_unit_cost(self, tails, heads, caps, costs):
            return np.arange(len(tails))

        def set_nodes_supplies(self, nodes, supplies):
            pass

        def solve(self):
            return types.SimpleNamespace(name="BAD_COST_RANGE")

    monkeypatch.setattr(mcf_module, "min_cost_flow", types.SimpleNamespace(SimpleMinCostFlow=Stub))
    with pytest.raises(RuntimeError, match="BAD_COST_RANGE"):
        transposable_mask_mcf(torch.randn(4, 4), 2, 4)


@pytest.mark.parametrize("method", ["auto", "mcf", "patterns", "greedy"])
def test_bad_shapes_raise_naming_shape_and_m(method):
    with pytest.raises(ValueError, match=r"\(6, 8\).*m=4"):
        transposable_mask(torch.randn(6, 8), 2, 4, method)
    with pytest.raises(ValueError, match="0 < n < m"):
        transposable_mask(torch.randn(8, 8), 4, 4, method)


def test_greedy_rejects_exact_n_and_unknown_methods():
    with pytest.raises(ValueError, match="greedy"):
        transposable_mask(torch.randn(8, 8), 2, 4, "greedy", exact_n=True)
    with pytest.raises(ValueError, match="unknown method"):
        transposable_mask(torch.randn(8, 8), 2, 4, "magic")


@pytest.mark.parametrize("method", ["mcf", "patterns", "greedy"])
def test_conv_weights_are_masked_per_kernel_position(method):
    """A kernel ``[out, in, kh, kw]``: each ``[out, in]`` slice at a fixed ``(i, j)`` is the
    matrix whose tiles the mask is transposable in (NVIDIA ASP's layout), not ``[out, in*kh*kw]``
    in memory order, whose groups would run along ``kw``."""
    w = torch.randn(8, 4, 3, 2, generator=torch.Generator().manual_seed(1))
    mask = transposable_mask(w, 2, 4, method)
    assert mask.shape == w.shape
    for i in range(3):
        for j in range(2):
            assert torch.equal(mask[:, :, i, j], transposable_mask(w[:, :, i, j], 2, 4, method))
    assert torch.equal(as_matrix(mask), transposable_mask(as_matrix(w), 2, 4, method))
    assert torch.equal(from_matrix(as_matrix(w), w.shape), w)
    with pytest.raises(ValueError, match="in-channels.*m=4"):  # 6 x 2 x 2 columns: 24, yet the
        transposable_mask(torch.randn(8, 6, 2, 2), 2, 4, method)  # tiles would straddle (i, j)


def test_auto_picks_patterns_for_small_m_and_mcf_otherwise():
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(transposable_mask(w, 2, 4), transposable_mask_patterns(w, 2, 4))
    assert torch.equal(transposable_mask(w, 4, 8), transposable_mask_mcf(w, 4, 8))


@pytest.mark.parametrize("fn", [transposable_mask_patterns, transposable_mask_greedy])
def test_in_graph_solvers_trace_without_baking_data(fn):
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
    traced = make_fx(lambda x: fn(x, 2, 4))(a)
    assert torch.equal(traced(b), fn(b, 2, 4)) and not torch.equal(fn(a, 2, 4), fn(b, 2, 4))


# ---------------------------------------------------------------- property tests (hypothesis)
SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.0, float("nan"), float("inf"), float("-inf")]


@st.composite
def weights(draw, m_choices=(2, 4, 8)):
    m = draw(st.sampled_from(m_choices))
    n = draw(st.integers(1, m - 1))
    rows, cols = m * draw(st.integers(1, 2)), m * draw(st.integers(1, 3))
    finite = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 2.0, -3.0]),
                       st.floats(-1e3, 1e3, allow_nan=False, width=32))
    values = draw(st.lists(st.one_of(finite, st.sampled_from(SPECIAL)) if draw(st.booleans())
                           else finite, min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.float32).reshape(rows, cols), n, m


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=weights(), exact_n=st.booleans())
def test_property_masks_are_always_admissible(case, exact_n):
    w, n, m = case
    for method in methods_for(m, exact_n):
        assert_admissible(transposable_mask(w, n, m, method, exact_n), w, n, m, exact_n)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=weights(m_choices=(2, 4)), exact_n=st.booleans())
def test_property_exact_methods_agree_with_brute_force_on_finite_weights(case, exact_n):
    w, n, m = case
    w = torch.nan_to_num(w, nan=0.0, posinf=7.0, neginf=-7.0).double()
    mag = w.abs().numpy()
    want = brute_best(tiles_of(mag, m), n, m, exact_n)
    for method in EXACT:
        got = kept_per_tile(transposable_mask(w, n, m, method, exact_n), mag, m)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    greedy = kept_per_tile(transposable_mask(w, n, m, "greedy"), mag, m)
    assert (greedy >= 0.5 * brute_best(tiles_of(mag, m), n, m, False) - 1e-6).all()


@pytest.mark.parametrize("n,m,exact_n", [(2, 4, False), (4, 8, False), (4, 8, True)])
def test_mcf_blocks_keep_the_single_problem_optimum(monkeypatch, n, m, exact_n):
    # Tiles are independent: solving blocks of tile rows separately must keep, tile by tile,
    # the same integer cost as one flow problem over the whole weight (ties may differ).
    w = torch.randn(6 * m, 5 * m, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    costs = tiles_of(magnitude_costs(w.numpy()), m)
    per_tile = {}
    for tiles_per_solve in (1, 7, 10**9):
        monkeypatch.setattr(mcf_module, "TILES_PER_SOLVE", tiles_per_solve)
        mask = transposable_mask_mcf(w, n, m, exact_n)
        assert_admissible(mask, w, n, m, exact_n)
        per_tile[tiles_per_solve] = (costs * tiles_of(mask.numpy(), m)).sum(axis=(1, 2))
    np.testing.assert_array_equal(per_tile[1], per_tile[10**9])
    np.testing.assert_array_equal(per_tile[7], per_tile[10**9])
