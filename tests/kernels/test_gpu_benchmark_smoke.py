"""``benchmarks/gpu.py`` runs end to end (tiny shapes, CPU, the strict cuSPARSELt model), so the
one GPU run it is made for does not fail on a Python error."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


@pytest.mark.slow
def test_gpu_benchmark_smoke(cslt, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    for key in ("device", "torch", "cusparselt", "date", "command", "ffn_speedup",
                "ffn_speedup_graphs", "step_speedup", "host_us_per_sparse_gemm"):
        assert result.get(key) is not None, key
    # present, empty here: GPU-only figures (no peak memory, no CUDA profile on CPU), and the
    # step under reduce-overhead, which the smoke run leaves out to stay short
    for key in ("peak_mem_ratio", "step_weight_work_ms", "layout_verified",
                "step_speedup_graphs"):
        assert key in result, key
    assert {r["config"] for r in result["ffn"]} == set(bench.SMOKE["ffn"])
    assert all("error" not in r for r in result["ffn"] + result["step"])
    assert result["host_us"] and all(r["torch_us"] > 0 for r in result["host_us"])
    assert {r["role"] for r in result["gemms"]} == {"forward", "grad_input", "grad_weight"}
    # the model computes the masked product: its error is the dense GEMM's, order of bf16
    assert all(r["failure"] is None and r["sparse_error"] < 1e-2 for r in result["gemms"])
    nm_rows = [r for r in result["ffn"] + result["step"] if r["config"].startswith("nm")]
    kernels = [k for r in nm_rows for k in r["kernels"]]
    # the cost rule measured every GEMM on the model (no self-check failure inside compile)
    assert kernels and not any("failed its self-check" in k for k in kernels), kernels
    assert cslt.mm_calls > 0


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sparsify_part_smoke(cslt, tmp_path):
    """``gpu.py --parts sparsify``: the per-step weight work's rows and headline keys."""
    assert _load("gpu").main(["--smoke", "--parts", "sparsify", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["layout_verified"] and result["layout"] == "sm90"
    assert result["sparsify_ms_per_step"] > 0 and result["sparsify_tbps"] > 0
    rows = {r["set"]: r for r in result["sparsify"]}
    assert rows["smoke"]["writer"] == ["layout encoder (sm90)"]
    assert rows["smoke"]["old_ms"] > 0 and rows["smoke"]["copy_ms"] > 0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
def test_sparsify_benchmark_times_the_triton_kernels(cslt, monkeypatch):
    monkeypatch.setenv("NMCOMPILE_CSLT_ON_CPU", "triton")
    result = _load("gpu_sparsify").run(quick=True, device=torch.device("cpu"), smoke=True)
    rows = {r["set"]: r for r in result["sparsify"]}
    assert rows["smoke"]["writer"] == ["Triton sparsify (sm90)"]
    assert rows["mvue dY 64x64"]["mvue_ms"] > 0
