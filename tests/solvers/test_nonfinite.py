"""NaN and +-Inf weights behave alike in every mask solver: each counts as the largest finite
magnitude, so a diverged weight is kept and shows in the outputs as a dense step shows it
(a NaN used to be masked away as zero, hiding it, while an Inf was kept)."""

from __future__ import annotations

import pytest
import torch

from nmcompile.solvers import native, nm_mask, transposable_mask, transposable_mask_scored
from nmcompile.solvers._shapes import ranking_magnitude


def _solvers():
    def patterns_torch(w, n, m):
        saved = native.kernel
        native.kernel = lambda: None
        try:
            return transposable_mask(w, n, m, "patterns")
        finally:
            native.kernel = saved

    return {
        "patterns": lambda w, n, m: transposable_mask(w, n, m, "patterns"),
        "patterns (torch)": patterns_torch,
        "scored": transposable_mask_scored,
        "greedy": lambda w, n, m: transposable_mask(w, n, m, "greedy"),
        "mcf": lambda w, n, m: transposable_mask(w, n, m, "mcf"),
        "rowwise": nm_mask,
    }


SOLVERS = _solvers()


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_and_inf_are_kept_alike(name, dtype):
    """One non-finite entry per tile, at a different place in each: every solver keeps it,
    and gives the same mask whichever of NaN, Inf and -Inf it is."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, generator=gen).to(dtype)
    places = [(4 * i + (i + j) % 4, 4 * j + (2 * i + j) % 4) for i in range(4) for j in range(4)]
    masks = []
    for value in (float("nan"), float("inf"), -float("inf")):
        for r, c in places:
            w[r, c] = value
        masks.append(SOLVERS[name](w, 2, 4))
        assert all(masks[-1][r, c] for r, c in places), (name, value)
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2]), name


def test_ranking_magnitude():
    w = torch.tensor([[float("nan"), -float("inf"), float("inf"), -2.0]])
    big = torch.finfo(torch.float32).max
    assert ranking_magnitude(w).tolist() == [[big, big, big, 2.0]]
    assert ranking_magnitude(w.t()).is_contiguous()  # a fresh contiguous copy
