"""PEFT (``peft``) adapters on a 2:4 base model.

Low-rank adapters (LoRA's ``lora_A``/``lora_B``, DoRA's magnitude vector, LoHa, LoKr, ...)
stay dense by default: at rank 8 their GEMMs are far too small for a sparse kernel to gain
anything, and a 2:4 mask would remove half of the adapter's capacity. The frozen base weights
they adapt stay masked; their weights never change, so neither do their masks.

Merging an adapter into its base weight (``merge_and_unload()``) adds the dense update
``B @ A * scaling`` to a 2:4 weight, which is then dense again. :func:`merge_and_prune` merges
and prunes each merged weight with the mask its base weight was trained under, so the merged
model is 2:4 with the training masks; what that costs is measured in the README.

Which parameters are adapter weights is read from PEFT itself: every tuner layer class
(subclasses of ``peft.tuners.tuners_utils.BaseTunerLayer``) lists the attribute names of its
adapter weights in ``adapter_layer_names``; a parameter whose name has one of those as a
component is an adapter weight. Nothing here imports ``peft``: a model can hold PEFT adapters
only once ``peft`` was imported.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["adapter_layer", "adapter_layer_names", "merge_and_prune"]


def adapter_layer_names() -> frozenset[str]:
    """The attribute names PEFT's tuner layers keep adapter weights under (``lora_A``,
    ``lora_B``, ``lora_magnitude_vector``, ``hada_w1_a``, ...); empty while ``peft`` is not
    imported."""
    if "peft" not in sys.modules:
        return frozenset()
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - a peft without tuner layers
        return frozenset()
    names: set[str] = set()
    todo = [BaseTunerLayer]
    while todo:
        cls = todo.pop()
        names.update(getattr(cls, "adapter_layer_names", ()))
        todo.extend(cls.__subclasses__())
    return frozenset(names)


def adapter_layer(name: str) -> str | None:
    """The PEFT adapter attribute in parameter name ``name`` (``lora_A`` for
    ``...q_proj.lora_A.default.weight``), or ``None`` if it is no adapter weight."""
    adapters = adapter_layer_names()
    if not adapters:
        return None
    return next((part for part in name.split(".") if part in adapters), None)


def merge_and_prune(model: Any, masks: Mapping[str, torch.Tensor] | None = None
                    ) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Merge a PEFT model's adapters into its base weights and prune each merged weight with
    its base weight's mask: the merged model is N:M with the masks it was trained under.

    Args:
        model: a ``peft.PeftModel`` (or its ``LoraModel``) whose base model was trained with
            ``backend="nm"``.
        masks: ``{name: bool mask}`` by the PEFT model's parameter names
            (``...q_proj.base_layer.weight``), e.g. ``nmcompile.masks(model)`` before
            merging; ``None`` reads ``nmcompile.masks(model)``.

    Returns:
        ``(merged, merged_masks)``: the merged base model (what ``merge_and_unload()``
        returns, pruned in place) and its masks by its own parameter names
        (``model.layers.0.self_attn.q_proj.weight``).

    Raises:
        ValueError: if ``model`` has no ``merge_and_unload`` (not a PEFT model), if there are
            no masks, or a mask's shape differs from its merged weight's.
    """
    from ..state import masks as current_masks

    if not callable(getattr(model, "merge_and_unload", None)):
        raise ValueError(f"merge_and_prune needs a PEFT model (with merge_and_unload()), got "
                         f"{type(model).__name__}")
    found = dict(current_masks(model) if masks is None else masks)
    if not found:
        raise ValueError("merge_and_prune: no masks (compile the model with backend='nm' and "
                         "run a step first, or pass masks=)")
    merged = model.merge_and_unload()
    params = dict(merged.named_parameters())
    out = {}
    with torch.no_grad():
        for name, mask in found.items():
            target = _merged_name(name, params)
            weight = params[target]
            if tuple(mask.shape) != tuple(weight.shape):
                raise ValueError(f"merge_and_prune: the mask of {name} is {tuple(mask.shape)}, "
                                 f"the merged weight {target} is {tuple(weight.shape)}")
            weight.mul_(mask.to(weight.device))
            out[target] = mask
    return merged, out


def _merged_name(name: str, params: Mapping[str, Any]) -> str:
    """The name of PEFT parameter ``name`` in the merged model: without the ``base_model.model.``
    prefix(es) and the ``.base_layer`` component PEFT inserts."""
    parts = [p for p in name.split(".") if p != "base_layer"]
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if candidate in params:
            return candidate
    raise ValueError(f"merge_and_prune: {name} has no weight in the merged model")
