"""Masked weights whose gradients came from calls no nm graph served (Dynamo ran them eagerly,
for any reason) are named at the optimizer step, with the reason; calls run eagerly on purpose
and ordinary training are not warned about."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import nmcompile
import nmcompile.backend
from nmcompile import DenseFallbackWarning


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 16)
        self.head = nn.Linear(16, 16)  # excluded: dense on purpose, never reported

    def forward(self, x):
        return self.head(self.fc2(torch.relu(self.fc1(x))))


class Looped(nn.Module):
    """A graph break inside the loop (when ``trace`` is set) makes Dynamo skip the frame."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(2)])
        self.trace = False

    def forward(self, x):
        for layer in self.layers:
            x = layer(x).relu()
            if self.trace:
                torch._dynamo.graph_break()
        return x


def _train(model, batches, **compile_kwargs):
    """One optimizer step per list of micro-batch sizes; returns the DenseFallbackWarnings each
    step raised (its optimizer step's, and any other)."""
    compiled = torch.compile(model, backend="nm",
                             options={"inductor": False, "exclude": ["head*"]}, **compile_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    found = []
    for sizes in batches:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for size in sizes:
                compiled(torch.randn(size, 32)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        found.append([w for w in caught if issubclass(w.category, DenseFallbackWarning)])
    return found


def _step_warnings(found):
    return [[str(w.message) for w in step if "at this optimizer step" in str(w.message)]
            for step in found]


def test_ordinary_training_with_accumulation_and_new_sizes_warns_nothing():
    """Positive control: micro-steps, a recompile for a new size, two graphs per call."""
    torch.manual_seed(0)
    found = _train(Mlp(), [[8], [8, 8], [12, 4]])
    assert found == [[], [], []]


class Broken(Mlp):
    """Two graphs per call, and the second layer's weight read by both (tied)."""

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        torch._dynamo.graph_break()
        return self.head(self.fc2(h) + (h @ self.fc2.weight.t()))


def test_graph_breaks_between_nm_graphs_are_no_fallback():
    torch.manual_seed(0)
    model = Broken()
    found = _train(model, [[8], [8, 4]])
    assert found == [[], []]
    assert sorted(nmcompile.masks(model)) == ["fc1.weight", "fc2.weight"]


def test_an_error_suppressed_by_dynamo_is_named_with_its_reason(monkeypatch):
    torch.manual_seed(0)
    model = Mlp()
    calls = []
    original = nmcompile.backend._compile

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(nmcompile.backend, "_compile", fail_second)
    with torch._dynamo.config.patch(suppress_errors=True):
        found = _step_warnings(_train(model, [[8], [5], [8]], dynamic=False))
    assert found[0] == []
    assert len(found[1]) == 1
    message = found[1][0]
    assert "Mlp ['fc1.weight', 'fc2.weight']" in message and "head" not in message
    assert "the nm backend raised RuntimeError: injected failure" in message
    assert "Mlp.forward (" in message and "DENSE" in message
    # Dynamo now runs the frame eagerly for good, the size compiled before too: said again
    assert found[2] == found[1]


def test_a_skipped_frame_is_named_with_its_reason():
    torch.manual_seed(0)
    model = Looped()
    compiled = torch.compile(model, backend="nm", options={"inductor": False})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    messages = []
    for trace in (False, True):
        model.trace = trace
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled(torch.randn(8, 32)).sum().backward()
            opt.step()
        messages.append([str(w.message) for w in caught
                         if issubclass(w.category, DenseFallbackWarning)])
    assert messages[0] == []
    assert len(messages[1]) == 1
    assert "Looped ['layers.0.weight', 'layers.1.weight']" in messages[1][0]
    assert "Dynamo skipped the frame: graph break in loop" in messages[1][0]


def test_a_micro_step_past_the_recompile_limit_is_named():
    """One micro-step of two runs eagerly: the step is named, the limit given as the reason."""
    torch.manual_seed(0)
    with torch._dynamo.config.patch(recompile_limit=1):
        found = _train(Mlp(), [[8], [8, 12]], dynamic=False)
    assert found[0] == []
    messages = [str(w.message) for w in found[1]]
    assert len(messages) == 2  # the limit's own warning, then the step's
    assert "recompile_limit (1)" in messages[0]
    assert "Mlp ['fc1.weight', 'fc2.weight']" in messages[1]
    assert "past torch._dynamo.config.recompile_limit (1)" in messages[1]


@pytest.mark.parametrize("scope", ["global", "step"])
def test_eager_on_purpose_is_not_warned_about(scope):
    """torch.compiler.set_stance('force_eager') is the user's choice (documented, not warned)."""
    torch.manual_seed(0)
    model = Mlp()
    compiled = torch.compile(model, backend="nm", options={"inductor": False, "exclude": ["head*"]})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    compiled(torch.randn(8, 32)).sum().backward()  # the nm graph reads (and hooks) the weights
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseFallbackWarning)
        if scope == "global":
            torch.compiler.set_stance("force_eager")
            try:
                compiled(torch.randn(8, 32)).sum().backward()
                opt.step()
            finally:
                torch.compiler.set_stance("default")
        else:
            x = torch.randn(8, 32)
            with torch.no_grad():
                dense = model(x)
            with torch.compiler.set_stance("force_eager"):
                y = compiled(x)
                y.sum().backward()
                opt.step()
            torch.testing.assert_close(y, dense)  # eager: the dense model
    assert sorted(nmcompile.masks(model)) == ["fc1.weight", "fc2.weight"]
