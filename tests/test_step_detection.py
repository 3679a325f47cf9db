"""Every way a weight changes between calls is seen by the masks solved outside the graph, or
the user is told once: version counters (in-place updates, ``copy_``, ``load_state_dict``),
``step()`` of any ``torch.optim`` optimizer (fused, foreach, ``.data`` writes inside it), and a
sampled check of the first calls for writes that escape both."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import nmcompile
from nmcompile.solvers import transposable_mask_scored


class Lamb(torch.optim.Optimizer):
    """A LAMB-style optimizer that writes through ``.data`` (no version bump)."""

    def __init__(self, params, lr: float = 0.05) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


def _optimizers():
    return {
        "adamw fused": lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
        "adamw foreach": lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=True),
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5),
        "lamb-style .data": lambda ps: Lamb(ps),
    }


def _compiled(model, **options):
    return torch.compile(model, backend="nm", options={"inductor": False, "min_numel": 0,
                                                       **options})


@pytest.mark.parametrize("optimizer", list(_optimizers()))
@pytest.mark.parametrize("method", ["patterns", "mcf"])
def test_every_optimizer_step_is_counted(optimizer, method):
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    compiled = _compiled(lin, mask_interval=2, transposable_method=method)
    opt = _optimizers()[optimizer](lin.parameters())
    x = torch.randn(16, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing goes unseen here
        for _ in range(4):
            compiled(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        compiled(x)
    # refreshed at the first call and after steps 2 and 4
    assert nmcompile.stats(lin)["weight"].refreshes == 3
    w = lin.weight.detach()
    want = (transposable_mask_scored(w, 2, 4) if method == "patterns"
            else nmcompile.solvers.transposable_mask(w, 2, 4, method="mcf"))
    assert torch.equal(nmcompile.masks(lin)["weight"], want)


def test_gradient_accumulation_micro_steps_are_not_steps():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    compiled = _compiled(lin, mask_interval=2)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.05, fused=True)
    x = torch.randn(16, 64)
    for _ in range(3):
        for _ in range(4):
            compiled(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    compiled(x)
    assert nmcompile.stats(lin)["weight"].refreshes == 2  # at the first call, after step 2


@pytest.mark.parametrize("write", ["copy_ under no_grad", "load_state_dict"])
def test_direct_writes_bump_the_version(write):
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    compiled = _compiled(lin, mask_interval=1, transposable_method="greedy")
    x = torch.randn(16, 64)
    compiled(x)
    new = torch.randn(64, 64)
    if write == "load_state_dict":
        lin.load_state_dict({"weight": new, "bias": lin.bias.detach().clone()})
    else:
        with torch.no_grad():
            lin.weight.copy_(new)
    out = compiled(x)
    mask = nmcompile.solvers.transposable_mask(new, 2, 4, method="greedy")
    assert torch.equal(nmcompile.masks(lin)["weight"], mask)
    torch.testing.assert_close(out, x @ torch.where(mask, new, 0).t() + lin.bias)


@pytest.mark.parametrize("options", [{"mask_interval": 1, "transposable_method": "greedy"},
                                     {"mask_interval": 2}])
def test_writes_outside_any_optimizer_are_found_and_told_once(options):
    """A hand-written SGD through ``.data``: warned once, then masks follow every call."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    compiled = _compiled(lin, **options)
    x = torch.randn(16, 64)
    caught = []
    for _ in range(5):
        with warnings.catch_warnings(record=True) as found:
            warnings.simplefilter("always")
            out = compiled(x)
        caught += [w for w in found if issubclass(w.category, RuntimeWarning)]
        mask = nmcompile.masks(lin)["weight"]
        torch.testing.assert_close(
            out, x @ torch.where(mask, lin.weight.detach(), 0).t() + lin.bias.detach())
        out.square().mean().backward()
        lin.weight.data.add_(lin.weight.grad, alpha=-0.5)
        lin.weight.grad = None
    assert len(caught) == 1 and "weight changed between two calls" in str(caught[0].message)
    assert "parameter weight" in str(caught[0].message)
    if options["mask_interval"] == 1:  # every call refreshes from the current weight
        want = nmcompile.solvers.transposable_mask(lin.weight.detach(), 2, 4, method="greedy")
        compiled(x)
        assert torch.equal(nmcompile.masks(lin)["weight"], want)


def test_compressed_weights_follow_writes_outside_any_optimizer(cslt):
    torch.manual_seed(0)
    lin = nn.Linear(64, 64).bfloat16()
    compiled = _compiled(lin, kernels="sparse")
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="changed between two calls"):
        for _ in range(3):
            out = compiled(x)
            mask = nmcompile.masks(lin)["weight"]
            ref = x.float() @ torch.where(mask, lin.weight.detach(), 0).float().t()
            torch.testing.assert_close(out.float(), ref + lin.bias.float(), rtol=2e-2,
                                       atol=2e-2)
            lin.weight.data.mul_(-1.5)
    assert cslt.mm_calls == 3


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(40, 96)
        self.down = nn.Linear(96, 40)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("options", [{"mask_interval": 2},
                                     {"transposable_method": "greedy"}],
                         ids=["interval2", "greedy"])
def test_graphs_that_stop_checking_do_not_fool_the_ones_still_checking(options):
    """One block graph compiled per block class serves 2 blocks, and a no_grad graph runs after
    every step: the no_grad graph's bank stops sampling after its first calls while it keeps
    counting steps, which must not make the training graph's next sampled check see a change
    without a step (a spurious warning, and masks refreshed at every call from then on)."""
    torch.manual_seed(0)
    blocks = nn.Sequential(_Block(), _Block())
    for block in blocks:
        block.compile(backend="nm", options={"inductor": False, **options})
    opt = torch.optim.SGD(blocks.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(4):
            blocks(torch.randn(8, 40)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                blocks(torch.randn(8, 40))
    # refreshed at steps 0 and 2 and at the no_grad call after step 3 (interval 2), or once
    # per step (interval 1)
    expected = 3 if options.get("mask_interval") == 2 else 5
    assert {s.refreshes for s in nmcompile.stats(blocks).values()} == {expected}
