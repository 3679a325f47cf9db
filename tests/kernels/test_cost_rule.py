"""The cost rule: decisions, reasons and the on-disk cache, with a timing table supplied by the
test; and a compiled graph under ``kernels="auto"``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmcompile
from nmcompile.kernels import cost, cusparselt_plans
from nmcompile.kernels import measure as measure_mod
from tests.cslt_library_fake import FakeCusparseLt

CPU = torch.device("cpu")


def _table(speedups: dict[str, float], failures: dict[str, str] | None = None,
           errors: dict[str, float] | None = None):
    """A measure_fn: speed-up by role (dense 1 ms), or a failure / an error by role."""
    calls = []

    def measure(device, shape):
        calls.append(shape)
        if failures and shape.role in failures:
            raise RuntimeError(failures[shape.role])
        sparse_ms = 1.0 / speedups[shape.role]
        return cost.Measurement(sparse_ms=sparse_ms * 0.9, compress_ms=sparse_ms * 0.1,
                                dense_ms=1.0, dense_error=2e-3,
                                sparse_error=(errors or {}).get(shape.role, 2.5e-3))

    measure.calls = calls
    return measure


def _shape(role="forward", m=4096, k=4096, n=512):
    return cost.GemmShape(role, m, k, n, torch.bfloat16)


def test_decisions_and_reasons(tmp_path):
    table = _table({"forward": 1.4, "grad_input": 0.87, "grad_weight": 1.2},
                   errors={"grad_weight": 0.5})
    rule = cost.CostRule(table, path=tmp_path / "c.json")
    fast = rule.decide(CPU, _shape("forward"))
    assert fast.sparse and fast.reason is None and fast.speedup == pytest.approx(1.4)
    slow = rule.decide(CPU, _shape("grad_input"))
    assert not slow.sparse
    assert slow.reason == "dense: cost rule (sparse 0.87x at 4096x4096x512 bf16)"
    wrong = rule.decide(CPU, _shape("grad_weight"))
    assert not wrong.sparse and wrong.reason.startswith(
        "dense: sparse kernel failed its self-check: relative error 0.5 against 0.002")
    assert len(table.calls) == 3
    rule.decide(CPU, _shape("forward"))
    assert len(table.calls) == 3  # measured once per shape


def test_speedup_threshold_and_failures(tmp_path):
    rule = cost.CostRule(_table({"forward": cost.MIN_SPEEDUP - 0.01, "grad_input": 1.0},
                                failures={"grad_weight": "CUDA error: misaligned address"}),
                         path=None)
    assert not rule.decide(CPU, _shape("forward")).sparse
    failed = rule.decide(CPU, _shape("grad_weight"))
    assert failed.reason == ("dense: sparse kernel failed its self-check: "
                             "RuntimeError: CUDA error: misaligned address")
    nan = cost.judge(_shape(), cost.Measurement(1, 0, 1, float("nan"), 1e-3))
    assert not nan.sparse and "self-check" in nan.reason


def test_cache_is_written_read_back_and_validated(tmp_path):
    path = tmp_path / "c.json"
    first = _table({"forward": 1.5, "grad_input": 1.3, "grad_weight": 0.9})
    rule = cost.CostRule(first, path=path, key_fn=lambda d: "H200 | torch x | cusparselt y")
    for role in ("forward", "grad_input", "grad_weight"):
        rule.decide(CPU, _shape(role))
    saved = json.loads(path.read_text())
    assert saved["format"] == cost.FORMAT
    assert set(saved["devices"]["H200 | torch x | cusparselt y"]) == {
        "bfloat16/forward/4096/4096/512", "bfloat16/grad_input/4096/4096/512",
        "bfloat16/grad_weight/4096/4096/512"}

    second = _table({"forward": 0.1, "grad_input": 0.1, "grad_weight": 0.1})
    again = cost.CostRule(second, path=path, key_fn=lambda d: "H200 | torch x | cusparselt y")
    assert again.decide(CPU, _shape("forward")).sparse  # from the file, not re-measured
    assert second.calls == []
    other = cost.CostRule(second, path=path, key_fn=lambda d: "H100 | torch x | cusparselt y")
    assert not other.decide(CPU, _shape("forward")).sparse  # another GPU: measured
    assert len(second.calls) == 1

    data = json.loads(path.read_text())
    data["devices"]["H200 | torch x | cusparselt y"]["bfloat16/forward/4096/4096/512"][
        "dense_ms"] = "fast"
    path.write_text(json.dumps(data))
    third = _table({"forward": 0.5, "grad_input": 1.3, "grad_weight": 0.9})
    with pytest.warns(RuntimeWarning, match="1 malformed entries"):
        rule = cost.CostRule(third, path=path, key_fn=lambda d: "H200 | torch x | cusparselt y")
        assert not rule.decide(CPU, _shape("forward")).sparse  # the bad entry was measured again
    assert len(third.calls) == 1

    path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="ignoring the cost-rule cache"):
        rule = cost.CostRule(third, path=path)
        rule.decide(CPU, _shape("grad_input"))
    json.loads(path.read_text())  # rewritten whole


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 256)
        self.down = nn.Linear(256, 64)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def test_auto_follows_the_cost_rule_in_a_compiled_graph(cslt, tmp_path):
    """forward measured 1.4x -> cuSPARSELt; grad-input 0.8x -> dense with the reason."""
    table = _table({"forward": 1.4, "grad_input": 0.8, "grad_weight": 1.0})
    model = Mlp().bfloat16()
    dump = tmp_path / "dump"
    with cost.using(cost.CostRule(table, path=None)):
        compiled = torch.compile(model, backend="nm", options={
            "inductor": False, "min_numel": 0, "dump_dir": str(dump)})
        x = torch.randn(2, 16, 64, dtype=torch.bfloat16, requires_grad=True)
        compiled(x).float().sum().backward()
    rows = {(r["role"], r["param"]): r for r in nmcompile.read_summary(dump)["matmuls"]}
    assert rows[("forward", "up.weight")]["kernel"] == "cuSPARSELt (1.40x)"
    assert rows[("grad_input", "down.weight")]["kernel"] == (
        "dense: cost rule (sparse 0.80x at 256x64x32 bf16)")
    shapes = {(s.role, s.m, s.k, s.n) for s in table.calls}
    assert ("forward", 256, 64, 32) in shapes and ("grad_input", 64, 256, 32) in shapes
    # forward GEMMs ran on the kernel (2 calls), grad-input GEMMs did not
    assert cslt.mm_calls == 2


def test_default_measurement_runs_inside_compilation(cslt, tmp_path):
    """The pass runs under fake tensors: the measurement must still use real ones."""
    dump = tmp_path / "dump"
    with cost.using(cost.CostRule(path=tmp_path / "c.json")):
        compiled = torch.compile(Mlp().bfloat16(), backend="nm", options={
            "inductor": False, "min_numel": 0, "dump_dir": str(dump)})
        compiled(torch.randn(32, 64, dtype=torch.bfloat16)).float().sum().backward()
    kernels = [r["kernel"] for r in nmcompile.read_summary(dump)["matmuls"] if r["kernel"]]
    assert kernels and not any("failed its self-check" in k for k in kernels), kernels
    assert all(k.startswith(("cuSPARSELt (", "dense: cost rule (sparse ")) for k in kernels)


def _fake_timer(cslt, fast_alg: int):
    """Times by what ran: the model with ``fast_alg`` 0.5 ms, with algorithm 0 2 ms, a dense
    GEMM 1 ms, a compression alone 0.01 ms."""

    def timer(device):
        def time_ms(fn):
            calls, compressions = cslt.mm_calls, cslt.compress_calls
            fn()
            if cslt.mm_calls > calls:
                return 0.5 if cslt.alg_ids[-1] == fast_alg else 2.0
            return 0.01 if cslt.compress_calls > compressions else 1.0

        return time_ms

    return timer


@pytest.mark.parametrize("role", ["forward", "grad_input", "grad_weight"])
def test_measure_keeps_a_searched_algorithm_only_if_right_and_faster(cslt, monkeypatch, role):
    cslt.search_result = 5
    monkeypatch.setattr(measure_mod, "timer", _fake_timer(cslt, fast_alg=5))
    shape = cost.GemmShape(role, 32, 64, 48, torch.bfloat16)
    found = cost.measure(CPU, shape)
    assert found.alg_id == 5 and found.sparse_ms == 0.5 and found.alg0_ms == 2.0
    verdict = cost.judge(shape, found)
    assert verdict.sparse and verdict.alg_id == 5

    # the same search answer, but algorithm 5 computes garbage: algorithm 0 is kept
    right = cslt.sparse_mm

    def wrong_for_5(*args, alg_id=0, **kwargs):
        out = right(*args, alg_id=alg_id, **kwargs)
        return out * 2 if alg_id == 5 else out

    monkeypatch.setattr(torch, "_cslt_sparse_mm", wrong_for_5)
    found = cost.measure(CPU, shape)
    assert found.alg_id == 0 and found.sparse_ms == 2.0
    assert not cost.judge(shape, found).sparse  # 2 ms sparse against 1 ms dense


def test_the_chosen_algorithm_reaches_the_kernel(cslt, tmp_path):
    def table(device, shape):
        return cost.Measurement(sparse_ms=0.6, compress_ms=0.1, dense_ms=1.0, sparse_error=2e-3,
                                dense_error=2e-3, alg_id=17, alg0_ms=1.2)

    dump = tmp_path / "dump"
    with cost.using(cost.CostRule(table, path=None)):
        compiled = torch.compile(Mlp().bfloat16(), backend="nm", options={
            "inductor": False, "min_numel": 0, "dump_dir": str(dump),
            "grad_weight": "mvue"})
        x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
        compiled(x).float().sum().backward()
    kernels = {r["kernel"] for r in nmcompile.read_summary(dump)["matmuls"] if r["kernel"]}
    assert kernels == {"cuSPARSELt (1.43x, alg 17)"}
    assert cslt.mm_calls == 6 and set(cslt.alg_ids) == {17}


def test_cuda_graph_times_decide_under_reduce_overhead():
    shape = _shape()
    found = cost.Measurement(sparse_ms=1.2, compress_ms=0.05, dense_ms=1.0, sparse_error=2e-3,
                             dense_error=2e-3, alg_id=17, sparse_graph_ms=0.6,
                             dense_graph_ms=1.0)
    assert not cost.judge(shape, found).sparse  # eager: host overhead makes it slower
    graphs = cost.judge(shape, found, graphs=True)
    assert graphs.sparse and graphs.alg_id == 17 and graphs.speedup == pytest.approx(1 / 0.65)
    no_graph_times = cost.Measurement(1.2, 0.05, 1.0, 2e-3, 2e-3)
    assert not cost.judge(shape, no_graph_times, graphs=True).sparse  # falls back to eager


@pytest.mark.slow
def test_reduce_overhead_mode_asks_the_cost_rule_for_graph_times(cslt, tmp_path, monkeypatch):
    """``torch.compile(..., backend="nm", mode="reduce-overhead")`` (torch passes the mode to the
    backend when no options are given): GEMMs are judged by their CUDA-graph times."""
    def table(device, shape):
        return cost.Measurement(sparse_ms=1.5, compress_ms=0.05, dense_ms=1.0,
                                sparse_error=2e-3, dense_error=2e-3, sparse_graph_ms=0.5,
                                dense_graph_ms=1.0)

    dump = tmp_path / "dump"
    monkeypatch.setenv("NMCOMPILE_DUMP_DIR", str(dump))
    with cost.using(cost.CostRule(table, path=None)):
        compiled = torch.compile(Mlp().bfloat16(), backend="nm", mode="reduce-overhead")
        compiled(torch.randn(32, 64, dtype=torch.bfloat16)).float().sum().backward()
    rows = [r for r in nmcompile.read_summary(dump)["matmuls"] if r["kernel"]]
    assert rows and all(r["kernel"] == "cuSPARSELt (1.82x)" for r in rows), rows
    assert nmcompile.read_summary(dump)["config"]["mode"] == "reduce-overhead"


def test_weight_compression_is_charged_once_per_optimizer_step():
    """4 micro-steps share one compression of the weight (forward, grad-input); the grad-weight
    GEMM's operand, a pruned output gradient, is compressed at every call."""
    found = cost.Measurement(sparse_ms=0.8, compress_ms=0.4, dense_ms=1.0, sparse_error=2e-3,
                             dense_error=2e-3)
    for role in ("forward", "grad_input"):
        assert not cost.judge(_shape(role), found).sparse  # 1.0 / (0.8 + 0.4)
        four = cost.judge(_shape(role), found, micro_steps=4)  # 1.0 / (0.8 + 0.1)
        assert four.sparse and four.speedup == pytest.approx(1 / 0.9)
    assert not cost.judge(_shape("grad_weight"), found, micro_steps=4).sparse
    graphs = cost.Measurement(1.5, 0.4, 1.0, 2e-3, 2e-3, sparse_graph_ms=0.6,
                              dense_graph_ms=1.0)
    assert cost.judge(_shape(), graphs, graphs=True, micro_steps=2).speedup == pytest.approx(
        1 / 0.8)


def test_micro_steps_option_reaches_the_rule(cslt, tmp_path):
    def table(device, shape):
        return cost.Measurement(sparse_ms=0.8, compress_ms=0.4, dense_ms=1.0,
                                sparse_error=2e-3, dense_error=2e-3)

    labels = {}
    for micro in (1, 4):
        dump = tmp_path / f"dump{micro}"
        with cost.using(cost.CostRule(table, path=None)):
            compiled = torch.compile(Mlp().bfloat16(), backend="nm", options={
                "inductor": False, "min_numel": 0, "dump_dir": str(dump), "micro_steps": micro})
            compiled(torch.randn(32, 64, dtype=torch.bfloat16)).float().sum().backward()
        labels[micro] = {r["kernel"] for r in nmcompile.read_summary(dump)["matmuls"]
                         if r["role"] == "forward"}
    assert labels == {1: {"dense: cost rule (sparse 0.83x at 256x64x32 bf16)",
                          "dense: cost rule (sparse 0.83x at 64x256x32 bf16)"},
                      4: {"cuSPARSELt (1.11x)"}}


def test_measure_records_the_call_path_and_its_host_time(cslt):
    shape = cost.GemmShape("forward", 32, 64, 48, torch.bfloat16)
    found = cost.measure(CPU, shape)
    assert found.call_path == "torch" and found.host_ms > 0
    lib = FakeCusparseLt(cslt)
    with cusparselt_plans.using(lib):
        found = cost.measure(CPU, shape)
    assert found.call_path == "plans" and found.host_ms > 0 and found.failure is None
    assert lib.calls["cusparseLtMatmul"] > 0 and not lib.errors


def test_a_measurement_of_another_call_path_is_taken_again(cslt, tmp_path):
    calls = []

    def table(device, shape):
        calls.append(shape)
        return cost.Measurement(sparse_ms=0.5, compress_ms=0.1, dense_ms=1.0, sparse_error=2e-3,
                                dense_error=2e-3, call_path=cost.call_path(device))

    rule = cost.CostRule(table, path=tmp_path / "c.json")
    rule.decide(CPU, _shape())
    rule.decide(CPU, _shape())
    assert len(calls) == 1  # timed through torch._cslt_sparse_mm, which still serves
    with cusparselt_plans.using(FakeCusparseLt(cslt)):
        rule.decide(CPU, _shape())
        rule.decide(CPU, _shape())
    assert len(calls) == 2  # cached plans serve now: timed again, once
    saved = json.loads((tmp_path / "c.json").read_text())
    (entry,) = next(iter(saved["devices"].values())).values()
    assert entry["call_path"] == "plans"
