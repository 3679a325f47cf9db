"""S-STE (``prune="sste"``): the soft-thresholded weight in every sparse GEMM, the straight-through
gradient, the fixed per-tensor scale in ``stats()`` and mask checkpoints, the switch to the dense
tail and ``apply_masks``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import nmcompile
from nmcompile.dump import read_summary
from nmcompile.masking import MaskSpec, sparse_weight
from nmcompile.solvers import soft_threshold, soft_threshold_scale
from tests.reference import assert_grads_match

WEIGHTS = ("fc1.weight", "fc2.weight")
FORMS = {
    "transposable": {"forward": "transposable", "grad_input": "transposable"},
    "rowwise (paper)": {"forward": "rowwise", "grad_input": "dense"},
    "masks outside the graph": {"forward": "transposable", "mask_interval": 2},
    "with masked decay": {"forward": "transposable", "decay": 0.1},
}


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _compile(model, **options):
    return torch.compile(model, backend="nm", fullgraph=True, options={
        "inductor": False, "min_numel": 0, "prune": "sste", **options})


def _spec(options) -> MaskSpec:
    return MaskSpec(2, 4, options.get("forward", "transposable"))


def _reference(model, masks, scales, spec):
    """An fp64 copy of ``model`` whose masked weights hold ``beta * S(W)``: autograd through it
    gives the forward and grad-input of S-STE, and its weight gradients are what the
    straight-through estimator hands the dense weights."""
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name in masks:
                param.copy_(sparse_weight(param, masks[name], spec,
                                          torch.tensor(scales[name], dtype=torch.float64)))
    return ref


def _beta(weight, mask, spec):
    soft = soft_threshold(weight.detach().double(), mask, 4, spec.policy == "transposable")
    return soft_threshold_scale(weight.detach(), soft).item()


@pytest.mark.parametrize("form", list(FORMS))
def test_forward_and_gradients_are_those_of_the_soft_thresholded_weight(form):
    options = FORMS[form]
    torch.manual_seed(0)
    model = Mlp()
    compiled = _compile(model, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = None
    for _ in range(3):
        x = torch.randn(8, 16)
        out = compiled(x)
        masks = nmcompile.masks(model)
        scales = {name: s.scale for name, s in nmcompile.stats(model).items()}
        if first is None:  # the scale is fixed from the weights of the first sparse step
            first = {name: _beta(p, masks[name], _spec(options))
                     for name, p in model.named_parameters() if name in masks}
        assert set(masks) == set(WEIGHTS)
        assert scales == pytest.approx(first, rel=1e-6)
        ref = _reference(model, masks, scales, _spec(options))
        torch.testing.assert_close(out.double(), ref(x.double()), rtol=1e-4, atol=1e-5)
        out.square().mean().backward()
        ref(x.double()).square().mean().backward()
        for name, param in ref.named_parameters():  # the decay pulls the DENSE pruned weights
            if name in masks and options.get("decay"):
                dense = model.get_parameter(name).detach().double()
                param.grad += options["decay"] * torch.where(masks[name], 0.0, dense)
        assert_grads_match(model, ref)
        opt.step()
        opt.zero_grad()
    now = {name: _beta(p, masks[name], _spec(options)) for name, p in model.named_parameters()
           if name in masks}
    assert now != pytest.approx(first, rel=1e-3)  # recomputed, it would have moved
    assert counters["nmcompile"]["sste_weights"] == len(WEIGHTS)


def test_hard_threshold_is_the_positive_control():
    """The same check with ``prune="hard"`` fails against the S-STE reference."""
    torch.manual_seed(0)
    model = Mlp()
    x = torch.randn(8, 16)
    out = _compile(model, prune="hard")(x)
    masks = nmcompile.masks(model)
    ref = _reference(model, masks, {n: 1.0 for n in masks}, _spec({}))
    assert not torch.allclose(out.double(), ref(x.double()), rtol=1e-3, atol=1e-4)
    assert nmcompile.stats(model)["fc1.weight"].scale is None


def test_scale_is_saved_and_restored_with_the_mask_state():
    torch.manual_seed(0)
    model = Mlp()
    compiled = _compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    for _ in range(2):
        compiled(torch.randn(8, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = nmcompile.mask_state_dict(model)
    saved = {name: float(entry["scale"]) for name, entry in state.items()}
    x = torch.randn(4, 16)
    expected = compiled(x)
    masks = nmcompile.masks(model)
    # the control: a fresh start would fix its scale from the current weights, not these
    fresh = {name: _beta(model.get_parameter(name), masks[name], _spec({})) for name in saved}
    assert fresh != pytest.approx(saved, rel=1e-3)

    torch._dynamo.reset()
    resumed = Mlp()
    resumed.load_state_dict(model.state_dict())
    nmcompile.load_mask_state_dict(resumed, state)
    got = _compile(resumed)(x)
    assert {name: s.scale for name, s in nmcompile.stats(resumed).items()} == saved
    torch.testing.assert_close(got, expected)


def test_switch_to_the_dense_tail_keeps_the_function(tmp_path):
    torch.manual_seed(0)
    model = Mlp()
    compiled = _compile(model, sparse_stop=2, dump_dir=str(tmp_path))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        x = torch.randn(8, 16)
        if step == 2:  # the first dense call computes what the sparse graph would have
            masks = nmcompile.masks(model)
            scales = {name: s.scale for name, s in nmcompile.stats(model).items()}
            ref = _reference(model, masks, scales, _spec({}))
        out = compiled(x)
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(out.double(), ref(x.double()), rtol=1e-4, atol=1e-5)
    assert read_summary(tmp_path)["config"]["prune"] == "sste"


def test_apply_masks_writes_the_soft_thresholded_weight():
    torch.manual_seed(0)
    model = Mlp()
    x = torch.randn(8, 16)
    sparse_out = _compile(model)(x)
    scales = {name: s.scale for name, s in nmcompile.stats(model).items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = nmcompile.apply_masks(model)
    for name in WEIGHTS:
        want = sparse_weight(weights[name], masks[name], _spec({}), torch.tensor(scales[name]))
        assert torch.equal(model.get_parameter(name).detach(), want), name
    torch.testing.assert_close(model(x), sparse_out)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("forward", ["transposable", "rowwise"])
def test_convolutions_read_the_soft_thresholded_kernel(forward):
    """Convolutions too: forward, grad-input and the straight-through kernel gradient are those
    of ``beta * S(W)`` with S over the kernel's groups (m input channels at one position)."""
    options = {"forward": forward,
               "grad_input": "transposable" if forward == "transposable" else "dense"}
    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(2, 4, 6, 6)
    out = _compile(model, **options)(x)
    masks = nmcompile.masks(model)
    assert set(masks) == {"conv1.weight", "conv2.weight", "fc.weight"}
    scales = {name: s.scale for name, s in nmcompile.stats(model).items()}
    assert scales == pytest.approx(
        {n: soft_threshold_scale(model.get_parameter(n), sparse_weight(
            model.get_parameter(n).detach(), masks[n], _spec(options), torch.ones(()))).item()
         for n in masks}, rel=1e-6)
    ref = _reference(model, masks, scales, _spec(options))
    torch.testing.assert_close(out.double(), ref(x.double()), rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    ref(x.double()).square().sum().backward()
    assert_grads_match(model, ref)
    # the control: the hard-masked kernel is another function
    hard = _reference(model, masks, {n: 1.0 for n in masks}, _spec(options))
    for name, param in hard.named_parameters():
        if name in masks:
            with torch.no_grad():
                param.copy_(torch.where(masks[name], model.get_parameter(name).double(), 0))
    assert not torch.allclose(out.double(), hard(x.double()), rtol=1e-3, atol=1e-4)
