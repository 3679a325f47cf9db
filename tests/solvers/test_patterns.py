"""The 2:4 pattern solver keeps exactly as much magnitude as scoring every pattern does.

Each test runs both implementations: the C kernel (float32 weights) and the pure-torch path
(forced by hiding the kernel; float64 weights, so the comparison is exact)."""

from __future__ import annotations

import pytest
import torch
from _solver_brute import all_tile_masks, tiles_of
from torch.fx.experimental.proxy_tensor import make_fx

from nmcompile.solvers import native, tile_patterns, transposable_mask_patterns


@pytest.fixture(params=["c", "torch"])
def impl(request, monkeypatch):
    """Which implementation runs, and the dtype and tolerance its kept magnitude is held to."""
    if request.param == "c":
        assert native.kernel() is not None, native.status()
        return torch.float32, 1e-6
    monkeypatch.setattr(native, "kernel", lambda: None)
    return torch.float64, 1e-12


def ranked(w: torch.Tensor) -> torch.Tensor:
    """``|w|`` in float64 as the solvers rank it: NaN and +-Inf as float32's largest value."""
    big = torch.finfo(torch.float32).max
    return torch.nan_to_num(w.abs().double(), nan=big, posinf=big)


def reference_kept(w: torch.Tensor, exact_n: bool) -> torch.Tensor:
    """Best kept |w| per tile by the former formulation: [tiles, 16] @ [16, P], then max."""
    mag = ranked(w)
    masks = torch.from_numpy(all_tile_masks(2, 4, exact_n))  # every admissible 4x4 mask
    tiles = torch.from_numpy(tiles_of(mag.numpy(), 4)).reshape(-1, 16)
    return (tiles @ masks.t()).max(dim=1).values


def kept(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mag = ranked(w).numpy()
    return torch.from_numpy((tiles_of(mag, 4) * tiles_of(mask.numpy(), 4)).sum(axis=(1, 2)))


def assert_2_4(mask: torch.Tensor, exact_n: bool) -> None:
    t = torch.from_numpy(tiles_of(mask.numpy().astype("int64"), 4))
    rows, cols = t.sum(dim=2), t.sum(dim=1)
    if exact_n:
        assert (rows == 2).all() and (cols == 2).all()
    assert (rows <= 2).all() and (cols <= 2).all()


@pytest.mark.parametrize("exact_n", [False, True])
@pytest.mark.parametrize("dist", ["normal", "integers", "sparse", "heavy"])
def test_kept_magnitude_matches_the_matmul_formulation(dist, exact_n, impl):
    dtype, rtol = impl
    gen = torch.Generator().manual_seed(11)
    shape = (128, 256)
    w = {
        "normal": lambda: torch.randn(shape, generator=gen, dtype=torch.float64),
        "integers": lambda: torch.randint(-3, 4, shape, generator=gen).double(),  # many ties
        "sparse": lambda: torch.randn(shape, generator=gen, dtype=torch.float64)
        * (torch.rand(shape, generator=gen) < 0.3),
        "heavy": lambda: torch.randn(shape, generator=gen, dtype=torch.float64).pow(5),
    }[dist]().to(dtype)
    mask = transposable_mask_patterns(w, 2, 4, exact_n)
    assert_2_4(mask, exact_n)
    torch.testing.assert_close(kept(w, mask), reference_kept(w, exact_n), rtol=rtol, atol=0)


@pytest.mark.parametrize("exact_n", [False, True])
def test_float32_kept_magnitude_matches_within_rounding(exact_n, monkeypatch):
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(12))
    masks = [transposable_mask_patterns(w, 2, 4, exact_n)]
    monkeypatch.setattr(native, "kernel", lambda: None)
    masks.append(transposable_mask_patterns(w, 2, 4, exact_n))
    for mask in masks:
        assert_2_4(mask, exact_n)
        torch.testing.assert_close(kept(w, mask), reference_kept(w, exact_n), rtol=1e-6, atol=0)


def test_every_maximal_pattern_can_win(impl):
    # One tile per maximal pattern, with 1 on the pattern and 0 elsewhere: only it keeps 7 or 8.
    table = torch.from_numpy(tile_patterns(2, 4)).to(impl[0])  # [186, 16]
    w = table.reshape(-1, 4, 4).reshape(-1, 4)  # tiles stacked vertically: [186*4, 4]
    mask = transposable_mask_patterns(w, 2, 4)
    assert torch.equal(mask.reshape(-1, 16).to(impl[0]), table)


@pytest.mark.usefixtures("impl")
def test_special_values_stay_admissible():
    w = torch.tensor([[float("inf"), float("nan"), 1.0, -float("inf")]] * 4 * 2).reshape(8, 4)
    assert_2_4(transposable_mask_patterns(w.reshape(4, 8), 2, 4), exact_n=False)
    assert_2_4(transposable_mask_patterns(w.reshape(4, 8), 2, 4, exact_n=True), exact_n=True)


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_traces_as_one_custom_op_and_matches_eager(mode):
    gen = torch.Generator().manual_seed(13)
    a, b = torch.randn(16, 32, generator=gen), torch.randn(16, 32, generator=gen)
    traced = make_fx(lambda x: transposable_mask_patterns(x, 2, 4), tracing_mode=mode)(a)
    targets = [str(node.target) for node in traced.graph.nodes if node.op == "call_function"]
    assert "nm.transposable_mask_patterns.default" in targets
    assert not any("mm" in t for t in targets)
    assert torch.equal(traced(b), transposable_mask_patterns(b, 2, 4))


@pytest.mark.parametrize("n, exact_n", [(2, False), (2, True), (1, False), (3, False)])
def test_scored_matmul_form_keeps_the_same_optimum(n, exact_n):
    from nmcompile.solvers import transposable_mask_scored

    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    fast = transposable_mask_patterns(w, n, 4, exact_n)
    scored = transposable_mask_scored(w, n, 4, exact_n)
    tiles = scored.reshape(16, 4, 24, 4)
    assert tiles.sum(1).max() <= n and tiles.sum(3).max() <= n
    kept = [(w.abs() * m).reshape(16, 4, 24, 4).sum((1, 3)) for m in (fast, scored)]
    torch.testing.assert_close(kept[0], kept[1])


@pytest.mark.parametrize("exact_n", [False, True])
@pytest.mark.parametrize("dtype, low", [(torch.float32, 1e-9), (torch.bfloat16, 1e-9),
                                        (torch.float16, 1e-7), (torch.float64, 1e-9),
                                        (torch.float32, 1e-45)])
def test_admissible_tiles_keep_every_non_zero_in_both_implementations(impl, dtype, low, exact_n):
    """The out-of-graph pattern search (C kernel and torch path) scores with the in-graph
    scorer's exact integers: it never rounds a tiny non-zero away, and agrees with the scorer
    tile for tile."""
    from nmcompile.solvers import transposable_mask_scored
    from tests.solvers.test_scored import admissible_tiles

    w = admissible_tiles(dtype, exact_n, low)
    mask = transposable_mask_patterns(w, 2, 4, exact_n=exact_n)
    assert torch.equal(mask & (w != 0), w != 0)
    gen = torch.Generator().manual_seed(3)
    r = (torch.randn(64, 64, generator=gen) * torch.rand(64, 1, generator=gen) ** 8).to(dtype)
    kept = (r.abs().double() * transposable_mask_patterns(r, 2, 4, exact_n=exact_n)).sum()
    want = (r.abs().double() * transposable_mask_scored(r, 2, 4, exact_n=exact_n)).sum()
    torch.testing.assert_close(kept, want, rtol=1e-6, atol=0)
