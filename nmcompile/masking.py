"""What a forward mask is, in one place: the pass traces it into graphs, ``masks()`` reuses it.

The registry maps parameters (weakly, by identity) to the :class:`MaskSpec` a compiled graph
uses for them. It is the one piece of process state nmcompile keeps: it holds no tensors and
never keeps a parameter alive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .solvers import nm_mask, transposable_mask_patterns

__all__ = ["MaskSpec", "compute_mask", "masks", "remember", "spec_of"]


@dataclass(frozen=True)
class MaskSpec:
    """How the forward mask of one weight is computed.

    ``reduction_dim`` is the weight dim the forward GEMM reduces over (1 for ``nn.Linear``'s
    ``[out, in]`` weight, 0 for a ``[in, out]`` weight used as ``x @ W``): a row-wise mask is
    N:M along it. A transposable mask is N:M along both dims.
    """

    n: int
    m: int
    policy: str
    reduction_dim: int = 1


def compute_mask(weight: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """The boolean forward mask of ``weight`` (same shape) under ``spec``."""
    if spec.policy == "transposable":
        return transposable_mask_patterns(weight, spec.n, spec.m)
    if spec.reduction_dim == 1:
        return nm_mask(weight, spec.n, spec.m)
    return nm_mask(weight.t(), spec.n, spec.m).t()


_SPECS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def remember(param: torch.Tensor, spec: MaskSpec) -> None:
    """Record that compiled graphs mask ``param`` with ``spec``."""
    _SPECS[param] = spec


def spec_of(param: torch.Tensor) -> MaskSpec | None:
    """The spec compiled graphs use for ``param``, or ``None`` if none rewrote it."""
    return _SPECS.get(param)


def masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Boolean forward mask in use for every parameter the ``nm`` backend rewrote.

    Keys are the names of ``model.named_parameters()`` (a ``torch.compile``'d module is
    unwrapped, so its names match the original model's); values have the weight's shape.
    Masks are recomputed from the current weights exactly as the compiled graph computes them
    at the start of its next step.
    """
    model = getattr(model, "_orig_mod", model)
    out = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            spec = spec_of(param)
            if spec is not None:
                out[name] = compute_mask(param.detach(), spec)
    return out
