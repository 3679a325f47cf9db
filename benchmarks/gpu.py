"""2:4 sparse training on an NVIDIA GPU against dense, measured in the same run.

    python benchmarks/gpu.py [--quick] [--out DIR] [--whole-model] [--parts ...] [--configs ...]

Five parts, bf16, CUDA events after a warm-up, medians:

(sparsify) the per-step weight work (exact masks and both compressed weights) of the FFN block,
    the GPT-2-medium-size model and one 4096x16384 weight, and MVUE's grad-weight operand,
    against the eager path it replaces and a plain copy of the same bytes
    (``benchmarks/gpu_sparsify.py``; ``sparsify_ms_per_step``, ``sparsify_tbps``);
(gemm) the three GEMMs of a linear layer at FFN shapes (tokens x d_model, d_ff = 4 d_model), up-
    and down-projection: forward ``X W^T``, grad-input ``dY W``, grad-weight ``dY^T X`` (sparse:
    dY^T pruned 2:4 along tokens, as MVUE does), measured exactly as the cost rule measures them
    (``nmcompile.kernels.measure``): dense cuBLAS on the same masked operand against cuSPARSELt
    with algorithm 0 and with the algorithm its search picks (kept only if it passes the fp64
    check), the time to compress the sparse operand, and the host time per sparse call;
(host) the host time one forward GEMM takes to return: through cached plans
    (``nmcompile.kernels.cusparselt_plans``), through the dispatcher, through
    ``torch._cslt_sparse_mm`` (descriptors and plan rebuilt at every call);
(ffn) an FFN block (up-projection, GELU, down-projection, d_model 2048, 16384 tokens) forward +
    backward + SGD step, compiled with ``backend="inductor"`` and with ``backend="nm"``
    (``kernels="auto"``, the cost rule, and ``"sparse"``; with and without MVUE), each in
    default mode and with ``mode="reduce-overhead"`` (CUDA graphs); weights changing at every
    step so that the masks are solved and the weights compressed at every step; also the
    micro-step time (forward + backward with unchanged weights, as under gradient accumulation);
(step) a GPT-2-medium-size training step (24 layers, d 1024, 16 heads, seq 1024, vocab 50304,
    flash attention, fused AdamW), the same configurations (MVUE left out under ``--quick``);
    blocks compiled one by one (regional compilation: one graph serves the 24 blocks) unless
    ``--whole-model``.

For (ffn) and (step): compile time (first step minus the median step), peak memory
(``torch.cuda.max_memory_allocated`` over the timed steps), for nm where the GPU time goes
(torch.profiler over 3 steps: mask refresh, weight compression, sparse GEMMs, the rest) and
the host time per ``nm::`` GEMM op (profiler, CPU side).

Prints a table per part and writes ``gpu.json`` into ``--out`` after each part: every row, and
``device``, ``torch``, ``cusparselt``, ``date``, ``command`` and the headline figures
(:data:`HEADLINE`: ``ffn_speedup`` / ``step_speedup`` (nm auto against dense Inductor, default
mode), ``..._graphs`` (both under ``reduce-overhead``), ``host_us_per_sparse_gemm``,
``peak_mem_ratio`` (nm auto over dense, GPT-2 step), ``step_weight_work_ms`` (mask refresh
and weight compression, GPU ms per GPT-2 step, profiled in the step), ``sparsify_ms_per_step``
and ``sparsify_tbps`` (the same work timed alone, part (sparsify)), ``layout_verified``).
``--quick`` measures a subset of the shapes; ``--configs auto,sparse`` keeps the nm
configurations whose names hold one.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import nmcompile
from nmcompile.kernels import cost, cusparselt, cusparselt_plans, timing
from nmcompile.models import GPTConfig, TinyGPT

BF16 = torch.bfloat16
#: where everything runs; ``--smoke`` (a CPU check of this script, for the test suite) sets CPU
DEVICE = torch.device("cuda")


# -- (a) GEMMs ---------------------------------------------------------------------------------

def bench_gemms(tokens_list: list[int], d_list: list[int]) -> list[dict]:
    rows = []
    for d in d_list:
        for tokens in tokens_list:
            for proj, (out_f, in_f) in (("up", (4 * d, d)), ("down", (d, 4 * d))):
                rows += _gemm_rows(tokens, d, proj, out_f, in_f)
                _free()
    return rows


def _gemm_rows(tokens: int, d: int, proj: str, out_f: int, in_f: int) -> list[dict]:
    """The three GEMMs of one projection, measured as the cost rule measures them
    (:func:`nmcompile.kernels.cost.measure`: fp64 check, algorithm 0 and the searched one)."""
    rows = []
    for role in ("forward", "grad_input", "grad_weight"):
        m, k, n = {"forward": (out_f, in_f, tokens), "grad_input": (in_f, out_f, tokens),
                   "grad_weight": (out_f, tokens, in_f)}[role]
        found = cost.measure(DEVICE, cost.GemmShape(role, m, k, n, BF16))
        row = {"tokens": tokens, "d_model": d, "proj": proj, "role": role,
               "m_k_n": f"{m}x{k}x{n}", **asdict(found)}
        if found.failure is None:
            row["speedup"] = found.dense_ms / found.sparse_ms
            row["speedup_alg0"] = found.dense_ms / found.alg0_ms
            row["dense_tflops"] = 2 * m * k * n / found.dense_ms / 1e9
        rows.append(row)
    return rows


# -- training steps (b, c) ------------------------------------------------------------------

def _free() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _timed_steps(step, warmup: int, steps: int) -> tuple[float, float, list[float]]:
    """(first step seconds, median ms, all ms) of ``step()``; CUDA events around each step."""
    _sync()
    start = time.perf_counter()
    step()
    _sync()
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    _sync()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        if DEVICE.type != "cuda":
            begin_s = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin_s) * 1e3)
            continue
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return first, statistics.median(times), times


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else 0.0


LABELS = {"nm::refresh_mask": "mask", "nm::compress_weight": "compress",
          "aten::_cslt_sparse_mm": "sparse_gemm", "aten::_cslt_compress": "all_compress",
          cusparselt_plans.PROFILER_NAME: "sparse_gemm"}
DENSE_GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def _breakdown(step, steps: int = 3) -> dict:
    """GPU milliseconds per step (torch.profiler): ``busy`` (all kernels), ``mask`` (the mask
    refresh, scorer matmul included), ``compress`` (the weights, once per step),
    ``mvue_compress`` (dY^T, per call), ``sparse_gemm`` (cuSPARSELt), ``dense_gemm`` (cuBLAS,
    the mask scorer's matmul included) and ``rest`` (the other kernels: elementwise, attention,
    optimizer, ...)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        _sync()
    out = dict.fromkeys(("busy", "mask", "compress", "all_compress", "sparse_gemm",
                         "dense_gemm"), 0.0)
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None)
        self_time = getattr(evt, "self_device_time_total", None)
        if total is None:  # older profilers
            total, self_time = evt.cuda_time_total, evt.self_cuda_time_total
        if evt.device_type == DeviceType.CUDA:
            out["busy"] += self_time
        if evt.key in LABELS:
            out[LABELS[evt.key]] += total
        elif evt.key in DENSE_GEMMS:
            out["dense_gemm"] += self_time
    out["mvue_compress"] = max(0.0, out.pop("all_compress") - out["compress"])
    out = {k: v / 1e3 / steps for k, v in out.items()}  # us -> ms per step
    out["rest"] = out["busy"] - sum(out[k] for k in ("mask", "compress", "sparse_gemm",
                                                      "dense_gemm", "mvue_compress"))
    return out


def _run_config(name: str, compiled, batch: tuple, opt, warmup: int, steps: int,
                profile_it: bool, accumulate: bool = False) -> dict:
    def step():
        opt.zero_grad(set_to_none=True)
        compiled(*batch).backward()
        opt.step()

    first, median, times = _timed_steps(step, warmup, steps)
    row = {"config": name, "step_ms": median, "compile_s": first - median / 1e3,
           "peak_mem_gb": _peak_gb(),
           "spread_ms": [min(times), max(times)]}
    if accumulate:  # forward + backward with the weights unchanged (a micro-step)
        def micro():
            compiled(*batch).backward()

        _, row["microstep_ms"], _ = _timed_steps(micro, warmup, steps)
    if profile_it and DEVICE.type == "cuda":
        row["breakdown_ms"] = _breakdown(step)
    if profile_it:
        row.update(_sparse_gemm_host_us(step))
    return row


class Ffn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x, grad):
        y = self.down(F.gelu(self.up(x)))
        return (y * grad).sum()  # backward seeds dY = grad


def bench_ffn(d_list: list[int], tokens: int, configs: dict, steps: int) -> list[dict]:
    rows = []
    for d in d_list:
        torch.manual_seed(0)
        base = Ffn(d).to(DEVICE, BF16)
        gen = torch.Generator(DEVICE).manual_seed(1)
        x = torch.randn(tokens, d, generator=gen, device=DEVICE).to(BF16).requires_grad_()
        g = torch.randn(tokens, d, generator=gen, device=DEVICE).to(BF16)
        for name, (backend, kwargs) in configs.items():
            torch._dynamo.reset()
            model = copy.deepcopy(base)
            kwargs = _with_dump(backend, kwargs, f"ffn_d{d}_{name}")
            try:
                compiled = torch.compile(model, backend=backend, **kwargs)
                opt = torch.optim.SGD(model.parameters(), lr=1e-6, foreach=True)
                row = _run_config(name, compiled, (x, g), opt, 3, steps,
                                  profile_it=backend == "nm", accumulate=True)
            except Exception as error:  # noqa: BLE001  (report it, go on with the others)
                row = _failed(name, error)
            row.update(d_model=d, tokens=tokens)
            if backend == "nm":
                row["kernels"] = _kernel_summary(kwargs["options"]["dump_dir"])
            rows.append(row)
            print(f"  ffn d={d} {name}: {row.get('step_ms', 'failed')} ms/step", flush=True)
            del model
            _free()
    return rows


def _failed(name: str, error: Exception) -> dict:
    import traceback

    traceback.print_exc()
    return {"config": name, "error": f"{type(error).__name__}: {error}"[:2000]}


DUMPS = Path("gpu_bench_out") / "nm_dump"


def _with_dump(backend: str, kwargs: dict, name: str) -> dict:
    """``torch.compile`` keyword arguments, with a dump folder of its own for an nm config."""
    if backend != "nm":
        return kwargs
    safe = "".join(c if c.isalnum() else "_" for c in name)
    return {**kwargs, "options": {**kwargs.get("options", {}), "dump_dir": str(DUMPS / safe)}}


def _kernel_summary(dump: str) -> dict:
    """How many GEMMs of each role ran on each kernel (the dump's ``kernel`` column)."""
    if not (Path(dump) / "summary.json").exists():
        return {}
    counts: dict[str, int] = {}
    for r in nmcompile.read_summary(dump)["matmuls"]:
        if r.get("kernel"):
            key = f"{r['role']}: {r['kernel']}"
            counts[key] = counts.get(key, 0) + 1
    return counts


GPT2_MEDIUM = GPTConfig(vocab_size=50304, seq_len=1024, d_model=1024, n_layer=24, n_head=16,
                        sdpa=True)


def bench_step(configs: dict, batch: int, steps: int, whole_model: bool,
               cfg: GPTConfig = GPT2_MEDIUM) -> list[dict]:
    torch.manual_seed(0)
    base = TinyGPT(cfg).to(DEVICE, BF16)
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=DEVICE)
    rows = []
    for name, (backend, kwargs) in configs.items():
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        kwargs = _with_dump(backend, kwargs, f"step_{name}")
        try:
            if whole_model:
                compiled = torch.compile(model, backend=backend, **kwargs)
            else:
                for block in model.blocks:
                    block.compile(backend=backend, **kwargs)
                compiled = model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE.type == "cuda")
            row = _run_config(name, compiled, (idx, idx), opt, 3, steps, profile_it=True)
        except Exception as error:  # noqa: BLE001  (report it, go on with the others)
            row = _failed(name, error)
        row.update(batch=batch, tokens=batch * cfg.seq_len, n_layer=cfg.n_layer,
                   params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                   compile="whole model" if whole_model else "per block")
        if backend == "nm":
            row["kernels"] = _kernel_summary(kwargs["options"]["dump_dir"])
        rows.append(row)
        print(f"  step {name}: {row.get('step_ms', 'failed')} ms/step", flush=True)
        del model
        _free()
    return rows


# -- configurations, host time, headline figures --------------------------------------------

#: the two modes every configuration runs in: default (eager launches) and CUDA graphs
MODES = {"": {}, " (reduce-overhead)": {"mode": "reduce-overhead"}}
#: the results JSON's headline keys (with ``device``, ``torch``, ``cusparselt``, ``date``,
#: ``command``)
HEADLINE = ("ffn_speedup", "ffn_speedup_graphs", "ffn_microstep_speedup",
            "ffn_microstep_speedup_graphs", "ffn_speedup_sparse", "ffn_speedup_sparse_graphs",
            "ffn_speedup_mvue", "ffn_speedup_mvue_graphs", "ffn_peak_mem_ratio", "step_speedup",
            "step_speedup_graphs", "step_speedup_sparse", "step_speedup_sparse_graphs",
            "step_speedup_cudagraphs", "host_us_per_sparse_gemm", "peak_mem_ratio",
            "step_weight_work_ms", "sparsify_ms_per_step", "sparsify_tbps", "layout_verified")
#: the configurations ``--smoke`` keeps (each code path once, on CPU)
SMOKE = {"ffn": ("dense (inductor)", "dense (reduce-overhead)", "nm auto",
                 "nm auto (reduce-overhead)", "nm sparse + mvue"),
         "step": ("dense (inductor)", "nm auto", "nm sparse")}


def config_matrix(part: str, smoke: bool = False, quick: bool = False,
                  only: list[str] | None = None) -> dict:
    """name -> (backend, torch.compile kwargs): dense Inductor and nm with ``kernels="auto"``
    and ``"sparse"``, with and without MVUE, each in default mode and under
    ``mode="reduce-overhead"``; the FFN also with ``kernels="emulate"`` (not ``quick``). The
    GPT-2 step leaves MVUE out under ``quick``. ``only``: substrings of nm names to keep."""
    configs = {}
    for suffix, mode in MODES.items():
        configs["dense (inductor)" if not suffix else f"dense{suffix}"] = ("inductor", mode)
        for kernels in ("auto", "sparse"):
            for extra, opts in (("", {}), (" + mvue", {"grad_weight": "mvue"})):
                if extra and quick and part == "step":
                    continue
                configs[f"nm {kernels}{extra}{suffix}"] = (
                    "nm", {"options": {"kernels": kernels, **opts, **mode}})
    if part == "ffn" and not quick:
        configs["nm emulate"] = ("nm", {"options": {"kernels": "emulate"}})
    if smoke:
        configs = {k: v for k, v in configs.items() if k in SMOKE[part]}
    if only:
        configs = {k: v for k, v in configs.items()
                   if v[0] != "nm" or any(o in k for o in only)}
    return configs


def bench_host_time(shapes: list[tuple[int, int, int]]) -> list[dict]:
    """Host microseconds one forward GEMM ``[m, k] (compressed) x [n tokens, k]^T`` takes to
    return (:func:`nmcompile.kernels.timing.host_ms`: the GPU left running): the cached plan
    alone, the dispatcher (padding, layout checks, plan) and ``torch._cslt_sparse_mm``."""
    rows = []
    for m, k, n in shapes:
        rows.append(_host_row(m, k, n))
        _free()
    return rows


def _host_row(m: int, k: int, n: int) -> dict:
    from nmcompile.solvers import nm_mask

    plans = cusparselt_plans.for_device(DEVICE)
    a = torch.randn(m, k, device=DEVICE)
    packed = cusparselt.compress((a * nm_mask(a, 2, 4)).to(BF16))
    x = torch.randn(n, k, device=DEVICE).to(BF16)
    bias = torch.randn(m, device=DEVICE).to(BF16)
    calls = {"torch": lambda: torch._cslt_sparse_mm(packed, x.t(), bias, transpose_result=True),
             "dispatcher": lambda: cusparselt.linear_forward(x, packed, bias, m)}
    if plans is not None:
        calls["plans"] = lambda: plans.matmul(packed, x.t(), bias, True, 0)
    row = {"m_k_n": f"{m}x{k}x{n}", "call_path": "plans" if plans else "torch"}
    for name, fn in calls.items():
        row[f"{name}_us"] = timing.host_ms(fn, DEVICE) * 1e3
    return row


NM_GEMMS = ("nm::linear_forward", "nm::linear_grad_input", "nm::sparse_mm")


def _sparse_gemm_host_us(step, steps: int = 3) -> dict:
    """Host microseconds per call of the ``nm::`` GEMM ops in ``steps`` training steps
    (``torch.profiler``, CPU side: the op with its padding, checks and launch, the GPU left
    running), and their number per step."""
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        _sync()
    found = [e for e in prof.key_averages() if e.key in NM_GEMMS]
    calls = sum(e.count for e in found)
    if not calls:
        return {"host_us_per_sparse_gemm": None, "nm_gemms_per_step": 0}
    return {"host_us_per_sparse_gemm": sum(e.cpu_time_total for e in found) / calls,
            "nm_gemms_per_step": calls / steps}


def _row(rows: list[dict], name: str) -> dict:
    return next((r for r in rows if r["config"] == name and "error" not in r), {})


def _peak_ratio(rows: list[dict], dense: str, sparse: str) -> float | None:
    d, s = _row(rows, dense).get("peak_mem_gb"), _row(rows, sparse).get("peak_mem_gb")
    return s / d if d and s else None


def headline_ffn(rows: list[dict]) -> dict:
    """The FFN block's figures: step and micro-step speed-ups against dense Inductor (default
    mode) or dense under CUDA graphs (``_graphs``), for ``auto``, ``sparse`` and MVUE."""
    out = {}
    for suffix, tail in (("", ""), ("_graphs", " (reduce-overhead)")):
        dense = "dense (inductor)" if not tail else f"dense{tail}"
        out[f"ffn_speedup{suffix}"] = _ratio(rows, dense, f"nm auto{tail}")
        out[f"ffn_microstep_speedup{suffix}"] = _ratio(rows, dense, f"nm auto{tail}",
                                                       "microstep_ms")
        out[f"ffn_speedup_sparse{suffix}"] = _ratio(rows, dense, f"nm sparse{tail}")
        out[f"ffn_microstep_speedup_sparse{suffix}"] = _ratio(rows, dense, f"nm sparse{tail}",
                                                              "microstep_ms")
        out[f"ffn_speedup_mvue{suffix}"] = _ratio(rows, dense, f"nm auto + mvue{tail}")
    out["ffn_peak_mem_ratio"] = _peak_ratio(rows, "dense (inductor)", "nm auto")
    return out


def headline_step(rows: list[dict]) -> dict:
    """The GPT-2-medium-size step's figures (as :func:`headline_ffn`), its peak memory against
    dense, the host time per sparse GEMM (``nm sparse``, default mode, profiler) and the GPU
    time per step of the weights' mask refresh and compression as profiled inside the step
    (``step_weight_work_ms``)."""
    out = {}
    for suffix, tail in (("", ""), ("_graphs", " (reduce-overhead)")):
        dense = "dense (inductor)" if not tail else f"dense{tail}"
        out[f"step_speedup{suffix}"] = _ratio(rows, dense, f"nm auto{tail}")
        out[f"step_speedup_sparse{suffix}"] = _ratio(rows, dense, f"nm sparse{tail}")
        out[f"step_speedup_mvue{suffix}"] = _ratio(rows, dense, f"nm auto + mvue{tail}")
    out["step_speedup_cudagraphs"] = out["step_speedup_sparse_graphs"]
    out["peak_mem_ratio"] = _peak_ratio(rows, "dense (inductor)", "nm auto")
    sparse = _row(rows, "nm sparse")
    out["host_us_per_sparse_gemm"] = sparse.get("host_us_per_sparse_gemm")
    parts = sparse.get("breakdown_ms")
    out["step_weight_work_ms"] = parts["mask"] + parts["compress"] if parts else None
    return out


def _layout_verified() -> bool | None:
    """Whether nmcompile's own compressed-weight writer passed its check against
    ``torch._cslt_compress`` on this device (``None``: no such check in this checkout)."""
    try:
        from nmcompile.kernels import layout_check
    except ImportError:
        return None
    return layout_check.verdict(DEVICE, BF16).writer is not None


# -- report ----------------------------------------------------------------------------------

def _environment(command: str) -> dict:
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    if DEVICE.type != "cuda":
        return {"device": str(DEVICE), "torch": torch.__version__, "cusparselt": "model",
                "date": date, "command": command}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        smi = ""
    return {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "nvidia_smi": smi,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": cusparselt.runtime_version(),
        "cusparselt_built": torch.backends.cusparselt.version(),
        "python": sys.version.split()[0],
        "date": date,
        "command": command,
    }


def _sibling(name: str):
    """Another script of this folder, imported as a module (``benchmarks/`` is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ratio(rows: list[dict], dense: str, sparse: str, key: str = "step_ms") -> float | None:
    by = {r["config"]: r for r in rows if "error" not in r}
    if dense in by and sparse in by and key in by[dense] and key in by[sparse]:
        return by[dense][key] / by[sparse][key]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset of shapes (~3 min)")
    parser.add_argument("--out", default="gpu_bench_out", help="folder for gpu.json")
    parser.add_argument("--whole-model", action="store_true",
                        help="compile the GPT-2 model whole instead of block by block")
    parser.add_argument("--parts", default="sparsify,gemm,host,ffn,step",
                        help="comma-separated parts")
    parser.add_argument("--dump", default=None,
                        help="folder for the nm dumps (default: OUT/nm_dump)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated substrings: run only the nm configs whose name "
                             "holds one (the dense baselines always run)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global DEVICE, DUMPS
    if args.smoke:  # tiny shapes on CPU through whatever torch._cslt_* are (the test's model)
        DEVICE = torch.device("cpu")
        os.environ[cusparselt.ENV_ON_CPU] = "1"
    elif not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; none is visible here.", file=sys.stderr)
        return 2
    reason = cusparselt.device_reason(DEVICE)
    if reason:
        print(f"benchmarks/gpu.py: {reason}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    DUMPS = Path(args.dump) if args.dump else out / "nm_dump"
    command = "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = _environment(command.strip())
    parts = set(args.parts.split(","))

    def save() -> None:
        (out / "gpu.json").write_text(json.dumps(result, indent=1, default=str))

    print(json.dumps({k: result.get(k) for k in ("device", "torch", "cuda", "cusparselt")}))
    if "sparsify" in parts:
        result.update(_sibling("gpu_sparsify").run(args.quick, DEVICE, smoke=args.smoke))
        save()
        print(tabulate(result["sparsify"], headers="keys", floatfmt=".3f"))
    if "gemm" in parts:
        tokens = [4096, 16384] if args.quick else [4096, 8192, 16384, 32768]
        dims = [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192]
        if args.smoke:
            tokens, dims = [32], [16]
        result["gemms"] = bench_gemms(tokens, dims)
        save()
        print(tabulate([{k: r.get(k) for k in ("tokens", "d_model", "proj", "role", "m_k_n",
                                               "dense_ms", "alg0_ms", "sparse_ms", "alg_id",
                                               "speedup", "compress_ms", "host_ms",
                                               "call_path", "failure")}
                        for r in result["gemms"]], headers="keys", floatfmt=".3f"))
    if "host" in parts:
        shapes = [(4 * 2048, 2048, 16384), (2048, 4 * 2048, 16384)]
        result["host_us"] = bench_host_time(shapes if not args.smoke else [(64, 32, 64)])
        save()
        print(tabulate(result["host_us"], headers="keys", floatfmt=".1f"))
    only = args.configs.split(",") if args.configs else None
    if "ffn" in parts:
        dims = [2048] if args.quick else [1024, 2048, 4096]
        tokens, target_d = (16384, 2048) if not args.smoke else (64, 32)
        dims = [target_d] if args.smoke else dims
        configs = config_matrix("ffn", smoke=args.smoke, quick=args.quick, only=only)
        result["ffn"] = bench_ffn(dims, tokens, configs, steps=10 if args.quick else 20)
        result.update(headline_ffn([r for r in result["ffn"] if r["d_model"] == target_d]))
        save()
        print(tabulate([{k: r.get(k) for k in ("d_model", "config", "step_ms", "microstep_ms",
                                               "compile_s", "peak_mem_gb",
                                               "host_us_per_sparse_gemm")}
                        for r in result["ffn"]], headers="keys", floatfmt=".3f"))
    if "step" in parts:
        cfg = GPT2_MEDIUM
        if args.smoke:
            cfg = GPTConfig(vocab_size=256, seq_len=32, d_model=64, n_layer=2, n_head=2,
                            sdpa=True)
        configs = config_matrix("step", smoke=args.smoke, quick=args.quick, only=only)
        result["step"] = bench_step(configs, batch=8 if not args.smoke else 2,
                                    steps=10 if args.quick else 20,
                                    whole_model=args.whole_model, cfg=cfg)
        result.update(headline_step(result["step"]))
        save()
        print(tabulate([{k: r.get(k) for k in ("config", "tokens", "step_ms", "compile_s",
                                               "peak_mem_gb", "host_us_per_sparse_gemm")}
                        for r in result["step"]], headers="keys", floatfmt=".3f"))
    result["layout_verified"] = _layout_verified()
    result["cached_plans"] = cusparselt_plans.status(DEVICE) or "serving"
    for key in HEADLINE:
        if isinstance(result.get(key), float):
            print(f"{key}: {result[key]:.3f}")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
