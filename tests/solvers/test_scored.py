"""The in-graph scorer (``transposable_masks_scored``): a tile's choice depends on that tile
alone (exact integer scores: no summation order, batch or dtype of the other weights changes
it), admissible tiles keep every non-zero whatever its magnitude, and the kept magnitude is
optimal within the documented resolution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _solver_brute import all_tile_masks, brute_best, tiles_of

from nmcompile.solvers import tile_patterns, transposable_mask_scored, transposable_masks_scored
from nmcompile.solvers.patterns import _tile_scores, score_bits

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def crafted(kind: str, shape=(8, 16)) -> torch.Tensor:
    """Weights full of exact and near ties."""
    rows, cols = shape
    if kind == "arange":  # the weight: 0.01 * k sums round differently by order
        return torch.arange(1, rows * cols + 1, dtype=torch.float64).view(rows, cols) * 0.01
    if kind == "repeated":
        return torch.tensor([0.3, 0.1, 0.2, 0.3], dtype=torch.float64).repeat(rows, cols // 4)
    if kind == "equal":
        return torch.full(shape, 0.7, dtype=torch.float64)
    if kind == "thirds":  # 0.1 + 0.2 != 0.3 in binary, in a different way for each order
        vals = torch.tensor([0.1, 0.2, 0.3, 0.6], dtype=torch.float64)
        return vals[torch.arange(rows * cols).view(rows, cols) * 7 % 4]
    gen = torch.Generator().manual_seed(3)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def reference_mask(w: torch.Tensor, n: int = 2, m: int = 4, exact_n: bool = False):
    """The scorer's choice recomputed with int64 numpy arithmetic (exact, order-free): the
    first pattern, in ``tile_patterns`` order, with the largest integer score."""
    q = _tile_scores(w.reshape(w.shape[0], -1), n, m).double().numpy().astype(np.int64)
    table = tile_patterns(n, m, exact_n).astype(np.int64)  # [P, m*m]
    best = (q @ table.T).argmax(axis=1)  # numpy argmax: first maximum
    tiles = table[best].reshape(w.shape[0] // m, w.shape[1] // m, m, m)
    return torch.from_numpy(tiles.transpose(0, 2, 1, 3).reshape(w.shape).astype(bool))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["arange", "repeated", "equal", "thirds", "randn"])
def test_a_weights_mask_does_not_depend_on_what_it_is_scored_with(dtype, kind):
    w = crafted(kind).to(dtype)
    alone = transposable_mask_scored(w)
    assert torch.equal(alone, reference_mask(w))
    gen = torch.Generator().manual_seed(5)
    companions = [
        torch.randn(8, 16, generator=gen),
        torch.randn(64, 64, generator=gen, dtype=torch.float64),  # promotes the batch to fp64
        crafted("arange", (256, 256)).float(),  # a big batch: other BLAS blocking
        crafted("thirds", (4, 4)).to(torch.bfloat16),
        torch.randn(512, 1024, generator=gen),
    ]
    for other in companions:
        for batch in ([w, other], [other, w], [other, w, other.flip(0)]):
            got = transposable_masks_scored(batch)
            at = next(i for i, t in enumerate(batch) if t is w)
            assert torch.equal(got[at], alone), (other.shape, other.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_the_lowest_pattern_code(dtype):
    # All-equal tiles: every 8-cell pattern ties, the first one in tile_patterns' order wins.
    w = torch.full((8, 8), 0.7, dtype=dtype)
    first8 = next(p for p in tile_patterns(2, 4) if p.sum() == 8).reshape(4, 4)
    mask = transposable_mask_scored(w).reshape(2, 4, 2, 4).permute(0, 2, 1, 3)
    assert (mask == torch.from_numpy(first8)).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scores_are_exact_integers_with_the_documented_range(dtype):
    gen = torch.Generator().manual_seed(7)
    w = (torch.randn(16, 32, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(
        -20, 20, (16, 32), generator=gen)).to(dtype)
    w[:4, :4] = 0.0
    w[:4, 4:8] = torch.finfo(dtype).tiny / 8  # a tile whose largest value is subnormal
    for n, m in [(2, 4), (1, 4), (3, 4), (1, 2)]:
        q = _tile_scores(w, n, m)
        bits = score_bits(n, m, dtype)
        assert q.dtype == dtype and torch.equal(q, q.round()) and (q >= 0).all()
        significand = {torch.float32: 24, torch.float64: 53}[dtype]
        assert q.max() <= 2**bits and n * m * 2**bits <= 2**significand  # exact pattern sums
        assert torch.equal(q > 0, tiles_nonzero(w, m))
        top = q.amax(dim=1)
        normal = top > 2  # tiles whose largest value is normal use the full range
        assert (top[normal] >= 2 ** (bits - 1)).all()
        assert top[0] == 0  # the all-zero tile


def tiles_nonzero(w: torch.Tensor, m: int) -> torch.Tensor:
    rows, cols = w.shape
    return (w != 0).reshape(rows // m, m, cols // m, m).permute(0, 2, 1, 3).reshape(-1, m * m)


def admissible_tiles(dtype: torch.dtype, exact_n: bool, low: float) -> torch.Tensor:
    """One tile per admissible 2:4 pattern, its cells from 0.9 down to ``low`` (shuffled)."""
    gen = torch.Generator().manual_seed(11)
    tiles = []
    for pattern in torch.from_numpy(tile_patterns(2, 4, exact_n)).reshape(-1, 4, 4):
        k = int(pattern.sum())
        vals = torch.logspace(math.log10(0.9), math.log10(low), k, dtype=torch.float64)
        tile = torch.zeros(4, 4, dtype=torch.float64)
        tile[pattern] = vals[torch.randperm(k, generator=gen)]
        tiles.append(tile)
    return torch.cat(tiles).to(dtype)


@pytest.mark.parametrize("exact_n", [False, True])
@pytest.mark.parametrize("dtype, low", [
    (torch.float32, 1e-9), (torch.bfloat16, 1e-9), (torch.float16, 1e-7), (torch.float64, 1e-9),
    (torch.float32, 1e-45),  # float32's smallest subnormal
    (torch.bfloat16, 1e-40),  # a bfloat16 subnormal
    (torch.float16, 6e-8),  # float16's smallest subnormal
    (torch.float64, 5e-324),
])
def test_admissible_tiles_keep_every_non_zero(dtype, low, exact_n):
    w = admissible_tiles(dtype, exact_n, low)
    assert (w != 0).sum() == sum(p.sum() for p in tile_patterns(2, 4, exact_n))  # none rounded
    for mask in (transposable_mask_scored(w, exact_n=exact_n),
                 transposable_masks_scored([torch.randn(32, 32), w], exact_n=exact_n)[1]):
        assert torch.equal(mask & (w != 0), w != 0)


def test_a_subnormal_tile_keeps_its_non_zeros_when_denormals_are_flushed():
    tiny = torch.finfo(torch.float32).tiny
    w = torch.zeros(4, 4)
    w[0, 0], w[1, 1], w[2, 2] = tiny / 2, tiny / 4, tiny / 8
    flushed = torch.set_flush_denormal(True)
    try:
        mask = transposable_mask_scored(w)
    finally:
        torch.set_flush_denormal(False)
    assert bool(mask[0, 0] and mask[1, 1] and mask[2, 2]) or not flushed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n, exact_n", [(2, False), (2, True), (1, False), (3, False)])
def test_kept_magnitude_is_optimal_within_the_documented_resolution(dtype, n, exact_n):
    gen = torch.Generator().manual_seed(n)
    w = torch.randn(64, 96, generator=gen, dtype=torch.float64).pow(3).to(dtype)
    mask = transposable_mask_scored(w, n, 4, exact_n)
    mag = w.abs().double().numpy()
    tiles = tiles_of(mag, 4)
    got = (tiles * tiles_of(mask.numpy(), 4)).sum(axis=(1, 2))
    best = brute_best(tiles, n, 4, exact_n)
    slack = n * 4 * 2.0 ** -(score_bits(n, 4, dtype) - 1) * tiles.max(axis=(1, 2))
    assert (got <= best + 1e-12 * best).all()
    assert (got >= best - slack).all(), (best - got).max()
    assert got.sum() >= best.sum() * (1 - 1e-6)


def test_masks_are_the_same_under_tf32_matmul_precision():
    w = [crafted("thirds", (64, 64)).float(), crafted("arange").float()]
    before = transposable_masks_scored(w)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        after = transposable_masks_scored(w)
    finally:
        torch.set_float32_matmul_precision(old)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_brute_force_masks_are_the_scorer_candidates():
    # The scorer's table holds every maximal admissible mask (what the optimality rests on).
    brute = {tuple(row.astype(bool)) for row in all_tile_masks(2, 4, False)}
    table = {tuple(row) for row in tile_patterns(2, 4)}
    assert table <= brute
    for mask in brute:  # every admissible mask is contained in a maximal one of the table
        assert any(all(t or not b for b, t in zip(mask, row, strict=True)) for row in table)
