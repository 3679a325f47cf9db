"""The backend end to end: entry point, option errors, Inductor graphs, TORCH_TRACE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import nmcompile
from nmcompile import read_summary
from nmcompile.models import GPTConfig, TinyGPT
from tests.reference import assert_grads_match, masked_reference


def test_entry_point_in_fresh_process_with_torch_trace(tmp_path):
    """``backend="nm"`` resolves without importing nmcompile; dumps reach TORCH_TRACE."""
    script = textwrap.dedent(
        """
        import sys, torch
        assert "nmcompile" not in sys.modules
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 32))
        compiled = torch.compile(model, backend="nm", fullgraph=True,
                                 options={"inductor": False, "dump_dir": sys.argv[1]})
        compiled(torch.randn(8, 32)).sum().backward()
        print("nmcompile" in sys.modules)
        """
    )
    env = {**os.environ, "TORCH_TRACE": str(tmp_path / "trace")}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "dump")], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "True"
    rows = read_summary(tmp_path / "dump")["matmuls"]
    # 2 forward + 1 grad_input: the input needs no gradient, so layer 0 has no grad-input GEMM
    assert sorted((r["role"], r["sparse"]) for r in rows) == [
        ("forward", True), ("forward", True), ("grad_input", True),
        ("grad_weight", False), ("grad_weight", False)]
    trace = "".join(p.read_text() for p in (tmp_path / "trace").iterdir())
    for name in ("nm_summary", "nm_graph0_joint_after.py", "nm_graph0_backward.py"):
        assert f'"name": "{name}"' in trace, name


def test_unknown_option_raises_value_error_naming_it():
    compiled = torch.compile(nn.Linear(8, 8), backend="nm", options={"nn": 2})
    with pytest.raises(ValueError, match=r"unknown nm backend option\(s\) 'nn'.*valid options"):
        compiled(torch.randn(2, 8))


def test_invalid_value_raises_before_tracing():
    compiled = torch.compile(nn.Linear(8, 8), backend="nm", options={"n": 3, "m": 2})
    with pytest.raises(ValueError, match="0 < n < m"):
        compiled(torch.randn(2, 8))
    assert "forward_sparse" not in counters["nmcompile"]


@pytest.mark.slow
def test_inductor_two_block_transformer_fullgraph(tmp_path):
    """The acceptance test: fullgraph, zero graph breaks, every parameter GEMM sparse."""
    torch.manual_seed(0)
    cfg = GPTConfig(seq_len=16, d_model=32, n_layer=2, n_head=2)
    model = TinyGPT(cfg)
    compiled = torch.compile(model, backend="nm", fullgraph=True,
                             options={"dump_dir": str(tmp_path), "min_numel": 0})
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    loss = compiled(idx, idx)
    masks = nmcompile.masks(model)
    loss.backward()

    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    linears = sorted(n for n, p in model.named_parameters() if n.endswith("weight")
                     and p.dim() == 2 and not n.startswith(("tok", "pos")))
    assert sorted(masks) == linears
    summary = read_summary(tmp_path)
    for role in ("forward", "grad_input"):
        rows = [r for r in summary["matmuls"] if r["role"] == role]
        assert sorted(r["param"] for r in rows) == linears
        assert all(r["sparse"] for r in rows)
    graph = tmp_path / "graph_000"
    assert graph.joinpath("forward.py").read_text().count("torch.ops.nm.linear_forward") == 9
    assert graph.joinpath("backward.py").read_text().count("torch.ops.nm.linear_grad_input") == 9

    ref = masked_reference(model, masks)
    ref_loss = ref(idx, idx)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_match(model, ref, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_inductor_inference_graph_is_rewritten(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    compiled = torch.compile(model, backend="nm", options={"dump_dir": str(tmp_path)})
    x = torch.randn(8, 32)
    with torch.no_grad():
        out = compiled(x)
    masks = nmcompile.masks(model)
    assert sorted(masks) == ["0.weight", "2.weight"]
    torch.testing.assert_close(out.double(), masked_reference(model, masks)(x.double()),
                               rtol=1e-5, atol=1e-6)
    rows = json.loads((tmp_path / "summary.json").read_text())["matmuls"]
    assert [(r["role"], r["sparse"]) for r in rows] == [("forward", True)] * 2


@pytest.mark.slow
def test_inductor_mvue_is_reproducible_under_manual_seed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    compiled = torch.compile(model, backend="nm", options={"grad_weight": "mvue"})
    x = torch.randn(16, 32)

    def grads(seed):
        model.zero_grad()
        loss = compiled(x).square().sum()
        torch.manual_seed(seed)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    first, again, other = grads(1), grads(1), grads(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])  # the MVUE draws changed the weight gradient
    torch.testing.assert_close(first[1], other[1])  # bias gradients are not pruned
