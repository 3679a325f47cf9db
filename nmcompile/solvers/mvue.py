"""Minimum-variance unbiased (MVUE) N:M pruning of neural gradients (Chmiel et al., ICLR 2023).

Pruning the output gradient ``dY`` to N:M by magnitude is biased, and the bias accumulates
over training. MVUE pruning keeps each element ``a_i`` of a group with an inclusion
probability ``p_i`` and rescales a kept element to ``a_i / p_i``, so ``E[out] = x`` exactly.

* ``exact``: ``p_i = min(1, |a_i| / d)``, with ``d`` chosen so that ``sum(p) = n``
  (water-filling: an element with ``|a_i| >= d`` is kept surely). Among unbiased estimators
  keeping at most ``n`` per group this minimises the variance ``sum(a_i^2 (1/p_i - 1))``.
  The kept set is drawn by systematic sampling: lay the non-sure ``p_i`` end to end on
  ``[0, b)`` (``b`` = number of slots left after the sure elements) and keep the elements
  whose interval holds one of the points ``u, u+1, ..., u+b-1`` for one uniform ``u``.
  A point falls in element ``i``'s interval with probability ``p_i`` exactly, and since every
  interval is half-open and no longer than 1 it holds at most one point: the ``b`` points
  select ``b`` distinct elements. For 1:2 this is "keep ``a_i`` with probability
  ``|a_i| / (|a_1| + |a_2|)`` at value ``sign(a_i)(|a_1| + |a_2|)``".
* ``approx`` (2:4 only; 1:2 falls back to exact, which it equals): draw ``i`` with
  probability ``|a_i| / S``, then ``j != i`` with probability ``|a_j| / (S - |a_i|)``, and
  rescale each kept element by its inclusion probability under that two-draw scheme,
  ``pi_k = q_k + |a_k| * sum_{i != k} q_i / (S - |a_i|)`` with ``q = |a| / S``.

Groups with at most ``n`` non-zeros are kept exactly, all-zero groups stay zero. Everything
is plain torch ops without data-dependent Python control flow, so the backend can trace it
into the compiled backward graph. Arithmetic is float32 (float64 for float64 inputs). With
probability of order the float rounding unit a draw may keep one element fewer than planned
(a uniform landing exactly on a rounded interval end); the result is always a valid pattern.
"""

from __future__ import annotations

import torch

__all__ = ["mvue"]

_SUPPORTED = ((1, 2), (2, 4))
_METHODS = ("exact", "approx")


def mvue(
    x: torch.Tensor,
    n: int,
    m: int,
    method: str = "exact",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prune ``x`` to ``n:m`` along its last dim with an unbiased stochastic mask.

    Returns a tensor of ``x``'s shape and dtype holding at most ``n`` non-zeros in every
    group of ``m`` consecutive elements along the last dim, with ``E[mvue(x)] == x``.
    ``method`` is ``"exact"`` (minimum variance) or ``"approx"`` (two sequential draws
    proportional to magnitude). Uniforms come from ``torch.rand(..., generator=generator)``,
    so ``torch.manual_seed`` (or a seeded ``generator``) makes a draw reproducible.
    """
    if (n, m) not in _SUPPORTED:
        raise ValueError(f"mvue supports the ratios 1:2 and 2:4, got {n}:{m}")
    if method not in _METHODS:
        raise ValueError(f"mvue method must be one of {_METHODS}, got {method!r}")
    if x.dim() < 1 or x.shape[-1] % m:
        raise ValueError(
            f"shape {tuple(x.shape)}: the last dim must be a multiple of m={m} for {n}:{m} groups"
        )
    work = torch.promote_types(x.dtype, torch.float32)
    groups = x.to(work).reshape(*x.shape[:-1], x.shape[-1] // m, m)
    if method == "exact" or n == 1:
        out = _exact(groups, n, generator)
    else:
        out = _approx(groups, generator)
    return out.reshape(x.shape).to(x.dtype)


def _uniform(groups: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` uniforms in ``[0, 1)`` per group, shaped ``[..., groups, count]``."""
    shape = (*groups.shape[:-1], count)
    if generator is None:  # rand's generator overload needs concrete sizes (no dynamic shapes)
        return torch.rand(shape, device=groups.device, dtype=groups.dtype)
    return torch.rand(shape, generator=generator, device=groups.device, dtype=groups.dtype)


def _bounds(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end of each element's interval when the weights ``w`` are laid end to end.

    Starts are the ends shifted by one, so adjacent intervals share their bound exactly.
    """
    end = torch.cumsum(w, dim=-1)
    return torch.cat([torch.zeros_like(end[..., :1]), end[..., :-1]], dim=-1), end


def _exact(groups: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """Exact MVUE draw on ``[..., g, m]`` groups for ``n`` in {1, 2}."""
    mag = groups.abs()
    nonzero = mag > 0
    few = nonzero.sum(dim=-1, keepdim=True) <= n
    total = mag.sum(dim=-1, keepdim=True)
    # Water level d: sum(min(1, |a|/d)) = n. For n = 2 the largest element is kept surely
    # when 2*max >= S, and the other three share one slot: d = S - max. Otherwise d = S/n.
    top = mag.amax(dim=-1, keepdim=True)
    level = total / n
    if n == 2:
        level = torch.where(2 * top >= total, total - top, level)
    level = torch.where(few | (level <= 0), torch.ones_like(level), level)
    prob = torch.clamp(mag / level, max=1.0)
    sure = few & nonzero | (prob >= 1)
    prob = torch.where(sure, torch.ones_like(prob), torch.where(few, 0.0, prob))

    # Systematic sampling over the non-sure elements with b = n - #sure points u + k.
    budget = n - sure.sum(dim=-1, keepdim=True)
    share = torch.where(sure, torch.zeros_like(prob), prob)
    start, end = _bounds(share)
    u = _uniform(groups, 1, generator)
    # Points below position t: clamp(ceil(t - u), 0, b). Element k holds a point iff the
    # count rises between its interval's start and end; the last end is b by construction.
    end = torch.cat([end[..., :-1], budget.to(end.dtype)], dim=-1)
    below_start = torch.clamp(torch.ceil(start - u), min=0)
    below_end = torch.minimum(torch.clamp(torch.ceil(end - u), min=0), budget.to(end.dtype))
    picked = (below_end > below_start) & (share > 0)

    kept_value = torch.where(sure, groups, torch.sign(groups) * level)
    return torch.where(sure | picked, kept_value, torch.zeros_like(groups))


def _approx(groups: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Two sequential magnitude-proportional draws on ``[..., g, 4]`` groups (2:4)."""
    mag = groups.abs()
    nonzero = mag > 0
    few = nonzero.sum(dim=-1, keepdim=True) <= 2
    u = _uniform(groups, 2, generator)
    first = _draw_one(mag, u[..., :1])
    second = _draw_one(torch.where(first, torch.zeros_like(mag), mag), u[..., 1:])

    total = mag.sum(dim=-1, keepdim=True)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    q = mag / safe_total
    rest = total - mag
    # r_i = q_i / (S - |a_i|): the chance that i is drawn first, per unit of a second weight.
    r = torch.where(rest > 0, q / torch.where(rest > 0, rest, torch.ones_like(rest)), 0.0)
    incl = q + mag * (r.sum(dim=-1, keepdim=True) - r)
    keep = torch.where(few, nonzero, first | second)
    incl = torch.where(few | ~keep, torch.ones_like(incl), incl)
    return torch.where(keep, groups / incl, torch.zeros_like(groups))


def _draw_one(weight: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One-hot draw of an index with probability ``weight / weight.sum()`` (none if all 0)."""
    start, end = _bounds(weight)
    target = u * end[..., -1:]
    return (start <= target) & (target < end) & (weight > 0)
