import pytest
import torch

from nmcompile.ops import linear_forward, linear_grad_input, sparse_mm
from nmcompile.solvers import transposable_mask_patterns

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(dtype, lead=(6,), out=12, inp=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, inp, generator=g).to(dtype)
    w = torch.randn(out, inp, generator=g).to(dtype)
    return x, w, transposable_mask_patterns(w, 2, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(6,), (2, 3)])
def test_forward_matches_fp64_masked_dense(dtype, bias, lead):
    x, w, mask = _inputs(dtype, lead)
    b = torch.randn(w.shape[0]).to(dtype) if bias else None
    expected = x.double() @ (w.double() * mask).t()
    if bias:
        expected = expected + b.double()
    out = linear_forward(x, w, mask, b)
    assert out.dtype == dtype and out.shape == (*lead, w.shape[0])
    torch.testing.assert_close(out.double(), expected, rtol=TOL[dtype][0], atol=TOL[dtype][1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_input_matches_fp64_masked_dense(dtype):
    _, w, mask = _inputs(dtype)
    g = torch.randn(5, w.shape[0]).to(dtype)
    out = linear_grad_input(g, w, mask)
    expected = g.double() @ (w.double() * mask)
    torch.testing.assert_close(out.double(), expected, rtol=TOL[dtype][0], atol=TOL[dtype][1])


def test_pruned_inf_and_nan_do_not_leak():
    x, w, mask = _inputs(torch.float32)
    w = w.clone()
    w[~mask] = float("inf")
    w[0, (~mask[0]).nonzero()[0]] = float("nan")
    out = linear_forward(x, w, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x @ torch.where(mask, w, 0).t())


def test_autograd_is_straight_through():
    x, w, mask = _inputs(torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    b = torch.randn(w.shape[0], dtype=torch.float64, requires_grad=True)
    linear_forward(x, w, mask, b).square().sum().backward()
    y = x.detach() @ (w.detach() * mask).t() + b.detach()
    gy = 2 * y
    torch.testing.assert_close(x.grad, gy @ (w.detach() * mask))
    torch.testing.assert_close(w.grad, gy.t() @ x.detach())  # dense: straight-through
    torch.testing.assert_close(b.grad, gy.sum(0))


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_forward(bias):
    x, w, mask = _inputs(torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    b = torch.randn(w.shape[0], requires_grad=True) if bias else None
    torch.library.opcheck(torch.ops.nm.linear_forward.default, (x, w, mask, b))


def test_opcheck_grad_input():
    _, w, mask = _inputs(torch.float32)
    g = torch.randn(5, w.shape[0], requires_grad=True)
    torch.library.opcheck(torch.ops.nm.linear_grad_input.default, (g, w.requires_grad_(), mask))


def test_bad_inputs_raise_clear_errors():
    x, w, mask = _inputs(torch.float32)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        linear_forward(x, w, mask.float())
    with pytest.raises(ValueError, match="cannot multiply"):
        linear_forward(torch.randn(3, 5), w, mask)
    with pytest.raises(ValueError, match="dtype mismatch"):
        linear_forward(x.double(), w, mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_mm_matches_fp64(dtype):
    from nmcompile.solvers import nm_mask

    a = torch.randn(8, 16).to(dtype)
    a = torch.where(nm_mask(a, 2, 4), a, 0)
    b = torch.randn(16, 5).to(dtype)
    out = sparse_mm(a, b)
    torch.testing.assert_close(out.double(), a.double() @ b.double(), rtol=TOL[dtype][0],
                               atol=TOL[dtype][1])


def test_opcheck_sparse_mm():
    a = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(16, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.nm.sparse_mm.default, (a, b))
    with pytest.raises(ValueError, match="cannot multiply"):
        sparse_mm(a, b.t())
