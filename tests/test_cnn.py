"""CNNs end to end through ``backend="nm"``: a ResNet-18-shaped model compiled whole (no graph
break), its eval graph, and the mask machinery (stats, checkpoints, apply_masks, the schedule,
masked decay, dynamic batch sizes, Inductor) on convolution weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nmcompile
from nmcompile import read_summary
from nmcompile.models import ResNet
from tests.reference import check_against_masked_reference, masked_reference


def _resnet18_shaped() -> ResNet:
    """ResNet-18's layout (7x7 stride-2 stem, max-pool, 4 stages of 2 basic blocks, strided
    1x1 shortcuts) at a quarter of its widths."""
    return ResNet(blocks=(2, 2, 2, 2), widths=(16, 32, 64, 128), in_channels=3, num_classes=16)


def test_resnet18_shaped_compiles_whole_and_matches_the_masked_reference(tmp_path):
    torch.manual_seed(0)
    model = _resnet18_shaped()
    assert sum(1 for m in model.modules() if isinstance(m, nn.Conv2d)) == 20  # as ResNet-18
    options = {"inductor": False, "dump_dir": str(tmp_path)}
    compiled = torch.compile(model, backend="nm", options=options, fullgraph=True)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    y = compiled(x)
    cot = torch.randn(y.shape)
    (y * cot).sum().backward()
    masks = nmcompile.masks(model)
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(masks) == (convs - {"stem.0.weight"}) | {"fc.weight"}  # the 3-channel stem: dense
    rows = read_summary(tmp_path)["matmuls"]
    forward = {r["param"]: r for r in rows if r["role"] == "forward"}
    assert len(forward) == 21 and all(forward[p]["sparse"] for p in masks)
    assert "3 input channels per group, not a multiple of m=4" in forward["stem.0.weight"]["reason"]
    assert sum(r["sparse"] for r in rows if r["role"] == "grad_input") == 20
    _within_float32_error(model, masks, x, y, cot)

    model.eval()  # the eval graph: the same masks, no backward
    with torch.no_grad():
        out = compiled(x.detach())
    ref = masked_reference(model, masks).eval()
    torch.testing.assert_close(out.double(), ref(x.detach().double()), rtol=1e-4, atol=1e-5)


def _within_float32_error(model, masks, x, y, cot, factor=4.0):
    """Output and gradients of the compiled model are as close to the fp64 masked reference as
    the eager float32 masked model is, within ``factor`` (20 layers of batch norm amplify
    float32 rounding beyond a fixed tolerance)."""
    results = {}
    for dtype in (torch.float64, torch.float32):
        ref = masked_reference(model, masks).to(dtype)
        xr = x.detach().to(dtype).requires_grad_()
        out = ref(xr)
        (out * cot.to(dtype)).sum().backward()
        results[dtype] = (out, xr.grad, {n: p.grad for n, p in ref.named_parameters()})
    exact, eager = results[torch.float64], results[torch.float32]
    compiled = (y, x.grad, {n: p.grad for n, p in model.named_parameters()})
    pairs = [(compiled[0], eager[0], exact[0], "output"), (compiled[1], eager[1], exact[1], "x")]
    pairs += [(compiled[2][n], eager[2][n], exact[2][n], n) for n in exact[2]]
    for got, f32, ref, name in pairs:
        bound = factor * (f32.double() - ref).abs().max().item() + 1e-7
        assert (got.double() - ref).abs().max().item() <= bound, name


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(8, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def _train(model, steps, options, x=None):
    compiled = torch.compile(model, backend="nm", options={"inductor": False, **options})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        out = compiled(torch.randn(4, 8, 5, 5, generator=gen) if x is None else x)
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()
    return compiled


def test_stats_checkpoints_and_apply_masks_cover_conv_weights():
    torch.manual_seed(0)
    model = SmallCNN()
    compiled = _train(model, 3, {"mask_interval": 2})
    stats = nmcompile.stats(model)
    assert sorted(stats) == ["c1.weight", "c2.weight"]
    assert all(abs(s.density - 0.5) < 0.05 and s.refreshes == 2 for s in stats.values())
    state = nmcompile.mask_state_dict(model)
    assert state["c1.weight"]["forward"].shape == (16, 8, 3, 3)
    resumed = copy.deepcopy(model)
    nmcompile.load_mask_state_dict(resumed, state)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        sparse = compiled(x)
    found = nmcompile.apply_masks(model)  # pruned: the dense model computes the sparse one
    assert torch.equal(model.c1.weight == 0, ~found["c1.weight"] | (model.c1.weight == 0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), sparse)


def test_schedule_prunes_conv_weights_at_sparse_stop():
    """At ``sparse_stop`` every masked kernel is pruned in place: 2:4 along in-channels at each
    kernel position, then trained dense."""
    torch.manual_seed(0)
    model = SmallCNN()
    compiled = _train(model, 2, {"sparse_stop": 2})
    assert (model.c1.weight != 0).all()  # sparse phase: the dense weights are kept
    compiled(torch.randn(2, 8, 5, 5))  # the call at the switch
    for conv in (model.c1, model.c2):
        kept = (conv.weight != 0).movedim(1, -1).reshape(-1, 4).sum(-1)
        assert kept.max() <= 2 and kept.float().mean() > 1.9
    assert nmcompile.stats(model)["c1.weight"].phase.startswith("dense")


def test_masked_decay_on_conv_weights():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5)
    grads = {}
    for decay in (0.0, 0.5):
        model = SmallCNN()
        torch.manual_seed(0)
        model.load_state_dict(SmallCNN().state_dict())
        compiled = torch.compile(model, backend="nm", options={"inductor": False,
                                                                "decay": decay})
        compiled(x).square().mean().backward()
        grads[decay] = model.c1.weight.grad.clone()
        mask = nmcompile.masks(model)["c1.weight"]
        weight = model.c1.weight.detach()
    torch.testing.assert_close(grads[0.5] - grads[0.0], 0.5 * torch.where(mask, 0.0, weight))


def test_dynamic_batch_sizes_stay_symbolic(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN()
    compiled = torch.compile(model, backend="nm", dynamic=True,
                             options={"inductor": False, "dump_dir": str(tmp_path)})
    for batch in (2, 3, 5):
        x = torch.randn(batch, 8, 5, 5, requires_grad=True)
        y = compiled(x)
        cot = torch.randn(y.shape)
        model.zero_grad()
        (y * cot).sum().backward()
        check_against_masked_reference(model, x, y, cot, nmcompile.masks(model))
    summary = read_summary(tmp_path)
    assert {r["graph_id"] for r in summary["matmuls"]} == {0}  # one graph for every batch
    batch = {s for s, source in summary["symbols"]["0"].items() if source == "L['x'].size()[0]"}
    assert all(r["shapes"][0][0] in batch for r in summary["matmuls"] if r["role"] == "forward")


@pytest.mark.slow
@pytest.mark.parametrize("grad_weight", ["dense", "mvue"])
def test_inductor_compiles_the_conv_ops(tmp_path, grad_weight):
    # the 1x1 conv has no bias: BatchNorm cancels it, so its gradient is 0 up to fp32 rounding
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    compiled = torch.compile(model, backend="nm", fullgraph=True,
                             options={"dump_dir": str(tmp_path), "grad_weight": grad_weight})
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = compiled(x)
    cot = torch.randn(y.shape)
    (y * cot).sum().backward()
    masks = nmcompile.masks(model)
    assert sorted(masks) == ["0.weight", "2.weight"]
    if grad_weight == "dense":
        check_against_masked_reference(model, x, y, cot, masks)
    bw = (tmp_path / "graph_000" / "backward.py").read_text()
    assert bw.count("torch.ops.nm.conv_grad_input.default(") == 2


@pytest.mark.slow
def test_digits_example_trains_on_the_bundled_images():
    """The example end to end on two recipes (the others differ only in their options, each
    tested above): dense, and Bi-Mask, whose mask bank also masks the 10-class head row-wise
    (10 out-features: no backward mask, the exact gradient)."""
    pytest.importorskip("sklearn", reason="scikit-learn is an optional extra (nmcompile[cnn])")
    from examples.cnn_digits import main

    dense, bimask = main(["--steps", "3", "--recipes", "dense", "Bi-Mask"])
    assert dense["masked"] == [] and 0.0 <= dense["test_accuracy"] <= 1.0
    convs = [f"stages.{i}.0.conv{j}.weight" for i in range(3) for j in (1, 2)]
    assert set(convs) <= set(bimask["masked"]) and "fc.weight" in bimask["masked"]
    assert "stem.0.weight" not in bimask["masked"]  # one input channel
