"""MVUE's grad-weight operand in Triton (``nmcompile.kernels.mvue24``), on CPU tensors in
Triton's interpreter: given torch's uniforms it draws what ``nmcompile.solvers.mvue`` draws,
draw for draw; from its own Philox stream the draws are unbiased and follow the seed; the
``nm::mvue_sparse_mm`` op multiplies the compressed draw on the sparse kernel (the strict CPU
model reading the sm90 blob)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from nmcompile.kernels import layout
from nmcompile.solvers import mvue

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1"
                                and not torch.cuda.is_available(),
                                reason="needs a GPU or Triton's interpreter")
mvue24 = pytest.importorskip("nmcompile.kernels.mvue24")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METHODS = ["exact", "approx"]


def _grad(rows: int, tokens: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``dY^T`` as the backward graph holds it: the transposed view of a contiguous
    ``[tokens, out]`` gradient, with zeros and near-ties."""
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(tokens, rows, generator=gen)
    dy = torch.where(torch.rand(tokens, rows, generator=gen) < 0.15, 0.0, dy)
    dy[::7] = dy[::7].sign()  # groups of equal magnitudes
    return dy.to(dtype).to(DEVICE).t()


def _draw(a: torch.Tensor, method: str, **kwargs) -> torch.Tensor:
    """The kernel's draw of ``a``, decoded from its blob (``[rows, tokens]``)."""
    rows, tokens = a.shape
    padded = mvue24.padded_tokens(tokens, "sm90")
    blob = torch.empty(rows * 9 * padded // 16, dtype=a.dtype, device=a.device)
    mvue24.launch(a, blob, "sm90", exact=method == "exact", **kwargs)
    return layout.decode(blob.view(rows, -1), rows, padded, "sm90")[:, :tokens]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows, tokens", [(64, 32), (128, 40), (64, 100)])
def test_the_kernel_draws_what_mvue_draws(monkeypatch, method, dtype, rows, tokens):
    a = _grad(rows, tokens, dtype, seed=rows + tokens)
    padded = mvue24.padded_tokens(tokens, "sm90")
    u = torch.rand(rows, padded // 4, 2, generator=torch.Generator().manual_seed(1))
    solver = sys.modules["nmcompile.solvers.mvue"]
    monkeypatch.setattr(solver, "_uniform",
                        lambda groups, count, generator: u[:, : groups.shape[-2], :count])
    full = torch.cat([a, a.new_zeros(rows, padded - tokens)], dim=1)
    expected = mvue(full, 2, 4, method=method)[:, :tokens]
    got = _draw(a, method, uniforms=u.to(DEVICE))
    assert torch.equal(got.cpu(), expected.cpu())
    assert ((got != 0).reshape(rows, -1, 4).sum(-1) <= 2).all()


def _inclusion(a: torch.Tensor, method: str) -> torch.Tensor:
    """Each element's inclusion probability under MVUE 2:4 (Chmiel et al.; the formulas of
    ``nmcompile.solvers.mvue``), float64, ``a``'s shape; 1 in groups of at most two non-zeros."""
    mag = a.double().abs().reshape(a.shape[0], -1, 4)
    total = mag.sum(-1, keepdim=True)
    few = (mag > 0).sum(-1, keepdim=True) <= 2
    if method == "exact":
        top = mag.amax(-1, keepdim=True)
        level = torch.where(top <= total / 2, total / 2, total - top)
        prob = (mag / level).clamp(max=1)
    else:  # two draws proportional to magnitude
        q = mag / total
        r = q / (total - mag)
        prob = q + mag * (r.sum(-1, keepdim=True) - r)
    return torch.where(few, (mag > 0).double(), prob).reshape(a.shape)


@pytest.mark.parametrize("method", METHODS)
def test_philox_draws_are_unbiased_and_follow_the_seed(method):
    """Over 160 seeds each element is kept as often as its inclusion probability says
    (binomial, 5 standard deviations) and always at ``a / p``: the draws are unbiased."""
    a = _grad(64, 32, torch.float16, seed=3)
    draws = torch.stack([_draw(a, method, seed=torch.tensor([seed], device=DEVICE)).double()
                         for seed in range(160)])
    p = _inclusion(a, method)
    kept = (draws != 0).double()
    count = len(draws)
    assert ((kept.mean(0) - p).abs() <= 5 * (p * (1 - p) / count).sqrt() + 1 / count).all()
    value = torch.where(p > 0, a.double() / p.clamp(min=1e-300), 0.0).expand_as(draws)
    torch.testing.assert_close(draws[kept.bool()], value[kept.bool()], rtol=2e-3, atol=0)
    # the same seed draws the same mask, another seed another one
    again = _draw(a, method, seed=torch.tensor([0], device=DEVICE)).double()
    assert torch.equal(again, draws[0]) and not torch.equal(draws[0], draws[1])


def test_bad_operands_name_the_problem():
    a = _grad(48, 32, torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match="multiples of 64 rows"):
        mvue24.launch(a, torch.empty(48 * 18, dtype=torch.bfloat16), "sm90", exact=True,
                      seed=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="give a seed"):
        mvue24.launch(_grad(64, 32, torch.bfloat16, 0), torch.empty(64 * 18,
                      dtype=torch.bfloat16), "sm90", exact=True)


@pytest.mark.parametrize("method", METHODS)
def test_the_op_multiplies_the_draw_on_the_sparse_kernel(cslt, monkeypatch, method):
    """``nm::mvue_sparse_mm``: the product of the draw (read back from the same Philox seed)
    through ``_cslt_sparse_mm``, against fp64; ``torch.manual_seed`` reproduces it."""
    monkeypatch.setenv("NMCOMPILE_CSLT_ON_CPU", "triton")
    a = _grad(64, 40, torch.bfloat16, seed=5)
    x = torch.randn(40, 48).to(torch.bfloat16).to(DEVICE)
    torch.manual_seed(7)
    out = torch.ops.nm.mvue_sparse_mm(a, x, method == "exact", "sm90")
    assert cslt.mm_calls == 1 and out.shape == (64, 48) and out.dtype == torch.bfloat16
    torch.manual_seed(7)
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=DEVICE)
    pruned = _draw(a, method, seed=seed)
    ref = pruned.double() @ x.double()
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    torch.manual_seed(7)
    assert torch.equal(torch.ops.nm.mvue_sparse_mm(a, x, method == "exact", "sm90"), out)
    # without a layout: the draw in torch ops, a dense GEMM, the same shapes
    dense = torch.ops.nm.mvue_sparse_mm(a, x, method == "exact", "")
    assert dense.shape == out.shape and cslt.mm_calls == 2


def test_opcheck():
    a, x = torch.randn(64, 32).t().contiguous().t(), torch.randn(64, 16)
    torch.library.opcheck(torch.ops.nm.mvue_sparse_mm.default, (a.t().contiguous(), x, True),
                          test_utils=("test_schema", "test_faketensor"))
