"""Bi-Mask backward masks: structure, the grad-input identity, and optimized >= random."""

from __future__ import annotations

import pytest
import torch

from nmcompile.solvers import BiMask, bimask, nm_mask


def matrices():
    gen = torch.Generator().manual_seed(0)
    gauss = torch.randn(64, 96, generator=gen, dtype=torch.float64)
    heavy = torch.randn(64, 96, generator=gen, dtype=torch.float64) * torch.exp(
        2 * torch.randn(64, 96, generator=gen, dtype=torch.float64))
    scaled = torch.randn(64, 96, generator=gen, dtype=torch.float64) * torch.linspace(
        0.1, 3.0, 64, dtype=torch.float64)[:, None]
    return {"gauss": gauss, "heavy": heavy, "row-scaled": scaled}


def kept(w, mask):
    return float((w.abs() * mask).sum())


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("method", ["random", "optimized"])
def test_structure(n, m, method):
    w = matrices()["gauss"]
    out = bimask(w, n, m, candidates=4, method=method, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, BiMask) and out.mask.dtype == torch.bool and out.mask.shape == w.shape
    assert out.perm.dtype == torch.long
    assert torch.equal(out.perm.sort().values, torch.arange(w.shape[0]))
    grouped = out.mask[out.perm].reshape(-1, m, w.shape[1]).sum(dim=1)
    assert (grouped <= n).all()
    forward = nm_mask(w, n, m)
    assert not (out.mask & ~forward).any()


def test_grad_input_is_unchanged_by_the_output_permutation():
    w = matrices()["gauss"]
    mask, perm = bimask(w, 2, 4, candidates=3, generator=torch.Generator().manual_seed(2))
    dy = torch.randn(5, w.shape[0], dtype=torch.float64)
    direct = dy @ (w * mask)
    permuted = dy[:, perm] @ (w[perm] * mask[perm])
    torch.testing.assert_close(permuted, direct, rtol=1e-12, atol=1e-12)


def test_backward_mask_is_best_for_its_permutation():
    # For a fixed permutation, F & B keeps the top-n of |w| * F per group and column.
    w = matrices()["heavy"]
    mask, perm = bimask(w, 2, 4, candidates=2, generator=torch.Generator().manual_seed(3))
    value = (w.abs() * nm_mask(w, 2, 4))[perm].reshape(-1, 4, w.shape[1])
    want = value.topk(2, dim=1).values.sum()
    assert abs(kept(w, mask) - float(want)) < 1e-9


@pytest.mark.parametrize("name", ["gauss", "heavy", "row-scaled"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_optimized_keeps_at_least_as_much_as_random(name, n, m):
    w = matrices()[name]
    rnd = bimask(w, n, m, candidates=8, generator=torch.Generator().manual_seed(7))
    opt = bimask(w, n, m, candidates=8, method="optimized",
                 generator=torch.Generator().manual_seed(7))
    assert kept(w, opt.mask) >= kept(w, rnd.mask)
    assert kept(w, opt.mask) > kept(w, rnd.mask) * 1.001  # and really improves on these


def test_custom_forward_mask_and_nan_inf():
    w = matrices()["gauss"].clone()
    w[0, 0], w[1, 1], w[2, 2] = float("nan"), float("inf"), float("-inf")
    fwd = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.6
    for method in ("random", "optimized"):
        mask, perm = bimask(w, 2, 4, candidates=2, method=method, forward_mask=fwd,
                            generator=torch.Generator().manual_seed(0))
        assert not (mask & ~fwd).any()
        assert (mask[perm].reshape(-1, 4, w.shape[1]).sum(1) <= 2).all()


def test_errors():
    with pytest.raises(ValueError, match="multiple of m=4"):
        bimask(torch.randn(6, 8), 2, 4)
    with pytest.raises(ValueError, match="forward_mask shape"):
        bimask(torch.randn(8, 8), 2, 4, forward_mask=torch.ones(8, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="method"):
        bimask(torch.randn(8, 8), 2, 4, method="exhaustive")
