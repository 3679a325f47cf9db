"""One compiled graph, several sets of parameters: Dynamo reuses a graph for every instance of a
module class (regional compilation, ``block.compile()`` per block), and a module can be handed
new Parameter objects (``load_state_dict(assign=True)``). Masks follow the parameters of each
call, never the parameters the graph was traced with."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmcompile
from tests.reference import masked_reference

OPTIONS = [
    pytest.param({}, id="in-graph masks"),
    pytest.param({"mask_interval": 2}, id="masks outside the graph"),
    pytest.param({"transposable_method": "greedy"}, id="greedy outside the graph"),
]


class Block(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class Stack(nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _check_against_reference(model, x):
    out = model(x)  # the compiled blocks run inside; then masks() holds the masks they used
    masks = nmcompile.masks(model)
    weights = {n for n, p in model.named_parameters() if n.endswith("weight")}
    assert set(masks) == weights
    ref = masked_reference(model, masks)
    torch.testing.assert_close(out.double(), ref(x.detach().double()), rtol=1e-4, atol=1e-5)
    return masks


@pytest.mark.parametrize("options", OPTIONS)
def test_regional_compilation_masks_every_block_with_its_own_mask(options):
    torch.manual_seed(0)
    model = Stack()
    calls = torch._dynamo.utils.counters
    for block in model.blocks:
        block.compile(backend="nm", options={"inductor": False, "min_numel": 0, **options})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 32, requires_grad=True)  # every block's input needs a gradient
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert calls["stats"]["unique_graphs"] == 1  # one graph served the three blocks
    masks = _check_against_reference(model, x)
    assert not torch.equal(masks["blocks.0.fc1.weight"], masks["blocks.1.fc1.weight"])


@pytest.mark.parametrize("options", OPTIONS)
def test_new_parameter_objects_get_their_own_masks(options):
    """``load_state_dict(assign=True)`` replaces the Parameter objects the graph was traced with."""
    torch.manual_seed(0)
    block = Block()
    compiled = torch.compile(block, backend="nm",
                             options={"inductor": False, "min_numel": 0, **options})
    x = torch.randn(8, 32)
    compiled(x)
    block.load_state_dict({k: torch.randn_like(v) for k, v in block.state_dict().items()},
                          assign=True)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        compiled(x).square().mean().backward()
        opt.step()
    out = compiled(x)
    masks = nmcompile.masks(block)
    assert set(masks) == {"fc1.weight", "fc2.weight"}
    ref = masked_reference(block, masks)
    torch.testing.assert_close(out.double(), ref(x.double()), rtol=1e-4, atol=1e-5)
