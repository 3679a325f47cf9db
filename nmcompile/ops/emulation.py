"""The masked-dense emulation of the ``nm::`` ops: the numbers a 2:4 kernel computes from the
compressed operand, on any device, with dense GEMMs (cuBLAS on a GPU).

It is the CPU path, the GPU path wherever a sparse kernel cannot or should not run (with the
reason in the dump), and the reference the sparse kernels are tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_forward", "linear_grad_input", "masked_weight", "sparse_mm"]


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
