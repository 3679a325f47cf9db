"""The sparse-kernel path of the ``nm::`` convolution ops (pointwise convolutions, a GEMM in
channels-last layout), on CPU through the strict model of cuSPARSELt (the ``cslt`` fixture),
judged against an fp64 masked-dense reference and against the emulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nmcompile.ops  # noqa: F401  (registers the nm:: ops)
from nmcompile.kernels import cusparselt
from nmcompile.ops import emulation
from nmcompile.solvers import transposable_mask

nm = torch.ops.nm
REL_TOL = 1e-2


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _case(dtype, stride, channels_last, dims=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 64, *([1] * dims), generator=g).to(dtype)
    mask = transposable_mask(w, 2, 4)
    x = torch.randn(2, 64, *([5] * dims), generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    masked = emulation.masked_weight(w, mask).flatten(1)
    args = ([stride] * dims, [0] * dims, [1] * dims, 1)
    return x, w, mask, masked, args


@pytest.mark.parametrize("dims,channels_last", [(1, False), (2, False), (2, True)],
                         ids=["1d", "2d", "2d-channels-last"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_pointwise_conv_runs_the_gemm_kernel(cslt, dtype, stride, channels_last, dims):
    x, w, mask, masked, args = _case(dtype, stride, channels_last, dims)
    b = torch.randn(32).to(dtype)
    ref = F.conv2d if dims == 2 else F.conv1d
    expected = ref(x.double(), w.double() * mask, b.double(), *args)

    out = nm.conv_forward(x, w, mask, b, *args, cusparselt.compress(masked))
    assert cslt.mm_calls == 1 and cslt.mm_shapes[-1][:2] == (32, 64)
    assert _rel_err(out, expected) < REL_TOL
    assert out.shape == expected.shape
    assert out.stride() == nm.conv_forward(x, w, mask, b, *args).stride()  # the emulation's

    xr = x.double().requires_grad_()
    g = torch.randn(expected.shape, dtype=torch.float64)
    (ref(xr, w.double() * mask, None, *args) * g).sum().backward()
    grad_out = g.to(dtype).contiguous(memory_format=emulation.memory_format(out))
    dx = nm.conv_grad_input(grad_out, w, mask, list(x.shape), *args,
                            cusparselt.compress(masked.t()))
    assert cslt.mm_calls == 2 and cslt.mm_shapes[-1][:2] == (64, 32)
    assert dx.shape == x.shape and _rel_err(dx, xr.grad) < REL_TOL
    emulated = nm.conv_grad_input(grad_out, w, mask, list(x.shape), *args)
    assert dx.stride() == emulated.stride()
    if stride > 1:  # the positions the strided convolution skips get exactly zero
        assert (dx[..., 1::stride] == 0).all()


def test_the_compressed_weight_alone_gives_the_numbers(cslt):
    """With ``packed`` the op reads the blob: a NaN weight gives the same result."""
    x, w, mask, masked, args = _case(torch.bfloat16, 1, False)
    packed = cusparselt.compress(masked)
    out = nm.conv_forward(x, w, mask, None, *args, packed)
    nan = nm.conv_forward(x, torch.full_like(w, float("nan")), mask, None, *args, packed)
    torch.testing.assert_close(nan, out, rtol=0, atol=0)


def test_without_packed_no_kernel_runs(cslt):
    """Negative control: no compressed weight, no sparse GEMM (the emulation)."""
    x, w, mask, _, args = _case(torch.bfloat16, 1, False)
    nm.conv_forward(x, w, mask, None, *args)
    assert cslt.mm_calls == 0
