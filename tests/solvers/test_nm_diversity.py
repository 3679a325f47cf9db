"""Row-wise nm_mask against brute force, and mask_diversity against enumeration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _solver_brute import brute_row_best, count_masks
from hypothesis import given, settings
from hypothesis import strategies as st

from nmcompile.solvers import mask_diversity, nm_mask


@pytest.mark.parametrize("n,m", [(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8)])
def test_nm_mask_is_valid_and_optimal(n, m):
    w = torch.randn(6, 4 * m, generator=torch.Generator().manual_seed(m + n), dtype=torch.float64)
    mask = nm_mask(w, n, m)
    groups = mask.reshape(6, 4, m)
    assert (groups.sum(-1) == n).all()
    mag = w.abs().numpy().reshape(6, 4, m)
    kept = (mag * groups.numpy()).sum(-1)
    np.testing.assert_allclose(kept, brute_row_best(mag, n), rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0, -1.0, 2.5, -7.0, float("nan"), float("inf")]),
                min_size=16, max_size=16), st.integers(1, 3))
def test_nm_mask_property_ties_nan_inf(values, n):
    w = torch.tensor(values).reshape(2, 8)
    mask = nm_mask(w, n, 4)
    assert (mask.reshape(2, 2, 4).sum(-1) == n).all()
    mag = torch.nan_to_num(w.abs(), nan=1e30, posinf=1e30).double().numpy().reshape(2, 2, 4)
    np.testing.assert_allclose((mag * mask.numpy().reshape(2, 2, 4)).sum(-1),
                               brute_row_best(mag, n))


def test_nm_mask_rejects_bad_last_dim():
    with pytest.raises(ValueError, match=r"\(4, 6\).*m=4"):
        nm_mask(torch.randn(4, 6), 2, 4)


@pytest.mark.parametrize("n,m", [(1, 2), (1, 3), (2, 3), (1, 4), (2, 4), (3, 4)])
def test_transposable_diversity_matches_enumeration(n, m):
    assert mask_diversity(n, m, "transposable") == count_masks(n, m)


@pytest.mark.parametrize("n,m", [(1, 2), (1, 3), (2, 3), (1, 4), (2, 4), (3, 4)])
def test_row_diversity_matches_enumeration(n, m):
    # Row-wise N:M on one m x m tile: only the row sums are constrained.
    import itertools
    rows = [r for r in itertools.product((0, 1), repeat=m) if sum(r) == n]
    assert mask_diversity(n, m, "row") == len(rows) ** m


def test_known_diversity_values():
    assert mask_diversity(2, 4, "transposable") == 90
    assert mask_diversity(2, 4, "row") == 1296
    assert mask_diversity(1, 4, "transposable") == 24  # permutation matrices: 4!
    # OEIS A001499 (n x n 0/1 matrices with two 1s in every row and column).
    assert [mask_diversity(2, m, "transposable") for m in range(3, 9)] == [
        6, 90, 2040, 67950, 3110940, 187530840]
    assert mask_diversity(4, 8, "transposable") == 116963796250
    assert mask_diversity(7, 8, "transposable") == 40320  # complement of a permutation


def test_diversity_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        mask_diversity(2, 4, "columns")
