import pytest
import torch

from nmcompile.masking import MaskSpec, sparse_weight
from nmcompile.solvers import (
    nm_mask,
    soft_threshold,
    soft_threshold_scale,
    transposable_mask_scored,
)


def _paper(w: torch.Tensor) -> torch.Tensor:
    """S-STE's 2:4 soft threshold by its definition: every group of 4 along the rows shrunk by
    its third-largest magnitude, sign(w) * max(|w| - t, 0)."""
    groups = w.reshape(w.shape[0], -1, 4)
    t = groups.abs().sort(-1, descending=True).values[..., 2:3]
    return (groups.sign() * (groups.abs() - t).clamp_min(0)).reshape(w.shape)


def test_rowwise_matches_the_papers_definition():
    w = torch.randn(16, 32, dtype=torch.float64)
    soft = soft_threshold(w, nm_mask(w, 2, 4), 4)
    torch.testing.assert_close(soft, _paper(w), rtol=0, atol=0)
    assert ((soft.reshape(16, 8, 4) != 0).sum(-1) <= 2).all()


def test_ties_keep_at_most_n_and_shrink_to_zero():
    w = torch.tensor([[3.0, -2.0, 2.0, 1.0]])
    soft = soft_threshold(w, nm_mask(w, 2, 4), 4)
    assert soft.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_continuous_where_the_hard_threshold_jumps():
    w = torch.tensor([[1.0, 0.5, 0.5 + 1e-6, 0.1]], dtype=torch.float64)
    v = torch.tensor([[1.0, 0.5 + 1e-6, 0.5, 0.1]], dtype=torch.float64)  # the mask swaps
    m_w, m_v = nm_mask(w, 2, 4), nm_mask(v, 2, 4)
    assert not torch.equal(m_w, m_v)
    hard_jump = (torch.where(m_w, w, 0) - torch.where(m_v, v, 0)).abs().max()
    soft_jump = (soft_threshold(w, m_w, 4) - soft_threshold(v, m_v, 4)).abs().max()
    assert hard_jump > 0.4 and soft_jump < 1e-5


def test_transposable_form_is_transposable_and_inside_the_mask():
    w = torch.randn(16, 16, dtype=torch.float64)
    mask = transposable_mask_scored(w, 2, 4)
    soft = soft_threshold(w, mask, 4, transposable=True)
    assert not soft[~mask].any()
    assert ((soft.reshape(16, 4, 4) != 0).sum(-1) <= 2).all()
    assert ((soft.t().reshape(16, 4, 4) != 0).sum(-1) <= 2).all()
    # each kept entry shrunk by the larger of its row group's and column group's pruned max
    i, j = map(int, mask.nonzero()[0])
    pruned = torch.where(mask, 0.0, w.abs())
    row = pruned[i, j // 4 * 4: j // 4 * 4 + 4].max()
    col = pruned[i // 4 * 4: i // 4 * 4 + 4, j].max()
    expected = w[i, j].sign() * (w[i, j].abs() - max(row, col)).clamp_min(0)
    assert soft[i, j] == expected


def test_scale_is_the_least_squares_fit():
    w = torch.randn(8, 16, dtype=torch.float64)
    soft = soft_threshold(w, nm_mask(w, 2, 4), 4)
    beta = soft_threshold_scale(w, soft)
    assert beta.dtype == torch.float32 and beta.dim() == 0
    fit = torch.linalg.lstsq(soft.reshape(-1, 1), w.reshape(-1, 1)).solution.item()
    assert abs(beta.item() - fit) < 1e-5 and beta.item() > 1
    assert soft_threshold_scale(w, torch.zeros_like(w)).item() == 1.0


def test_sparse_weight_orients_the_groups_by_the_spec():
    w = torch.randn(8, 12, dtype=torch.float64)
    one = torch.ones(())
    hard = sparse_weight(w, nm_mask(w, 2, 4), MaskSpec(2, 4, "rowwise"))
    assert torch.equal(hard, torch.where(nm_mask(w, 2, 4), w, 0))
    by_rows = sparse_weight(w, nm_mask(w, 2, 4), MaskSpec(2, 4, "rowwise"), one)
    torch.testing.assert_close(by_rows, _paper(w), rtol=0, atol=0)
    by_cols = sparse_weight(w, nm_mask(w.t(), 2, 4).t(), MaskSpec(2, 4, "rowwise", 0), 2 * one)
    torch.testing.assert_close(by_cols, 2 * _paper(w.t()).t(), rtol=0, atol=0)


def test_pruned_non_finite_entries_leave_a_finite_threshold():
    w = torch.tensor([[2.0, 1.0, float("inf"), float("nan")]])
    mask = torch.tensor([[True, True, False, False]])
    soft = soft_threshold(w, mask, 4)
    assert soft.tolist() == [[0.0, 0.0, 0.0, 0.0]]
    kept = soft_threshold(torch.tensor([[float("inf"), 1.0, 0.5, 0.2]]),
                          torch.tensor([[True, True, False, False]]), 4)
    assert kept[0, 0] == float("inf") and kept[0, 1] == 0.5


@pytest.mark.parametrize("args", [
    (torch.zeros(4, 6), torch.ones(4, 6, dtype=torch.bool), 4, False),
    (torch.zeros(6, 8), torch.ones(6, 8, dtype=torch.bool), 4, True),
    (torch.zeros(4, 8), torch.ones(4, 8), 4, False),
    (torch.zeros(8), torch.ones(8, dtype=torch.bool), 4, False),
])
def test_bad_shapes_raise(args):
    with pytest.raises(ValueError, match="soft_threshold|groups of m=4"):
        soft_threshold(*args)


def _brute(w: torch.Tensor, mask: torch.Tensor, m: int, transposable: bool) -> torch.Tensor:
    """S-STE's soft threshold entry by entry: a kept entry shrunk by the largest magnitude the
    mask prunes in its row group of ``m`` (and, transposable, in its column group)."""
    out = torch.zeros_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            if not mask[i, j]:
                continue
            groups = [[(i, c) for c in range(j // m * m, j // m * m + m)]]
            if transposable:
                groups.append([(r, j) for r in range(i // m * m, i // m * m + m)])
            t = max([abs(float(w[e])) for g in groups for e in g if not mask[e]], default=0.0)
            out[i, j] = float(w[i, j].sign()) * max(abs(float(w[i, j])) - t, 0.0)
    return out


@pytest.mark.parametrize("n,m,transposable", [(2, 4, False), (1, 4, False), (2, 8, False),
                                              (2, 4, True), (1, 4, True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force(n, m, transposable, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m * 2, m * 3, generator=g, dtype=torch.float64)
    w[0, :m] = 0.5  # ties inside a group
    mask = transposable_mask_scored(w, n, m) if transposable else nm_mask(w, n, m)
    soft = soft_threshold(w, mask, m, transposable)
    torch.testing.assert_close(soft, _brute(w, mask, m, transposable), rtol=0, atol=0)
    # the negative control: the row-only threshold is not the transposable one
    if transposable:
        assert not torch.equal(soft_threshold(w, mask, m, False), soft)


@pytest.mark.parametrize("policy", ["rowwise", "transposable"])
def test_sparse_weight_of_a_convolution_kernel_matches_brute_force(policy):
    """A kernel ``[out, in, kh, kw]``: the groups are ``m`` input channels (and, transposable,
    ``m`` output channels) at one kernel position, as its mask's."""
    from nmcompile.masking import compute_mask

    w = torch.randn(8, 4, 3, 2, dtype=torch.float64)
    spec = MaskSpec(2, 4, policy)
    mask = compute_mask(w, spec)
    got = sparse_weight(w, mask, spec, torch.full((), 1.5))
    want = torch.zeros_like(w)
    for a in range(3):
        for b in range(2):
            want[:, :, a, b] = 1.5 * _brute(w[:, :, a, b], mask[:, :, a, b], 4,
                                            policy == "transposable")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the control: flattening the kernel by rows groups across kernel positions instead
    flat = soft_threshold(w.reshape(8, -1), mask.reshape(8, -1), 4).reshape(w.shape)
    assert not torch.equal(1.5 * flat, want)
