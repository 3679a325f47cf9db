import pytest
import torch

from nmcompile.solvers import fst_keep, fst_prune, gradient_shift


def test_fixed_mask_keeps_every_stride_th_token():
    assert fst_keep(8).tolist() == [True, False] * 4
    assert fst_keep(8, 1, 4).tolist() == [True, False, False, False] * 2
    x = torch.randn(8, 3)
    pruned = fst_prune(x, 1, 4)
    assert torch.equal(pruned[::4], x[::4]) and pruned[1::4].abs().sum() == 0


def test_gradient_shift_sums_each_stride_onto_its_kept_token():
    g = torch.arange(8.0).reshape(8, 1)
    assert gradient_shift(g).flatten().tolist() == [1, 1, 5, 3, 9, 5, 13, 7]
    assert gradient_shift(g, 1, 4).flatten().tolist() == [6, 1, 2, 3, 22, 5, 6, 7]


@pytest.mark.parametrize("call", [lambda: fst_keep(6), lambda: fst_keep(8, 3, 4),
                                  lambda: gradient_shift(torch.zeros(6, 2))])
def test_bad_shapes_and_ratios_raise(call):
    with pytest.raises(ValueError, match="FST|m=4"):
        call()
