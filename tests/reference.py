"""The fp64 masked-dense reference every numerical test compares against."""

from __future__ import annotations

import copy

import torch
from torch import nn


def masked_reference(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """An fp64 copy of ``model`` whose masked weights hold ``where(mask, W, 0)``.

    Autograd through it gives exactly what the rewritten graph must: the forward and grad-input
    GEMMs use the masked weight, and the weight gradient ``dY^T X`` is the straight-through
    (dense) gradient the backend hands to the dense weight.
    """
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name in masks:
                param.copy_(torch.where(masks[name], param, 0.0))
    ref.zero_grad(set_to_none=True)
    return ref


def assert_grads_match(model: nn.Module, ref: nn.Module, rtol: float = 1e-4,
                       atol: float = 1e-5) -> None:
    """Every parameter gradient of ``model`` equals the reference's (fp64) within tolerance."""
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        expected = ref_params[name].grad
        if expected is None:
            assert param.grad is None, name
            continue
        assert param.grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(param.grad.double(), expected, rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")
        checked += 1
    assert checked > 0


def check_against_masked_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                                   cotangent: torch.Tensor,
                                   masks: dict[str, torch.Tensor]) -> None:
    """``y = compiled(x)`` and the gradients of ``(y * cotangent).sum()`` (already taken, into
    ``x.grad`` and the parameters' ``.grad``) equal the fp64 masked reference's."""
    ref = masked_reference(model, masks)
    xr = x.detach().double().requires_grad_()
    yr = ref(xr)
    (yr * cotangent.double()).sum().backward()
    torch.testing.assert_close(y.double(), yr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-5)
    assert_grads_match(model, ref)
