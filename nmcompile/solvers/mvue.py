"""Minimum-variance unbiased (MVUE) N:M pruning of neural gradients (Chmiel et al., ICLR 2023).

Pruning the output gradient ``dY`` to N:M by magnitude is biased, and the bias accumulates
over training. MVUE pruning keeps each element ``a_i`` of a group with an inclusion
probability ``p_i`` and rescales a kept element to ``a_i / p_i``, so ``E[out] = x`` exactly.

Any ratio ``0 < n < m <= 8`` (1:2, 2:4, 1:4, 2:8, 4:8, ...):

* ``exact``: ``p_i = min(1, |a_i| / d)``, with ``d`` chosen so that ``sum(p) = n``
  (water-filling over the group's sorted magnitudes: an element with ``|a_i| >= d`` is kept
  surely). Among unbiased estimators
  keeping at most ``n`` per group this minimises the variance ``sum(a_i^2 (1/p_i - 1))``.
  The kept set is drawn by systematic sampling: lay the non-sure ``p_i`` end to end on
  ``[0, b)`` (``b`` = number of slots left after the sure elements) and keep the elements
  whose interval holds one of the points ``u, u+1, ..., u+b-1`` for one uniform ``u``.
  A point falls in element ``i``'s interval with probability ``p_i`` exactly, and since every
  interval is half-open and no longer than 1 it holds at most one point: the ``b`` points
  select ``b`` distinct elements. For 1:2 this is "keep ``a_i`` with probability
  ``|a_i| / (|a_1| + |a_2|)`` at value ``sign(a_i)(|a_1| + |a_2|)``".
* ``approx``, cheaper (no sort) and also unbiased, with a larger variance:

  - 2:4: draw ``i`` with probability ``|a_i| / S``, then ``j != i`` with probability
    ``|a_j| / (S - |a_i|)``, and rescale each kept element by its inclusion probability under
    that two-draw scheme, ``pi_k = q_k + |a_k| * sum_{i != k} q_i / (S - |a_i|)`` with
    ``q = |a| / S``;
  - 1:2: the exact method (they coincide);
  - other ratios: ``p_i = min(1, n |a_i| / S)`` without water-filling (the mass clipped off a
    dominant element is not handed to the others, so a group may keep fewer than ``n``), drawn
    by the same systematic sampling.

Groups with at most ``n`` non-zeros are kept exactly, all-zero groups stay zero. Everything
is plain torch ops without data-dependent Python control flow, so the backend can trace it
into the compiled backward graph. Arithmetic is float32 (float64 for float64 inputs). With
probability of order the float rounding unit a draw may keep one element fewer than planned
(a uniform landing exactly on a rounded interval end); the result is always a valid pattern.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_M", "mvue"]

#: Largest group size ``m`` (the sorts and sampling work on groups of up to 8 elements).
MAX_M = 8
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
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m <= MAX_M):
        raise ValueError(f"mvue needs 0 < n < m <= {MAX_M}, got {n}:{m}")
    if method not in _METHODS:
        raise ValueError(f"mvue method must be one of {_METHODS}, got {method!r}")
    if x.dim() < 1 or x.shape[-1] % m:
        raise ValueError(
            f"shape {tuple(x.shape)}: the last dim must be a multiple of m={m} for {n}:{m} groups"
        )
    work = torch.promote_types(x.dtype, torch.float32)
    groups = x.to(work).reshape(*x.shape[:-1], x.shape[-1] // m, m)
    if method == "exact" or (n, m) == (1, 2):
        out = _exact(groups, n, generator)
    elif (n, m) == (2, 4):
        out = _approx(groups, generator)
    else:
        out = _proportional(groups, n, generator)
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


def _water_level(mag: torch.Tensor, n: int) -> torch.Tensor:
    """The level ``d`` with ``sum(min(1, |a|/d)) = n`` for groups of more than ``n`` non-zeros.

    With the magnitudes sorted, ``s_0 >= s_1 >= ...``: if ``k`` elements are kept surely,
    ``d_k = sum_{i >= k} s_i / (n - k)``; the answer is the first ``k`` whose ``s_k <= d_k``
    (one exists: ``k = n - 1`` always qualifies).
    """
    s = mag.sort(dim=-1, descending=True).values
    tail = s.flip(-1).cumsum(dim=-1).flip(-1)[..., :n]  # sum_{i >= k} s_i, k < n
    left = torch.arange(n, 0, -1, device=mag.device, dtype=mag.dtype)  # n - k
    level = tail / left
    first = (s[..., :n] <= level).to(torch.int8).argmax(dim=-1, keepdim=True)
    return level.gather(-1, first)


def _exact(groups: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """Exact MVUE draw on ``[..., g, m]`` groups."""
    mag = groups.abs()
    nonzero = mag > 0
    few = nonzero.sum(dim=-1, keepdim=True) <= n
    level = _water_level(mag, n)
    level = torch.where(few | (level <= 0), torch.ones_like(level), level)
    prob = torch.clamp(mag / level, max=1.0)
    sure = few & nonzero | (prob >= 1)
    prob = torch.where(sure, torch.ones_like(prob), torch.where(few, 0.0, prob))
    picked = _systematic(prob, sure, n, generator, exact_total=True)
    kept_value = torch.where(sure, groups, torch.sign(groups) * level)
    return torch.where(sure | picked, kept_value, torch.zeros_like(groups))


def _systematic(prob: torch.Tensor, sure: torch.Tensor, n: int,
                generator: torch.Generator | None, exact_total: bool) -> torch.Tensor:
    """Which non-sure elements systematic sampling keeps, each with probability ``prob``.

    The non-sure ``prob`` are laid end to end and the points ``u, u+1, ...`` (one uniform
    ``u`` per group) select the elements whose interval holds one: an interval no longer than
    1 holds at most one point, so at most ``budget = n - #sure`` distinct elements are kept.
    ``exact_total``: the probabilities sum to ``budget`` exactly (water-filling); the last
    end is then set to it, so rounding cannot lose the last point.
    """
    budget = (n - sure.sum(dim=-1, keepdim=True)).to(prob.dtype)
    share = torch.where(sure, torch.zeros_like(prob), prob)
    start, end = _bounds(share)
    u = _uniform(prob, 1, generator)
    if exact_total:
        end = torch.cat([end[..., :-1], budget], dim=-1)
    # Points below position t: clamp(ceil(t - u), 0, budget). Element k holds a point iff the
    # count rises between its interval's start and end.
    below_start = torch.clamp(torch.ceil(start - u), min=0)
    below_end = torch.minimum(torch.clamp(torch.ceil(end - u), min=0), budget)
    return (below_end > below_start) & (share > 0)


def _proportional(groups: torch.Tensor, n: int,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Approximate MVUE for any ratio: ``p_i = min(1, n |a_i| / S)``, systematic sampling."""
    mag = groups.abs()
    nonzero = mag > 0
    few = nonzero.sum(dim=-1, keepdim=True) <= n
    total = mag.sum(dim=-1, keepdim=True)
    prob = torch.clamp(n * mag / torch.where(total > 0, total, torch.ones_like(total)), max=1.0)
    sure = few & nonzero | (prob >= 1)
    prob = torch.where(sure, torch.ones_like(prob), torch.where(few, 0.0, prob))
    picked = _systematic(prob, sure, n, generator, exact_total=False)
    safe = torch.where(prob > 0, prob, torch.ones_like(prob))
    return torch.where(sure | picked, groups / safe, torch.zeros_like(groups))


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
