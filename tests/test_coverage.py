"""Weights of a module compiled with ``backend="nm"`` that no nm graph reads (Dynamo ran the
code that uses them eagerly) are named in one DenseFallbackWarning and in the dump."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import nmcompile
from nmcompile.fallback import DenseFallbackWarning


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return x + self.fc(x)


class Net(nn.Module):
    """Root-level layers around blocks called in a loop that breaks the graph (as FSDP2's
    hooks do): Dynamo runs ``Net.forward`` eagerly, each block's ``forward`` is compiled."""

    def __init__(self, loop_break: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 32)
        self.inp = nn.Linear(32, 32)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.frozen = nn.Linear(32, 32).requires_grad_(False)
        self.unused = nn.Linear(32, 32)
        self.tiny = nn.Linear(32, 4)
        self.head = nn.Linear(32, 32)
        self.loop_break = loop_break

    def forward(self, idx):
        x = self.inp(self.emb(idx))
        for block in self.blocks:
            if self.loop_break:
                torch._dynamo.graph_break()
            x = block(x)
        return self.head(self.frozen(x)).sum() + self.tiny(x).sum()


def _train(model, options, steps=2):
    compiled = torch.compile(model, backend="nm", options={"inductor": False, **options})
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            compiled(torch.randint(0, 16, (4, 8))).backward()
            opt.step()
            opt.zero_grad()
    return [str(w.message) for w in caught if issubclass(w.category, DenseFallbackWarning)]


def test_weights_of_an_eager_frame_are_named_once_and_dumped(tmp_path):
    torch.manual_seed(0)
    model = Net()
    found = _train(model, {"dump_dir": str(tmp_path)}, steps=3)
    # inp and head train dense; the embedding (no GEMM), the frozen and the unused layer (no
    # gradient) and the layer below min_numel (dense anyway) are not listed
    assert len(found) == 1, found
    assert "['head.weight', 'inp.weight']" in found[0] and "of the Net compiled" in found[0]
    summary = nmcompile.read_summary(tmp_path)
    assert sorted(summary["unread"]) == ["head.weight", "inp.weight"]
    assert sorted(nmcompile.masks(model)) == ["blocks.0.fc.weight", "blocks.1.fc.weight"]


@pytest.mark.parametrize("options", [{"exclude": ["inp*", "head*"]},
                                     {"include": ["blocks.*"]}])
def test_layers_left_dense_on_purpose_are_not_warned_about(options):
    assert _train(Net(), options) == []


def test_a_model_compiled_whole_is_not_warned_about():
    model = Net(loop_break=False)
    assert _train(model, {}) == []
    assert {"inp.weight", "head.weight"} <= set(nmcompile.masks(model))


class ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x):
        return x + self.norm(self.conv(x))


class ConvNet(nn.Module):
    """A stem convolution and a head at the root, around conv blocks called in a loop that
    breaks the graph: the stem's 4-D weight is named like a linear weight."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 3, padding=1)
        self.blocks = nn.ModuleList([ConvBlock(), ConvBlock()])
        self.head = nn.Conv1d(8, 32, 1)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            torch._dynamo.graph_break()
            x = block(x)
        return self.head(x.flatten(2)).square().mean()


def test_weights_of_any_rank_are_named():
    torch.manual_seed(0)
    model = ConvNet()
    compiled = torch.compile(model, backend="nm", options={"inductor": False})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(2, 4, 6, 6)).backward()
        opt.step()
    found = [str(w.message) for w in caught if issubclass(w.category, DenseFallbackWarning)]
    # the stem (4-D) and head (3-D) weights ran eagerly; biases and BatchNorm's 1-D weights
    # are not weights a mask would cover
    assert len(found) == 1 and "['head.weight', 'stem.weight']" in found[0], found
    assert sorted(nmcompile.masks(model)) == ["blocks.0.conv.weight", "blocks.1.conv.weight"]
