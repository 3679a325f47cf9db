"""Masks over time: refresh interval, out-of-graph solvers, Bi-Mask, stats, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmcompile
from nmcompile.masking import BackwardSpec, compute_backward_mask
from nmcompile.solvers import nm_mask, transposable_mask
from tests.reference import assert_grads_match, masked_reference


class Mlp(nn.Module):
    def __init__(self, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _compile(model, **options):
    return torch.compile(model, backend="nm", fullgraph=True,
                         options={"inductor": False, "min_numel": 0, **options})


def _train(model, compiled, steps, lr=0.5, micro=1, seed=0, check=True):
    """SGD steps; returns the masks each step used. Checks grads against the reference."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    used = []
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(micro):
            x = torch.randn(8, 16, generator=gen)
            loss = compiled(x).square().mean()
            masks = nmcompile.masks(model)
            if check:
                ref = masked_reference(model, masks)
                ref(x.double()).square().mean().backward()
            loss.backward()
        if check and micro == 1:
            assert_grads_match(model, ref)
        used.append(masks)
        opt.step()
    return used


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_mask_interval_refreshes_every_k_steps():
    torch.manual_seed(0)
    model = Mlp()
    used = _train(model, _compile(model, mask_interval=3), steps=7, lr=2.0)
    for step in range(1, 7):
        assert _same(used[step], used[step - 1]) == (step % 3 != 0), step
    assert not _same(used[3], used[0]) or not _same(used[6], used[3])
    assert nmcompile.stats(model)["fc1.weight"].refreshes == 3


def test_gradient_accumulation_reuses_the_mask():
    torch.manual_seed(0)
    model = Mlp()
    _train(model, _compile(model, transposable_method="greedy"), steps=3, micro=2, check=False)
    assert {s.refreshes for s in nmcompile.stats(model).values()} == {3}


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_min_cost_flow_masks_outside_the_graph(n, m):
    torch.manual_seed(0)
    model = Mlp()
    used = _train(model, _compile(model, n=n, m=m, forward="transposable",
                                  transposable_method="mcf"), steps=2)
    compiled = _compile(model, n=n, m=m, forward="transposable", transposable_method="mcf")
    compiled(torch.randn(2, 16))  # the weights changed: this call refreshes from them
    weight = model.fc1.weight.detach()
    for name, mask in used[-1].items():
        tiles = mask.reshape(mask.shape[0] // m, m, mask.shape[1] // m, m)
        assert tiles.sum(1).max() <= n and tiles.sum(3).max() <= n, name
    exact = transposable_mask(weight, n, m, method="mcf")
    assert torch.equal(nmcompile.masks(model)["fc1.weight"], exact)


def test_bimask_backward_mask_drives_grad_input(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(16, 32, bias=False)
    compiled = _compile(layer, grad_input="bimask", bimask_candidates=4,
                        dump_dir=str(tmp_path))
    x = torch.randn(8, 16, requires_grad=True)
    y = compiled(x)
    cot = torch.randn_like(y)
    (y * cot).sum().backward()
    weight = layer.weight.detach()
    forward = nm_mask(weight, 2, 4)
    assert torch.equal(nmcompile.masks(layer)["weight"], forward)
    backward = compute_backward_mask(weight, forward, BackwardSpec(2, 4, 4, "optimized"))
    assert not torch.equal(backward, forward)
    torch.testing.assert_close(y, x.detach() @ torch.where(forward, weight, 0).t())
    torch.testing.assert_close(x.grad, cot @ torch.where(backward, weight, 0))
    rows = nmcompile.read_summary(tmp_path)["matmuls"]
    grad_input = [r for r in rows if r["role"] == "grad_input"]
    assert [r["became"] for r in grad_input] == ["nm.linear_grad_input (bimask)"]


def test_stats_in_graph_and_bank():
    torch.manual_seed(0)
    in_graph = Mlp()
    _train(in_graph, _compile(in_graph), steps=1, check=False)
    first = nmcompile.stats(in_graph)["fc1.weight"]
    assert first.flip_rate is None and 0 < first.density <= 0.5 and 0.5 < first.kept_fraction < 1
    _train(in_graph, _compile(in_graph), steps=2, lr=3.0, check=False)
    assert 0 < nmcompile.stats(in_graph)["fc1.weight"].flip_rate < 1
    bank = Mlp()
    _train(bank, _compile(bank, mask_interval=2), steps=3, lr=3.0, check=False)
    fc1 = nmcompile.stats(bank)["fc1.weight"]
    assert fc1.refreshes == 2 and 0 < fc1.flip_rate < 1


@pytest.mark.parametrize("load_before_compile", [True, False])
def test_resume_from_checkpoint_takes_the_same_next_steps(load_before_compile):
    torch.manual_seed(0)
    model = Mlp()
    compiled = _compile(model, mask_interval=3)
    _train(model, compiled, steps=5, lr=2.0, check=False)  # mid-interval: refreshed at 0, 3
    weights = copy.deepcopy(model.state_dict())
    mask_state = nmcompile.mask_state_dict(model)
    expected = _train(model, compiled, steps=3, lr=2.0, seed=1, check=False)

    torch._dynamo.reset()
    resumed = Mlp()
    resumed.load_state_dict(weights)
    compiled = _compile(resumed, mask_interval=3)
    if load_before_compile:
        nmcompile.load_mask_state_dict(resumed, mask_state)
    else:
        compiled(torch.randn(2, 16))  # compiles and refreshes from the loaded weights
        resumed.load_state_dict(weights)
        nmcompile.load_mask_state_dict(resumed, mask_state)
    got = _train(resumed, compiled, steps=3, lr=2.0, seed=1, check=False)
    for step in range(3):
        assert _same(got[step], expected[step]), step
    for a, b in zip(resumed.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_load_mask_state_rejects_unknown_names():
    with pytest.raises(KeyError, match="nope"):
        nmcompile.load_mask_state_dict(Mlp(), {"nope": {}})


def test_dense_tail_by_recompiling_with_a_dense_backend():
    """The documented dense fine-tuning: compile the same module with a dense backend."""
    torch.manual_seed(0)
    model = Mlp()
    sparse = _compile(model, decay=0.1)
    _train(model, sparse, steps=2, check=False)
    x = torch.randn(4, 16)
    torch._dynamo.reset()
    dense = torch.compile(model, backend="aot_eager")
    out = dense(x)
    torch.testing.assert_close(out, model(x))  # every weight is back in the forward
    masked = masked_reference(model, nmcompile.masks(model))(x.double())
    assert not torch.allclose(out.double(), masked, atol=1e-4)
    out.square().sum().backward()
    assert model.fc1.weight.grad is not None


def test_flip_rate_that_stays_high_is_warned_once(monkeypatch):
    from nmcompile import state

    monkeypatch.setattr(state, "_flip_warned", False)
    torch.manual_seed(0)
    model = Mlp()
    compiled = _compile(model)
    x = torch.randn(8, 16)
    compiled(x)
    nmcompile.stats(model)  # first reading: no flip rate yet
    caught = []
    for _ in range(5):
        with torch.no_grad():  # a new random weight: about half of the mask flips
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        with _record() as found:
            nmcompile.stats(model)
        caught += [w for w in found if "not settling" in str(w.message)]
    assert len(caught) == 1 and "decay" in str(caught[0].message)
    # calm masks: readings below the threshold never warn
    monkeypatch.setattr(state, "_flip_warned", False)
    with _record() as found:
        for _ in range(5):
            nmcompile.stats(model)
    assert not [w for w in found if "not settling" in str(w.message)]


def _record():
    import warnings

    class _Rec(warnings.catch_warnings):
        def __enter__(self):
            found = super().__enter__()
            warnings.simplefilter("always")
            return found

    return _Rec(record=True)
