"""``nm::`` custom ops: the sparse GEMMs of a linear layer.

The rewrite pass (:mod:`nmcompile.passes.rewrite_matmuls`) turns the matmuls of the joint
training graph into these ops after autograd has run, so the graph never differentiates them;
their autograd formulas exist for eager use and ``torch.library.opcheck``.

Every op takes the dense weight and a boolean mask of the same shape and computes exactly the
masked-dense product, ``where(mask, weight, 0)``: the numbers a semi-structured sparse kernel
produces from the compressed weight. That is the CPU emulation and the reference of the CUDA
kernels. Which operand the hardware compresses:

========================  ===========================  ======================================
op                        computes                     sparse operand (N:M along reduction)
========================  ===========================  ======================================
``nm::linear_forward``     ``x @ (W*M).T + bias``        ``W*M``, N:M along in-features
``nm::linear_grad_input``  ``grad_out @ (W*M)``          ``(W*M).T``, N:M along out-features
``nm::sparse_mm``          ``a @ b``                     ``a``, already pruned N:M along dim 1
========================  ===========================  ======================================

``nm::sparse_mm`` carries the grad-weight GEMM ``dY^T X`` once dY has been pruned (MVUE) along
the token dim: its left operand is N:M along the reduction dim by construction.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_forward", "linear_grad_input", "masked_weight", "sparse_mm"]


def masked_weight(weight: Tensor, mask: Tensor) -> Tensor:
    """``weight`` with the entries outside ``mask`` set to zero (a pruned inf or NaN becomes 0)."""
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def _check(name: str, a: Tensor, weight: Tensor, mask: Tensor, a_dim: int, w_dim: int) -> None:
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(
            f"{name}: mask must be a bool tensor shaped like weight {tuple(weight.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if weight.dim() != 2 or a.shape[-1] != weight.shape[w_dim]:
        raise ValueError(
            f"{name}: cannot multiply {tuple(a.shape)} by weight {tuple(weight.shape)} "
            f"(reduction over weight dim {w_dim})"
        )
    if a.dtype != weight.dtype:
        raise ValueError(f"{name}: dtype mismatch, {a.dtype} activation and {weight.dtype} weight")


@torch.library.custom_op("nm::linear_forward", mutates_args=())
def linear_forward(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
    """Forward GEMM ``x @ (weight*mask).T + bias``; weight ``[out, in]``, x ``[..., in]``."""
    _check("nm::linear_forward", x, weight, mask, a_dim=-1, w_dim=1)
    return torch.nn.functional.linear(x, masked_weight(weight, mask), bias).contiguous()


@linear_forward.register_fake
def _(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
    _check("nm::linear_forward", x, weight, mask, a_dim=-1, w_dim=1)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("nm::linear_grad_input", mutates_args=())
def linear_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
    """Grad-input GEMM ``grad_out @ (weight*mask)``; ``weight`` is ``[out, in]``."""
    _check("nm::linear_grad_input", grad_out, weight, mask, a_dim=-1, w_dim=0)
    return torch.matmul(grad_out, masked_weight(weight, mask)).contiguous()


@linear_grad_input.register_fake
def _(grad_out: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
    _check("nm::linear_grad_input", grad_out, weight, mask, a_dim=-1, w_dim=0)
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]))


@torch.library.custom_op("nm::sparse_mm", mutates_args=())
def sparse_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 2-D ``a`` that is N:M sparse along dim 1 (pruned by the caller)."""
    _check_mm(a, b)
    return torch.mm(a, b).contiguous()


@sparse_mm.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    _check_mm(a, b)
    return a.new_empty((a.shape[0], b.shape[1]))


def _check_mm(a: Tensor, b: Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or a.dtype != b.dtype:
        raise ValueError(
            f"nm::sparse_mm: cannot multiply {a.dtype} {tuple(a.shape)} by {b.dtype} "
            f"{tuple(b.shape)}"
        )


def _sparse_mm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _sparse_mm_backward(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a = grad @ b.t() if ctx.needs_input_grad[0] else None
    grad_b = a.t() @ grad if ctx.needs_input_grad[1] else None
    return grad_a, grad_b


sparse_mm.register_autograd(_sparse_mm_backward, setup_context=_sparse_mm_setup)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _forward_setup(ctx, inputs, output) -> None:
    x, weight, mask, bias = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None


def _forward_backward(ctx, grad):
    # Straight-through estimator: the weight gradient is the dense one, as in the graph rewrite.
    x, weight, mask = ctx.saved_tensors
    grad_x = linear_grad_input(grad, weight, mask) if ctx.needs_input_grad[0] else None
    grad_w = _flat(grad).t() @ _flat(x) if ctx.needs_input_grad[1] else None
    grad_b = _flat(grad).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_x, grad_w, None, grad_b


def _grad_input_setup(ctx, inputs, output) -> None:
    grad_out, weight, mask = inputs
    ctx.save_for_backward(grad_out, weight, mask)


def _grad_input_backward(ctx, grad):
    grad_out, weight, mask = ctx.saved_tensors
    grad_g = linear_forward(grad, weight, mask) if ctx.needs_input_grad[0] else None
    grad_w = _flat(grad_out).t() @ _flat(grad) if ctx.needs_input_grad[1] else None
    return grad_g, grad_w, None


linear_forward.register_autograd(_forward_backward, setup_context=_forward_setup)
linear_grad_input.register_autograd(_grad_input_backward, setup_context=_grad_input_setup)
