"""``nm::`` custom ops: the sparse GEMMs of a linear layer (definitions: schemas, fake kernels,
autograd). Their implementations live apart: the masked-dense emulation in
:mod:`nmcompile.ops.emulation`, the cuSPARSELt kernels in :mod:`nmcompile.kernels.cusparselt`.

The rewrite pass (:mod:`nmcompile.passes.rewrite_matmuls`) turns the matmuls of the joint
training graph into these ops after autograd has run, so the graph never differentiates them;
their autograd formulas exist for eager use and ``torch.library.opcheck``.

Every op computes exactly the masked-dense product, ``where(mask, weight, 0)``. Which operand
the hardware compresses:

========================  ===========================  ======================================
op                        computes                     sparse operand (N:M along reduction)
========================  ===========================  ======================================
``nm::linear_forward``     ``x @ (W*M).T + bias``        ``W*M``, N:M along in-features
``nm::linear_grad_input``  ``grad_out @ (W*M)``          ``(W*M).T``, N:M along out-features
``nm::sparse_mm``          ``a @ b``                     ``a``, already pruned N:M along dim 1
``nm::mvue_sparse_mm``     ``mvue(a, 2, 4) @ b``         ``a`` (``dY^T``), pruned in the op
========================  ===========================  ======================================

Which implementation runs is fixed by the arguments, never by hidden state: the linear ops
run the sparse kernel when they are handed the compressed operand (``packed``: the
cuSPARSELt blob of ``W*M`` or ``(W*M).T``, made once per optimizer step outside the graph by
:class:`nmcompile.state.MaskBank`), and ``nm::sparse_mm`` when ``use_kernel`` is true (it
compresses ``a`` itself, per call: a pruned output gradient is new at every micro-step).
Otherwise they run the emulation. ``nm::sparse_mm`` carries the grad-weight GEMM ``dY^T X``
once dY has been pruned (MVUE) along the token dim: its left operand is N:M along the
reduction dim by construction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import cusparselt
from ..solvers.mvue import mvue
from . import emulation
from .emulation import masked_weight

__all__ = ["linear_forward", "linear_grad_input", "masked_weight", "mvue_sparse_mm", "sparse_mm"]


def _check(name: str, a: Tensor, weight: Tensor, mask: Tensor, w_dim: int,
           packed: Tensor | None) -> None:
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
    if packed is None and a.dtype != weight.dtype:
        raise ValueError(f"{name}: dtype mismatch, {a.dtype} activation and {weight.dtype} weight")
    if packed is not None and packed.dtype != a.dtype:
        raise ValueError(f"{name}: compressed weight is {packed.dtype}, activation {a.dtype}")


@torch.library.custom_op("nm::linear_forward", mutates_args=())
def linear_forward(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None,
                   packed: Tensor | None = None, alg_id: int = 0) -> Tensor:
    """Forward GEMM ``x @ (weight*mask).T + bias``.

    Args:
        x: ``[..., in]`` activation; the result is ``[..., out]`` in ``x``'s dtype.
        weight: ``[out, in]`` dense weight, ``x``'s dtype (any floating dtype when ``packed`` is
            given: only its shape is read then).
        mask: bool ``[out, in]``.
        bias: ``[out]`` in ``x``'s dtype, or ``None``.
        packed: ``cusparselt.compress(weight*mask)`` in ``x``'s dtype: run the sparse kernel.
        alg_id: the kernel's cuSPARSELt algorithm (the cost rule's validated choice, else 0).
    """
    _check("nm::linear_forward", x, weight, mask, 1, packed)
    if packed is not None and x.numel():
        return cusparselt.linear_forward(x, packed, bias, weight.shape[0], alg_id)
    return emulation.linear_forward(x, weight, mask, bias)


@linear_forward.register_fake
def _(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None,
      packed: Tensor | None = None, alg_id: int = 0) -> Tensor:
    _check("nm::linear_forward", x, weight, mask, 1, packed)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("nm::linear_grad_input", mutates_args=())
def linear_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor,
                      packed_t: Tensor | None = None, alg_id: int = 0) -> Tensor:
    """Grad-input GEMM ``grad_out @ (weight*mask)``: ``[..., out]`` -> ``[..., in]``.

    ``weight``/``mask`` are ``[out, in]`` as in :func:`linear_forward`; ``packed_t`` is
    ``cusparselt.compress((weight*mask).T)`` (the mask must be 2:4 along out-features: a
    transposable mask) in ``grad_out``'s dtype, to run the sparse kernel with cuSPARSELt
    algorithm ``alg_id``.
    """
    _check("nm::linear_grad_input", grad_out, weight, mask, 0, packed_t)
    if packed_t is not None and grad_out.numel():
        return cusparselt.linear_grad_input(grad_out, packed_t, weight.shape[1], alg_id)
    return emulation.linear_grad_input(grad_out, weight, mask)


@linear_grad_input.register_fake
def _(grad_out: Tensor, weight: Tensor, mask: Tensor, packed_t: Tensor | None = None,
      alg_id: int = 0) -> Tensor:
    _check("nm::linear_grad_input", grad_out, weight, mask, 0, packed_t)
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]))


@torch.library.custom_op("nm::sparse_mm", mutates_args=())
def sparse_mm(a: Tensor, b: Tensor, use_kernel: bool = False, alg_id: int = 0) -> Tensor:
    """``a @ b`` for 2-D ``a`` ``[M, K]`` that is N:M sparse along ``K`` (pruned by the caller).

    ``use_kernel``: compress ``a`` and run the 2:4 sparse kernel (``a`` must then be 2:4 along
    ``K``) whenever the shapes allow it at run time, with cuSPARSELt algorithm ``alg_id``;
    otherwise, and by default, a dense GEMM.
    """
    _check_mm(a, b)
    if use_kernel and cusparselt.sparse_mm_reason(*a.shape, b.shape[1], a.dtype) is None:
        return cusparselt.sparse_mm(a, b, alg_id)
    return emulation.sparse_mm(a, b)


@sparse_mm.register_fake
def _(a: Tensor, b: Tensor, use_kernel: bool = False, alg_id: int = 0) -> Tensor:
    _check_mm(a, b)
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.custom_op("nm::mvue_sparse_mm", mutates_args=())
def mvue_sparse_mm(a: Tensor, b: Tensor, exact: bool, arch: str = "", alg_id: int = 0) -> Tensor:
    """``mvue(a, 2, 4) @ b``: the MVUE grad-weight GEMM ``dY^T X`` with ``dY^T`` pruned 2:4 along
    tokens by an unbiased stochastic mask (:func:`nmcompile.solvers.mvue.mvue`, ``exact`` or
    ``approx``), ``a`` ``[out, tokens]``, ``b`` ``[tokens, in]``, the result ``[out, in]`` in
    ``a``'s dtype.

    ``arch`` (a verified compressed layout, ``"sm90"``/``"sm80"``): the Triton kernel of
    :mod:`nmcompile.kernels.mvue24` draws the mask and writes the compressed operand in one
    pass, then the 2:4 sparse kernel multiplies; ``""``: the draw in torch ops and a dense
    GEMM. Randomness comes from torch's generator either way. Used in backward graphs only
    (no gradient).
    """
    _check_mm(a, b)
    if arch and a.numel():
        from ..kernels import mvue24

        return mvue24.sparse_mm(a, b, arch, exact=exact, alg_id=alg_id)
    tokens = a.shape[1]
    padded = a if tokens % 4 == 0 else torch.cat([a, a.new_zeros(a.shape[0], -tokens % 4)], 1)
    pruned = mvue(padded, 2, 4, method="exact" if exact else "approx")[:, :tokens]
    return emulation.sparse_mm(pruned, b)


@mvue_sparse_mm.register_fake
def _(a: Tensor, b: Tensor, exact: bool, arch: str = "", alg_id: int = 0) -> Tensor:
    _check_mm(a, b)
    return a.new_empty((a.shape[0], b.shape[1]))


def _check_mm(a: Tensor, b: Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or a.dtype != b.dtype:
        raise ValueError(
            f"nm::sparse_mm: cannot multiply {a.dtype} {tuple(a.shape)} by {b.dtype} "
            f"{tuple(b.shape)}"
        )


def _sparse_mm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:2])


def _sparse_mm_backward(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a = grad @ b.t() if ctx.needs_input_grad[0] else None
    grad_b = a.t() @ grad if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None, None


sparse_mm.register_autograd(_sparse_mm_backward, setup_context=_sparse_mm_setup)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _forward_setup(ctx, inputs, output) -> None:
    x, weight, mask, bias, _, _ = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None


def _forward_backward(ctx, grad):
    # Straight-through estimator: the weight gradient is the dense one, as in the graph rewrite.
    x, weight, mask = ctx.saved_tensors
    grad_x = (linear_grad_input(grad, weight.to(grad.dtype), mask)
              if ctx.needs_input_grad[0] else None)
    grad_w = ((_flat(grad).t() @ _flat(x)).to(weight.dtype)
              if ctx.needs_input_grad[1] else None)
    grad_b = _flat(grad).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_x, grad_w, None, grad_b, None, None


def _grad_input_setup(ctx, inputs, output) -> None:
    grad_out, weight, mask, _, _ = inputs
    ctx.save_for_backward(grad_out, weight, mask)


def _grad_input_backward(ctx, grad):
    grad_out, weight, mask = ctx.saved_tensors
    grad_g = (linear_forward(grad, weight.to(grad.dtype), mask)
              if ctx.needs_input_grad[0] else None)
    grad_w = ((_flat(grad_out).t() @ _flat(grad)).to(weight.dtype)
              if ctx.needs_input_grad[1] else None)
    return grad_g, grad_w, None, None, None


linear_forward.register_autograd(_forward_backward, setup_context=_forward_setup)
linear_grad_input.register_autograd(_grad_input_backward, setup_context=_grad_input_setup)
