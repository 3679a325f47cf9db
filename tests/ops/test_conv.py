"""The ``nm::`` convolution ops against an fp64 masked-dense reference built from the same mask:
1-D, 2-D and 3-D, strides, padding, dilation, groups, bias, channels-last; their autograd
(straight through to the dense weight) and ``torch.library.opcheck``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmcompile.ops import conv_forward, conv_grad_input
from nmcompile.ops.conv import is_gemm
from nmcompile.solvers import transposable_mask

TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.bfloat16: (3e-2, 3e-2)}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

#: (spatial dims, in, out, kernel, stride, padding, dilation, groups)
CASES = [
    (2, 8, 16, 3, 1, 1, 1, 1),
    (2, 8, 8, 3, 2, 0, 1, 1),
    (2, 8, 16, (3, 1), (1, 2), (1, 0), (2, 1), 1),
    (2, 16, 8, 3, 1, 2, 2, 2),  # grouped: 8 in-channels per group
    (2, 8, 16, 1, 1, 0, 1, 1),  # pointwise
    (2, 8, 16, 1, 2, 0, 1, 1),  # pointwise, strided
    (1, 8, 12, 5, 2, 2, 1, 1),
    (3, 4, 8, 2, 1, 1, 1, 1),
]
_IDS = [f"{c[0]}d-in{c[1]}-out{c[2]}-k{c[3]}-s{c[4]}-p{c[5]}-d{c[6]}-g{c[7]}" for c in CASES]


def _tuple(v, dims):
    return tuple(v) if isinstance(v, tuple) else (v,) * dims


def _inputs(case, dtype=torch.float32, seed=0):
    dims, cin, cout, k, s, p, d, groups = case
    g = torch.Generator().manual_seed(seed)
    kernel = _tuple(k, dims)
    x = torch.randn(2, cin, *([7] * dims), generator=g).to(dtype)
    w = torch.randn(cout, cin // groups, *kernel, generator=g).to(dtype)
    mask = transposable_mask(w, 2, 4)
    args = (list(_tuple(s, dims)), list(_tuple(p, dims)), list(_tuple(d, dims)), groups)
    return x, w, mask, args


def _reference(x, w, mask, bias, args):
    stride, padding, dilation, groups = args
    return _CONV[x.dim() - 2](x.double(), (w.double() * mask), bias, stride, padding, dilation,
                              groups)


@pytest.mark.parametrize("case", CASES, ids=_IDS)
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_grad_input_match_fp64_masked_dense(case, bias):
    x, w, mask, args = _inputs(case)
    b = torch.randn(w.shape[0]) if bias else None
    out = conv_forward(x, w, mask, b, *args)
    expected = _reference(x, w, mask, None if b is None else b.double(), args)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # grad-input: the vector-Jacobian product of the masked reference
    xr = x.double().requires_grad_()
    yr = _reference(xr, w, mask, None, args)
    g = torch.randn(yr.shape, dtype=torch.float64)
    (yr * g).sum().backward()
    dx = conv_grad_input(g.float(), w, mask, list(x.shape), *args)
    assert dx.shape == x.shape and dx.dtype == torch.float32
    torch.testing.assert_close(dx.double(), xr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    x, w, mask, args = _inputs(CASES[0], dtype)
    out = conv_forward(x, w, mask, None, *args)
    assert out.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), _reference(x, w, mask, None, args), rtol=rtol,
                               atol=atol)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[7]], ids=["2d", "grouped", "3d"])
def test_channels_last_in_channels_last_out(case):
    x, w, mask, args = _inputs(case)
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    xc = x.contiguous(memory_format=fmt)
    out = conv_forward(xc, w, mask, None, *args)
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, conv_forward(x, w, mask, None, *args))
    g = torch.randn(out.shape).contiguous(memory_format=fmt)
    dx = conv_grad_input(g, w, mask, list(x.shape), *args)
    assert dx.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(dx, conv_grad_input(g.contiguous(), w, mask, list(x.shape), *args))
    assert conv_forward(x, w, mask, None, *args).is_contiguous()  # contiguous stays so


def test_pruned_inf_and_nan_do_not_leak():
    x, w, mask, args = _inputs(CASES[0])
    w = w.clone()
    w[~mask] = float("inf")
    w.view(-1)[(~mask).view(-1).nonzero()[0]] = float("nan")
    out = conv_forward(x, w, mask, None, *args)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, F.conv2d(x, torch.where(mask, w, 0), None, *args))


def test_autograd_is_straight_through():
    x, w, mask, args = _inputs(CASES[3], torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    b = torch.randn(w.shape[0], dtype=torch.float64, requires_grad=True)
    conv_forward(x, w, mask, b, *args).square().sum().backward()
    xr = x.detach().requires_grad_()
    wm = (w.detach() * mask).requires_grad_()  # its gradient: the dense (STE) one of w
    y = F.conv2d(xr, wm, b.detach(), *args)
    y.backward(2 * y.detach())
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wm.grad)
    torch.testing.assert_close(b.grad, 2 * y.detach().sum((0, 2, 3)))


def test_bad_inputs_raise_naming_the_op():
    x, w, mask, args = _inputs(CASES[0])
    with pytest.raises(ValueError, match="nm::conv_forward: mask"):
        conv_forward(x, w, mask.float(), None, *args)
    with pytest.raises(ValueError, match="cannot convolve"):
        conv_forward(x[:, :4], w, mask, None, *args)
    with pytest.raises(ValueError, match="2 entries"):
        conv_forward(x, w, mask, None, [1], [1], [1], 1)
    with pytest.raises(ValueError, match="pointwise"):  # a compressed weight for a 3x3 kernel
        conv_forward(x, w, mask, None, *args, packed=torch.empty(1))
    with pytest.raises(ValueError, match="nm::conv_grad_input: dtype"):
        conv_grad_input(torch.randn(2, 16, 7, 7, dtype=torch.float64), w, mask, list(x.shape),
                        *args)


def test_is_gemm():
    assert is_gemm([1, 1], [0, 0], 1) and is_gemm([1], [0], 1)
    assert not is_gemm([3, 3], [0, 0], 1)  # kernel
    assert not is_gemm([1, 1], [1, 1], 1)  # padding
    assert not is_gemm([1, 1], [0, 0], 2)  # groups


@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=["dilated", "grouped"])
def test_opcheck(case):
    x, w, mask, args = _inputs(case, torch.float64)
    b = torch.randn(w.shape[0], dtype=torch.float64)
    torch.library.opcheck(torch.ops.nm.conv_forward.default,
                          (x.requires_grad_(), w.requires_grad_(), mask, b, *args))
    g = torch.randn(conv_forward(x, w, mask, None, *args).shape, dtype=torch.float64)
    torch.library.opcheck(torch.ops.nm.conv_grad_input.default,
                          (g.requires_grad_(), w, mask, list(x.shape), *args))
