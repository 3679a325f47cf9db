"""``nmcompile.masks()`` reports exactly the mask the compiled graph applied.

The graph scores the tiles of all its weights in one batched matmul; ``masks()`` recomputes
each weight alone, and a refresh outside the graph scores them in bounded batches. The applied
masked weight is read back from the graph itself: a layer fed the identity matrix returns
``(W * M)^T`` exactly. Weights are crafted for ties (``arange``, repeated values, all-equal
tiles) and for tiny values next to large ones in tiles that are already admissible.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmcompile
from nmcompile.solvers import tile_patterns


class Parallel(nn.Module):
    """Linear layers with independent inputs, all in one graph (one batched mask solve)."""

    def __init__(self, shapes, dtypes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=False, dtype=d)
                                    for (o, i), d in zip(shapes, dtypes, strict=True))

    def forward(self, *xs):
        return [layer(x) for layer, x in zip(self.layers, xs, strict=True)]


def crafted(kind: str, shape, dtype) -> torch.Tensor:
    rows, cols = shape
    k = torch.arange(1, rows * cols + 1, dtype=torch.float64).view(rows, cols)
    w = {
        "arange": lambda: k * 0.01,  # the issue's weight
        "repeated": lambda: torch.tensor([0.3, 0.1, 0.2, 0.3], dtype=torch.float64).repeat(
            rows, cols // 4),
        "equal": lambda: torch.full(shape, 0.5, dtype=torch.float64),
        "thirds": lambda: torch.tensor([0.1, 0.2, 0.3, 0.6], dtype=torch.float64)[k.long() * 7 % 4],
        "randn": lambda: torch.randn(shape, generator=torch.Generator().manual_seed(rows + cols),
                                     dtype=torch.float64),
    }[kind]()
    return w.to(dtype)


def applied(model: Parallel, compiled) -> list[torch.Tensor]:
    """The masked weight each layer's forward GEMM used, read back through the graph."""
    eyes = [torch.eye(layer.in_features, dtype=layer.weight.dtype) for layer in model.layers]
    return [out.detach().t() for out in compiled(*eyes)]


def check(model: Parallel, **options) -> None:
    compiled = torch.compile(model, backend="nm", fullgraph=True,
                             options={"inductor": False, "min_numel": 0, **options})
    used = applied(model, compiled)
    masks = nmcompile.masks(model)
    assert sorted(masks) == [f"layers.{i}.weight" for i in range(len(model.layers))]
    for i, (layer, got) in enumerate(zip(model.layers, used, strict=True)):
        w = layer.weight.detach()
        expected = torch.where(masks[f"layers.{i}.weight"], w, 0.0)
        assert torch.equal(got, expected), (i, w.dtype, (got != expected).sum())
    state = nmcompile.mask_state_dict(model)
    assert all(torch.equal(state[k]["forward"], masks[k]) for k in masks)


def test_the_issue_example_fp64_sequential():
    """The issue's model: ``masks()`` gives a reference with the graph's own output."""
    model = nn.Sequential(nn.Linear(16, 8, bias=False), nn.Linear(8, 16, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1, 129).view(8, 16) * 0.01)
    compiled = torch.compile(model, backend="nm", options={"inductor": False, "min_numel": 0})
    x = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = compiled(x)
    masks = nmcompile.masks(model)
    ref = x
    for i, layer in enumerate(model):
        ref = ref @ torch.where(masks[f"{i}.weight"], layer.weight, 0.0).t()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["arange", "repeated", "equal", "thirds"])
def test_masks_equal_the_applied_masks_in_one_batched_graph(dtype, kind):
    # the crafted weight between a small and a large companion (other BLAS blocking)
    shapes = [(8, 16), (8, 16), (256, 128)]
    model = Parallel(shapes, [dtype] * 3)
    with torch.no_grad():
        for layer, k in zip(model.layers, ["randn", kind, "arange"], strict=True):
            layer.weight.copy_(crafted(k, layer.weight.shape, dtype))
    check(model)


@pytest.mark.parametrize("dtypes", [
    (torch.float32, torch.float64),  # the fp64 weight promotes the batch's scores
    (torch.bfloat16, torch.float32, torch.float16),
])
def test_mixed_dtypes_in_one_graph(dtypes):
    shapes = [(8, 16), (16, 8), (32, 64)][: len(dtypes)]
    model = Parallel(shapes, dtypes)
    with torch.no_grad():
        for layer, kind in zip(model.layers, ["arange", "thirds", "repeated"], strict=False):
            layer.weight.copy_(crafted(kind, layer.weight.shape, layer.weight.dtype))
    check(model)


@pytest.mark.parametrize("options", [{"mask_interval": 2},
                                     {"mask_interval": 3, "grad_input": "dense"}])
def test_masks_solved_outside_the_graph_are_the_applied_ones(options):
    model = Parallel([(8, 16), (64, 32)], [torch.float32, torch.float32])
    with torch.no_grad():
        model.layers[0].weight.copy_(crafted("arange", (8, 16), torch.float32))
        model.layers[1].weight.copy_(crafted("thirds", (64, 32), torch.float32))
    check(model, **options)


def admissible(dtype: torch.dtype, low: float, shape=(16, 16)) -> torch.Tensor:
    """A weight already in a transposable 2:4 pattern whose tiles hold 0.9 down to ``low``."""
    gen = torch.Generator().manual_seed(1)
    table = torch.from_numpy(tile_patterns(2, 4)).reshape(-1, 4, 4)
    rows, cols = shape
    w = torch.zeros(rows // 4, cols // 4, 4, 4, dtype=torch.float64)
    for i in range(rows // 4):
        for j in range(cols // 4):
            pattern = table[int(torch.randint(len(table), (1,), generator=gen))]
            k = int(pattern.sum())
            values = torch.logspace(0, 1, k, base=low / 0.9, dtype=torch.float64) * 0.9
            w[i, j][pattern] = values[torch.randperm(k, generator=gen)]
    return w.permute(0, 2, 1, 3).reshape(shape).to(dtype)


@pytest.mark.parametrize("dtype, low", [
    (torch.float16, 1e-7), (torch.float16, 6e-8),  # the last is fp16's smallest subnormal
    (torch.bfloat16, 1e-9), (torch.bfloat16, 1e-40),  # a bf16 subnormal
    (torch.float32, 1e-9), (torch.float32, 1e-45),
])
def test_an_admissible_weight_keeps_its_tiny_non_zeros_in_the_graph(dtype, low):
    model = Parallel([(16, 16), (32, 16)], [dtype, dtype])
    with torch.no_grad():
        model.layers[0].weight.copy_(admissible(dtype, low))
        model.layers[1].weight.copy_(crafted("randn", (32, 16), dtype))
    w = model.layers[0].weight.detach().clone()
    assert (w != 0).sum() > 100 and w[w != 0].abs().min() < 1e-6
    check(model)
    compiled = torch.compile(model, backend="nm", options={"inductor": False, "min_numel": 0})
    assert torch.equal(applied(model, compiled)[0], w)  # every non-zero kept
    assert torch.equal(nmcompile.masks(model)["layers.0.weight"] & (w != 0), w != 0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masks_equal_the_applied_masks_under_inductor(dtype):
    model = Parallel([(8, 16), (16, 16), (64, 128)], [dtype] * 3)
    with torch.no_grad():
        model.layers[0].weight.copy_(crafted("arange", (8, 16), dtype))
        model.layers[1].weight.copy_(admissible(dtype, 1e-9 if dtype != torch.float16 else 1e-7))
        model.layers[2].weight.copy_(crafted("thirds", (64, 128), dtype))
    check(model, inductor=True)
