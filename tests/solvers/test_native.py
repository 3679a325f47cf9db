"""The C kernel of the exact pattern search: optimal for every ratio with m <= 4, the same on
every code path (threads, partial blocks, dtypes, layouts), and a clean fallback when it
cannot be built."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _solver_brute import all_tile_masks, brute_best, tiles_of

from nmcompile.solvers import native, tile_patterns, transposable_mask_patterns
from nmcompile.solvers.patterns import band_plan

RATIOS = [(n, m) for m in (2, 3, 4) for n in range(1, m)]


@pytest.fixture
def kernel():
    lib = native.kernel()
    assert lib is not None, native.status()
    return lib


@pytest.fixture
def rebuild(monkeypatch, tmp_path):
    """A fresh kernel() (empty cache dir) under the environment the test sets."""
    monkeypatch.setenv("NMCOMPILE_CACHE_DIR", str(tmp_path))
    native.kernel.cache_clear()
    yield tmp_path
    native.kernel.cache_clear()


def assert_optimal(w: torch.Tensor, mask: torch.Tensor, n: int, m: int, exact_n: bool) -> None:
    t = tiles_of(mask.numpy().astype(np.int64), m)
    rows, cols = t.sum(axis=2), t.sum(axis=1)
    assert (rows <= n).all() and (cols <= n).all()
    if exact_n:
        assert (rows == n).all() and (cols == n).all()
    big = float(np.finfo(np.float32).max)  # NaN and +-Inf rank as the largest finite value
    mag = np.nan_to_num(np.abs(w.double().numpy()), nan=big, posinf=big)
    kept = (tiles_of(mag, m) * tiles_of(mask.numpy(), m)).sum(axis=(1, 2))
    np.testing.assert_allclose(kept, brute_best(tiles_of(mag, m), n, m, exact_n), rtol=1e-6)


def test_kernel_is_built_here(kernel):
    assert native.status().startswith("C kernel")


@pytest.mark.parametrize("exact_n", [False, True])
@pytest.mark.parametrize("n, m", RATIOS)
def test_optimal_for_every_ratio(kernel, n, m, exact_n):
    w = torch.randn(12 * m, 20 * m, generator=torch.Generator().manual_seed(n * 10 + m))
    assert_optimal(w, transposable_mask_patterns(w, n, m, exact_n), n, m, exact_n)


@pytest.mark.parametrize("exact_n", [False, True])
@pytest.mark.parametrize("n, m", RATIOS)
def test_band_plan_covers_exactly_the_admissible_patterns(n, m, exact_n):
    # Every combination the plan can produce is admissible, and every listed pattern is one.
    plan = band_plan(n, m, exact_n)
    ends = plan.group_end.tolist()
    starts = [0, *ends[:-1]]
    codes = [plan.option_codes[s:e].tolist() for s, e in zip(starts, ends, strict=True)]
    top, bottom = codes[: plan.groups[0]], codes[plan.groups[0]:]
    combos = {a | b for t, b_ in zip(plan.pair_top, plan.pair_bottom, strict=True)
              for a in top[t] for b in bottom[b_]}
    admissible = {int(row @ (1 << np.arange(m * m))) for row in all_tile_masks(n, m, exact_n)}
    listed = {int(row @ (1 << np.arange(m * m))) for row in tile_patterns(n, m, exact_n)}
    assert combos <= admissible and listed <= combos


def test_ties_zeros_and_special_values(kernel):
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0],
                      [float("nan"), float("inf"), -float("inf"), 2.0], [1.0, 1.0, 1.0, 1.0]])
    for exact_n in (False, True):
        mask = transposable_mask_patterns(w.repeat(2, 3), 2, 4, exact_n)
        t = tiles_of(mask.numpy().astype(np.int64), 4)
        assert (t.sum(axis=2) <= 2).all() and (t.sum(axis=1) <= 2).all()
        # NaN, Inf and -Inf all rank as the largest magnitude: two of them are kept
        assert (mask.reshape(2, 4, 3, 4)[:, 2, :, 0:3].sum(-1) == 2).all()


def test_threads_and_partial_blocks_agree(kernel, monkeypatch):
    # 70 tiles per row: one full block of 64 and a partial one; 160 tile rows over threads.
    w = torch.randn(640, 280, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(native, "MIN_TILE_ROWS_PER_THREAD", 1)
    threaded = transposable_mask_patterns(w, 2, 4)
    monkeypatch.setattr(native, "MIN_TILE_ROWS_PER_THREAD", 10**9)
    single = transposable_mask_patterns(w, 2, 4)
    assert torch.equal(threaded, single)
    assert_optimal(w, single, 2, 4, False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_strided_inputs(kernel, dtype):
    base = torch.randn(96, 64, generator=torch.Generator().manual_seed(4))
    w = base.to(dtype).t()  # non-contiguous [64, 96]
    mask = transposable_mask_patterns(w, 2, 4)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert torch.equal(mask, transposable_mask_patterns(w.float().contiguous(), 2, 4))
    assert_optimal(w.float(), mask, 2, 4, False)


def test_disabled_by_environment_falls_back_to_torch(rebuild, monkeypatch):
    monkeypatch.setenv("NMCOMPILE_NATIVE", "0")
    assert native.kernel() is None
    assert "NMCOMPILE_NATIVE=0" in native.status()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    assert_optimal(w, transposable_mask_patterns(w, 2, 4), 2, 4, False)


def test_failed_build_warns_once_and_falls_back(rebuild, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(RuntimeWarning, match="pure-torch path"):
        assert native.kernel() is None
    assert "false failed" in native.status()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
        assert_optimal(w, transposable_mask_patterns(w, 2, 4), 2, 4, False)
    assert not list(rebuild.iterdir())  # no half-written library left behind


def test_build_is_cached(rebuild):
    assert native.kernel() is not None
    (first,) = rebuild.glob("tile_patterns-*.so")
    native.kernel.cache_clear()
    assert native.kernel() is not None
    assert list(rebuild.glob("tile_patterns-*.so")) == [first]


def test_malformed_plan_is_rejected_by_the_kernel(kernel):
    plan = band_plan(2, 4)
    broken = type(plan)(**{**plan.__dict__, "pair_top": plan.pair_top + 100})
    with pytest.raises(RuntimeError, match="malformed band plan"):
        native.run(torch.zeros(8, 8), broken)


@pytest.mark.parametrize("exact_n", [False, True])
def test_custom_op_passes_opcheck(exact_n):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(7))
    op = torch.ops.nm.transposable_mask_patterns.default
    torch.library.opcheck(op, (w, 2, 4, exact_n))
    with pytest.raises(ValueError, match="2-D weight"):
        op(w.reshape(2, 16, 16), 2, 4, exact_n)
