"""Fully Sparse Training's fixed activation masks and gradient shift (Xu et al., AAAI 2022).

FST makes the grad-weight GEMM ``dW = dY^T X`` sparse by pruning the activation ``X`` along its
token (reduction) dim with a FIXED N:M mask instead of a data-dependent one: neighbouring
tokens are similar ("spatial similarity"), so dropping some of them loses little, and a fixed
pattern costs nothing to compute. Its information-restoration term is implemented here as a
gradient shift: the output gradient of each dropped token is added to the kept token that
stands for it, so ``sum_t dY_t X_t^T`` is approximated by ``sum_kept (dY_k + dY_dropped) X_k^T``
(exact when a dropped token's activation equals its kept neighbour's).

What is implemented, precisely: with stride ``s = m // n``, tokens ``0, s, 2s, ...`` of every
group of ``m`` consecutive tokens are kept, and each kept token absorbs the gradients of the
``s - 1`` tokens after it. What the paper leaves open and we chose: which fixed positions are
kept (the first of every ``s``), how tokens are ordered (the flattened ``[batch * seq]`` order
of the GEMM, so groups are consecutive positions of one sequence when ``seq % m == 0``), and
that the restoration is applied to the grad-weight GEMM only (forward and grad-input use the
weight masks).
"""

from __future__ import annotations

import torch

from ._shapes import check_ratio

__all__ = ["fst_keep", "fst_prune", "gradient_shift"]


def _stride(n: int, m: int) -> int:
    check_ratio(n, m)
    if m % n:
        raise ValueError(f"FST keeps every (m // n)-th token and needs n to divide m, got {n}:{m}")
    return m // n


def fst_keep(tokens: int, n: int = 2, m: int = 4, device: torch.device | None = None
             ) -> torch.Tensor:
    """The fixed boolean token mask: ``n`` of every ``m`` tokens, every ``m // n``-th kept."""
    stride = _stride(n, m)
    if tokens % m:
        raise ValueError(f"{tokens} tokens: FST {n}:{m} needs a multiple of m={m}")
    return torch.arange(tokens, device=device) % stride == 0


def fst_prune(x: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """``x [tokens, features]`` with the dropped tokens zeroed (N:M along dim 0)."""
    keep = fst_keep(x.shape[0], n, m, x.device)
    return torch.where(keep.unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def gradient_shift(grad: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """``grad [tokens, features]`` with each kept token holding the sum of its stride's rows.

    Rows of dropped tokens are left as they are: the pruned activation zeroes them out of the
    grad-weight GEMM.
    """
    stride = _stride(n, m)
    tokens, features = grad.shape
    if tokens % m:
        raise ValueError(f"{tokens} tokens: FST {n}:{m} needs a multiple of m={m}")
    summed = grad.reshape(tokens // stride, stride, features).sum(dim=1, keepdim=True)
    shifted = torch.cat([summed, grad.reshape(tokens // stride, stride, features)[:, 1:]], 1)
    return shifted.reshape(tokens, features)
