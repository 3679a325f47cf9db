"""The masked-dense emulation of the ``nm::`` ops: the numbers a 2:4 kernel computes from the
compressed operand, on any device, with dense GEMMs (cuBLAS on a GPU).

It is the CPU path, the GPU path wherever a sparse kernel cannot or should not run (with the
reason in the dump), and the reference the sparse kernels are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

__all__ = ["conv_forward", "conv_grad_input", "linear_forward", "linear_grad_input",
           "masked_weight", "memory_format", "sparse_mm"]


def masked_weight(weight: Tensor, mask: Tensor) -> Tensor:
    """``weight`` with the entries outside ``mask`` set to zero (a pruned inf or NaN becomes 0)."""
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def linear_forward(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ (weight*mask).T + bias`` in ``x``'s dtype."""
    w = masked_weight(weight.to(x.dtype), mask)
    return torch.nn.functional.linear(x, w, bias).contiguous()


def linear_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
    """``grad_out @ (weight*mask)`` in ``grad_out``'s dtype."""
    return torch.matmul(grad_out, masked_weight(weight.to(grad_out.dtype), mask)).contiguous()


def sparse_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` on a dense GEMM (``a`` is already pruned)."""
    return torch.mm(a, b).contiguous()


def memory_format(x: Tensor) -> torch.memory_format:
    """The memory format a convolution op returns for activation ``x``: channels-last (2-D or
    3-D) when ``x`` is laid out so, else contiguous."""
    return suggest_memory_format(x)


def conv_forward(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None,
                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                 groups: int) -> Tensor:
    """``conv(x, weight*mask) + bias`` in ``x``'s dtype and memory format."""
    w = masked_weight(weight.to(x.dtype), mask)
    out = torch.ops.aten.convolution(x, w, bias, stride, padding, dilation, False,
                                     [0] * len(stride), groups)
    return out.contiguous(memory_format=memory_format(x))


def conv_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor, input_size: Sequence[int],
                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                    groups: int) -> Tensor:
    """The input gradient of ``conv(x, weight*mask)`` (a transposed convolution of
    ``grad_out``), ``input_size``, in ``grad_out``'s dtype and memory format."""
    w = masked_weight(weight.to(grad_out.dtype), mask)
    shape_only = grad_out.new_empty(1).expand(input_size)  # read for its size only
    out = torch.ops.aten.convolution_backward(
        grad_out, shape_only, w, None, stride, padding, dilation, False, [0] * len(stride),
        groups, [True, False, False])[0]
    return out.contiguous(memory_format=memory_format(grad_out))
