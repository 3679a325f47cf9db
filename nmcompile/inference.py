"""Serving a model trained with the ``nm`` backend on 2:4 sparse tensor cores."""

from __future__ import annotations

import torch
from torch import nn

from .kernels import cusparselt
from .ops.emulation import masked_weight
from .state import masks as current_masks

__all__ = ["to_semi_structured"]


def _is_2_4(mask: torch.Tensor) -> bool:
    """Whether every aligned group of 4 along the last dim keeps at most 2 entries."""
    if mask.shape[-1] % 4:
        return False
    return bool((mask.reshape(*mask.shape[:-1], -1, 4).sum(-1) <= 2).all())


def to_semi_structured(model: nn.Module) -> dict[str, str]:
    """Replace every masked ``nn.Linear`` weight by its 2:4 semi-structured sparse tensor.

    Each weight ``W`` (``[out, in]``, bf16 or fp16, on a GPU with sparse tensor cores) becomes
    ``torch.sparse.to_sparse_semi_structured(W * M)`` with the mask ``nmcompile.masks(model)``
    reports, as a frozen parameter: ``F.linear`` then runs PyTorch's semi-structured kernels
    (cuSPARSELt on H100/H200). For inference only (the sparse weight takes no gradient).

    Returns ``{parameter name: "converted" or the reason it was left as it is}`` (a convolution
    kernel, a weight of another module type such as GPT-2's ``Conv1D``, a mask that is not 2:4
    along in-features, a shape the kernels do not take).

    Raises:
        ValueError: the model has no masked weights (compile it with ``backend="nm"`` and run it
            once, or load its masks with ``nmcompile.load_mask_state_dict``).
        RuntimeError: a masked weight is not on a CUDA device with sparse tensor cores.
    """
    root = getattr(model, "_orig_mod", model)
    found = current_masks(root)
    if not found:
        raise ValueError("to_semi_structured: the model has no masked weights; compile it with "
                         "backend='nm' and run it once first")
    params = dict(root.named_parameters())
    for name in found:
        device = params[name].device
        if device.type != "cuda" or cusparselt.device_reason(device):
            raise RuntimeError(
                f"to_semi_structured: {name} is on {device}; 2:4 semi-structured weights run on "
                "NVIDIA GPUs with sparse tensor cores (sm80+): move the model there first, "
                "e.g. model.cuda().to(torch.bfloat16)")
    modules = dict(root.named_modules())
    report: dict[str, str] = {}
    for name, mask in found.items():
        owner, _, attr = name.rpartition(".")
        module, weight = modules[owner], params[name]
        reason = None
        if isinstance(module, nn.modules.conv._ConvNd) and attr == "weight":
            reason = (f"left dense: {type(module).__name__}.weight: torch has no 2:4 "
                      "semi-structured convolution (nmcompile.apply_masks prunes it for a dense "
                      "one)")
        elif not isinstance(module, nn.Linear) or attr != "weight":
            reason = f"left dense: {type(module).__name__}.{attr} is not an nn.Linear weight"
        elif not _is_2_4(mask):
            reason = "left dense: the mask is not 2:4 along in-features"
        else:
            reason = cusparselt.sparse_operand_reason(*weight.shape, weight.dtype)
            reason = f"left dense: {reason}" if reason else None
        if reason is None:
            dense = masked_weight(weight.detach(), mask.to(weight.device))
            sparse = torch.sparse.to_sparse_semi_structured(dense)
            module.weight = nn.Parameter(sparse, requires_grad=False)
            reason = "converted"
        report[name] = reason
    return report
