"""``nm::`` custom ops for convolutions: the forward and grad-input convolutions with the masked
weight (definitions: schemas, fake kernels, autograd), beside the linear ones
(:mod:`nmcompile.ops.linear`).

=======================  =====================================================  ===============
op                       computes                                               masked operand
=======================  =====================================================  ===============
``nm::conv_forward``     ``conv(x, W*M) + bias``                                ``W*M``
``nm::conv_grad_input``  ``conv_transpose(dY, W*M)`` (the input's gradient)     ``W*M``
=======================  =====================================================  ===============

``W`` is ``[out, in/groups, *kernel]`` (1-D, 2-D and 3-D convolutions); the mask is N:M along
the input channels at each kernel position, and a transposable mask N:M along the output
channels too (:func:`nmcompile.solvers.as_matrix`), which makes ``conv_transpose`` (a reduction
over output channels) N:M as well.

A pointwise convolution (kernel 1, no padding, one group; any stride) is a GEMM in
channels-last layout: ``[tokens, in] @ [in, out]`` over the strided input positions
(:func:`is_gemm`). Handed the compressed ``[out, in]`` weight (``packed``: ``compress(W*M)``,
``packed_t``: ``compress((W*M)^T)``, made outside the graph as for a linear layer), the ops run
that GEMM on the sparse kernel; otherwise, and for every other convolution, they run the
masked-dense emulation (:mod:`nmcompile.ops.emulation`). Results are in the input's memory
format (channels-last in, channels-last out), so the fake kernels give the real strides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..kernels import cusparselt
from . import emulation

__all__ = ["conv_forward", "conv_grad_input", "is_gemm"]


def is_gemm(kernel: Sequence[int], padding: Sequence[int], groups: int) -> bool:
    """Whether a convolution with this kernel size (the weight's spatial dims), padding and
    groups is one GEMM over its (strided) input positions in channels-last layout."""
    return all(k == 1 for k in kernel) and all(p == 0 for p in padding) and groups == 1


def _check(name: str, a: Tensor, weight: Tensor, mask: Tensor, channels: int, groups: int,
           args: Sequence[Sequence[int]], packed: Tensor | None) -> None:
    """``a`` is the op's activation (``x`` or ``grad_out``) with ``channels`` channels."""
    spatial = weight.dim() - 2
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(f"{name}: mask must be a bool tensor shaped like weight "
                         f"{tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    if spatial not in (1, 2, 3) or a.dim() != weight.dim() or a.shape[1] != channels:
        raise ValueError(f"{name}: cannot convolve {tuple(a.shape)} with weight "
                         f"{tuple(weight.shape)} (groups={groups})")
    if any(len(v) != spatial for v in args):
        raise ValueError(f"{name}: stride, padding and dilation need {spatial} entries each, "
                         f"got {[list(v) for v in args]}")
    if packed is None and a.dtype != weight.dtype:
        raise ValueError(f"{name}: dtype mismatch, {a.dtype} activation and {weight.dtype} weight")
    if packed is not None:
        if packed.dtype != a.dtype:
            raise ValueError(f"{name}: compressed weight is {packed.dtype}, activation {a.dtype}")
        if not is_gemm(weight.shape[2:], args[1], groups):
            raise ValueError(f"{name}: a compressed weight serves pointwise convolutions only "
                             f"(kernel 1, padding 0, groups 1), got weight {tuple(weight.shape)}, "
                             f"padding {list(args[1])}, groups {groups}")


def _strided(stride: Sequence[int]) -> tuple:
    """The index of a pointwise convolution's input positions: every ``stride``-th one."""
    return (slice(None), slice(None), *(slice(None, None, s) for s in stride))


@torch.library.custom_op("nm::conv_forward", mutates_args=())
def conv_forward(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None,
                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                 groups: int, packed: Tensor | None = None, alg_id: int = 0) -> Tensor:
    """Forward convolution ``conv(x, weight*mask) + bias``.

    Args:
        x: ``[batch, in, *spatial]`` activation; the result is ``[batch, out, *spatial_out]`` in
            ``x``'s dtype and memory format.
        weight: ``[out, in/groups, *kernel]``, ``x``'s dtype (any floating dtype when ``packed``
            is given: only its shape is read then); mask: bool, the same shape.
        bias: ``[out]`` in ``x``'s dtype, or ``None``.
        stride, padding, dilation, groups: as ``torch.nn.functional.conv2d`` takes them (one
            entry per spatial dim).
        packed: ``cusparselt.compress((weight*mask).flatten(1))`` in ``x``'s dtype, for a
            pointwise convolution (:func:`is_gemm`): run the sparse kernel, with cuSPARSELt
            algorithm ``alg_id``.
    Raises:
        ValueError: shapes, dtypes or a ``packed`` for a convolution that is no GEMM.
    """
    _check("nm::conv_forward", x, weight, mask, weight.shape[1] * groups, groups,
           (stride, padding, dilation), packed)
    if packed is not None and x.numel():
        rows = x[_strided(stride)].movedim(1, -1)  # [batch, *positions, in]
        out = cusparselt.linear_forward(rows, packed, bias, weight.shape[0], alg_id)
        return out.movedim(-1, 1).contiguous(memory_format=emulation.memory_format(x))
    return emulation.conv_forward(x, weight, mask, bias, stride, padding, dilation, groups)


@conv_forward.register_fake
def _(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None, stride: Sequence[int],
      padding: Sequence[int], dilation: Sequence[int], groups: int,
      packed: Tensor | None = None, alg_id: int = 0) -> Tensor:
    _check("nm::conv_forward", x, weight, mask, weight.shape[1] * groups, groups,
           (stride, padding, dilation), packed)
    out = torch.ops.aten.convolution(x, weight.to(x.dtype), None, stride, padding, dilation,
                                     False, [0] * len(stride), groups)
    return out.contiguous(memory_format=emulation.memory_format(x))


@torch.library.custom_op("nm::conv_grad_input", mutates_args=())
def conv_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor, input_size: Sequence[int],
                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                    groups: int, packed_t: Tensor | None = None, alg_id: int = 0) -> Tensor:
    """Grad-input convolution: the gradient of :func:`conv_forward` with respect to ``x``, a
    transposed convolution of ``grad_out`` ``[batch, out, *spatial_out]`` with ``weight*mask``,
    to ``input_size`` ``[batch, in, *spatial]`` in ``grad_out``'s dtype and memory format.

    ``packed_t``: ``cusparselt.compress((weight*mask).flatten(1).T)`` for a pointwise
    convolution (the mask must be 2:4 along output channels: a transposable mask): run the
    sparse kernel with algorithm ``alg_id``. Other arguments as :func:`conv_forward`'s.
    """
    _check("nm::conv_grad_input", grad_out, weight, mask, weight.shape[0], groups,
           (stride, padding, dilation), packed_t)
    if packed_t is not None and grad_out.numel():
        part = cusparselt.linear_grad_input(grad_out.movedim(1, -1), packed_t, weight.shape[1],
                                            alg_id).movedim(-1, 1)
        if any(s != 1 for s in stride):  # positions the strided convolution skipped get 0
            full = part.new_zeros(input_size)
            full[_strided(stride)] = part
            part = full
        return part.contiguous(memory_format=emulation.memory_format(grad_out))
    return emulation.conv_grad_input(grad_out, weight, mask, input_size, stride, padding,
                                     dilation, groups)


@conv_grad_input.register_fake
def _(grad_out: Tensor, weight: Tensor, mask: Tensor, input_size: Sequence[int],
      stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
      packed_t: Tensor | None = None, alg_id: int = 0) -> Tensor:
    _check("nm::conv_grad_input", grad_out, weight, mask, weight.shape[0], groups,
           (stride, padding, dilation), packed_t)
    return grad_out.new_empty(input_size).contiguous(
        memory_format=emulation.memory_format(grad_out))


def _weight_grad(grad_out: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation,
                 groups: int) -> Tensor:
    """The dense (straight-through) weight gradient of ``conv(x, weight)`` for ``grad_out``."""
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight.to(grad_out.dtype), None, stride, padding, dilation, False,
        [0] * len(stride), groups, [False, True, False])[1].to(weight.dtype)


def _forward_setup(ctx, inputs, output) -> None:
    x, weight, mask, bias, stride, padding, dilation, groups, _, _ = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.args = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _forward_backward(ctx, grad):
    x, weight, mask = ctx.saved_tensors
    grad_x = (conv_grad_input(grad, weight.to(grad.dtype), mask, x.shape, *ctx.args)
              if ctx.needs_input_grad[0] else None)
    grad_w = _weight_grad(grad, x, weight, *ctx.args) if ctx.needs_input_grad[1] else None
    dims = [d for d in range(grad.dim()) if d != 1]
    grad_b = grad.sum(dims) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_x, grad_w, None, grad_b, None, None, None, None, None, None


def _grad_input_setup(ctx, inputs, output) -> None:
    grad_out, weight, mask, _, stride, padding, dilation, groups, _, _ = inputs
    ctx.save_for_backward(grad_out, weight, mask)
    ctx.args = (stride, padding, dilation, groups)


def _grad_input_backward(ctx, grad):
    grad_out, weight, mask = ctx.saved_tensors
    grad_g = (conv_forward(grad, weight.to(grad.dtype), mask, None, *ctx.args)
              if ctx.needs_input_grad[0] else None)
    # <conv_transpose(dY, W), G> = <dY, conv(G, W)>: W's gradient is that of conv(G, W)
    grad_w = _weight_grad(grad_out, grad, weight, *ctx.args) if ctx.needs_input_grad[1] else None
    return grad_g, grad_w, None, None, None, None, None, None, None, None


conv_forward.register_autograd(_forward_backward, setup_context=_forward_setup)
conv_grad_input.register_autograd(_grad_input_backward, setup_context=_grad_input_setup)
