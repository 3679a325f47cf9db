"""The dense -> sparse -> dense schedule (``sparse_start``, ``sparse_stop``), the continuous switch
at ``sparse_stop`` and ``nmcompile.apply_masks``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmcompile
from tests.reference import masked_reference


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


WEIGHTS = {"fc1.weight", "fc2.weight"}


def _check_call(model, compiled, x, phase):
    """Run one call; check its output against the right reference for ``phase``."""
    before = nmcompile.masks(model) if phase == "switch" else None
    ref_model = copy.deepcopy(model)
    out = compiled(x)
    if phase == "dense":
        torch.testing.assert_close(out, ref_model(x))
    elif phase == "sparse":
        ref = masked_reference(model, nmcompile.masks(model))
        torch.testing.assert_close(out.double(), ref(x.double()), rtol=1e-4, atol=1e-5)
    else:  # the first dense call computes what the sparse model computed at these weights
        ref = masked_reference(ref_model, before)
        torch.testing.assert_close(out.double(), ref(x.double()), rtol=1e-4, atol=1e-5)
        for name, param in model.named_parameters():
            if name in before:
                assert torch.equal(param.detach() == 0, ~before[name]), name  # W <- W*M
    return out


@pytest.mark.parametrize("options", [
    pytest.param({}, id="in-graph masks"),
    pytest.param({"mask_interval": 2}, id="masks outside the graph"),
    pytest.param({"inductor": True}, id="inductor", marks=pytest.mark.slow),
])
def test_phases_switch_by_optimizer_step(options, tmp_path):
    torch.manual_seed(0)
    model = Mlp()
    compiled = torch.compile(model, backend="nm", options={
        "inductor": False, "min_numel": 0, "sparse_start": 2, "sparse_stop": 5,
        "dump_dir": str(tmp_path), **options})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    x = torch.randn(8, 32)
    expected = ["dense"] * 2 + ["sparse"] * 3 + ["switch"] + ["dense"] * 2
    phases = []
    for phase in expected:
        for _ in range(2):  # two micro-steps per optimizer step: the second is no step
            out = _check_call(model, compiled, x, phase)
            phase = "dense" if phase == "switch" else phase
            out.square().mean().backward()
        phases.append(nmcompile.stats(model)["fc1.weight"].phase)
        assert set(nmcompile.masks(model)) == (WEIGHTS if phase == "sparse" else set())
        opt.step()
        opt.zero_grad()
    assert phases == (["dense (before sparse_start=2)"] * 2 + ["sparse"] * 3
                      + ["dense (from sparse_stop=5)"] * 3)
    assert (tmp_path / "phases.txt").read_text().splitlines() == [
        "graph 0: from optimizer step 0: dense (before sparse_start=2)",
        "graph 0: from optimizer step 2: sparse",
        "graph 0: from optimizer step 5: dense (from sparse_stop=5)",
    ]


def test_sparse_kernels_switch_too(cslt):
    """The dense phases run no sparse kernel; the compressed path prunes with its own masks."""
    torch.manual_seed(0)
    model = Mlp().bfloat16()
    compiled = torch.compile(model, backend="nm", options={
        "inductor": False, "min_numel": 0, "kernels": "sparse", "sparse_start": 1,
        "sparse_stop": 3})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 32, dtype=torch.bfloat16)
    calls = []
    for _ in range(5):
        before = cslt.mm_calls
        compiled(x).float().square().mean().backward()
        calls.append(cslt.mm_calls - before)
        if len(calls) == 4:  # pruned at the switch (at most 2 of every 4 kept)
            assert (model.fc1.weight == 0).float().mean().item() >= 0.5
        opt.step()
        opt.zero_grad()
    assert calls == [0, 3, 3, 0, 0]  # forward x2 + grad-input of fc2 in the sparse steps


def _compiled_blocks(sparse_stop: int):
    """3 blocks, each compiled on its own (regional compilation), and their optimizer."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(Mlp() for _ in range(3))
    for block in blocks:
        block.compile(backend="nm", options={"inductor": False, "min_numel": 0,
                                             "sparse_stop": sparse_stop})
    return blocks, torch.optim.SGD(blocks.parameters(), lr=0.1)


def test_regional_compilation_switches_every_block():
    blocks, opt = _compiled_blocks(sparse_stop=2)
    x = torch.randn(8, 32, requires_grad=True)
    for _ in range(3):
        h = x
        for block in blocks:
            h = block(h)
        h.square().mean().backward()
        opt.step()
        opt.zero_grad()
    for i in range(3):
        assert nmcompile.stats(blocks)[f"{i}.fc1.weight"].phase == "dense (from sparse_stop=2)"
        assert nmcompile.stats(blocks)[f"{i}.fc1.weight"].refreshes >= 1


def test_every_block_is_pruned_at_its_own_first_dense_call():
    blocks, opt = _compiled_blocks(sparse_stop=1)
    x = torch.randn(8, 32, requires_grad=True)
    h = x
    for block in blocks:
        h = block(h)
    h.square().mean().backward()
    opt.step()
    wanted = [nmcompile.masks(block) for block in blocks]  # what the next sparse step uses
    h = x
    for block, masks in zip(blocks, wanted, strict=True):
        weights = {n: p.detach().clone() for n, p in block.named_parameters()}
        h = block(h)  # the first dense call of this block prunes it
        for name, mask in masks.items():
            assert torch.equal(block.get_parameter(name).detach(),
                               torch.where(mask, weights[name], 0)), name


@pytest.mark.parametrize("options, words", [
    ({"sparse_start": -1}, ["sparse_start", ">= 0"]),
    ({"sparse_start": 1.5}, ["sparse_start", "int"]),
    ({"sparse_stop": 0}, ["sparse_stop", "> sparse_start=0"]),
    ({"sparse_start": 5, "sparse_stop": 5}, ["sparse_stop", "> sparse_start=5"]),
    ({"sparse_stop": "end"}, ["sparse_stop"]),
])
def test_bad_schedules_name_the_key(options, words):
    with pytest.raises(ValueError) as info:
        nmcompile.NMConfig.from_options(options)
    assert all(w in str(info.value) for w in words)


def test_apply_masks_prunes_in_place_and_keeps_the_function():
    torch.manual_seed(0)
    model = Mlp()
    compiled = torch.compile(model, backend="nm", options={"inductor": False, "min_numel": 0})
    x = torch.randn(8, 32)
    sparse_out = compiled(x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = nmcompile.apply_masks(model)
    assert set(masks) == WEIGHTS
    for name, param in model.named_parameters():
        want = torch.where(masks[name], weights[name], 0) if name in masks else weights[name]
        assert torch.equal(param.detach(), want), name
    torch.testing.assert_close(model(x), sparse_out)  # the dense pruned model, same function
    assert nmcompile.apply_masks(nn.Linear(4, 4)) == {}
