"""2:4 sparse training on an NVIDIA GPU against dense, measured in the same run.

    python benchmarks/gpu.py [--quick] [--out DIR] [--whole-model] [--parts ...]

Four parts, bf16, CUDA events after a warm-up, medians:

(sparsify) the per-step weight work (exact masks and both compressed weights) of the FFN block,
    the GPT-2-medium-size model and one 4096x16384 weight, and MVUE's grad-weight operand,
    against the eager path it replaces and a plain copy of the same bytes
    (``benchmarks/gpu_sparsify.py``; ``sparsify_ms_per_step``, ``sparsify_tbps``);

(a) the three GEMMs of a linear layer at FFN shapes (tokens x d_model, d_ff = 4 d_model), up- and
    down-projection: forward ``X W^T``, grad-input ``dY W``, grad-weight ``dY^T X`` (sparse: dY^T
    pruned 2:4 along tokens, as MVUE does), measured exactly as the cost rule measures them
    (``nmcompile.kernels.cost.measure``): dense cuBLAS on the same masked operand against
    cuSPARSELt with algorithm 0 and with the algorithm its search picks (kept only if it passes
    the fp64 check), and the time to compress the sparse operand;
(b) an FFN block (up-projection, GELU, down-projection) forward + backward + SGD step, compiled
    with ``backend="inductor"`` and with ``backend="nm"`` (``kernels="auto"``: the cost rule;
    with and without MVUE), weights changing at every step so that the masks are solved and
    the weights compressed at every step; also the micro-step time (forward + backward with
    unchanged weights, as under gradient accumulation);
(c) a GPT-2-medium-size training step (24 layers, d 1024, 16 heads, seq 1024, vocab 50304,
    flash attention, fused AdamW), dense Inductor against nm; blocks compiled one by one
    (regional compilation: one graph serves the 24 blocks) unless ``--whole-model``.

For (b) and (c): compile time (first step minus the median step), peak memory
(``torch.cuda.max_memory_allocated`` over the timed steps), and for nm where the GPU time goes
(torch.profiler over 3 steps: mask refresh, weight compression, sparse GEMMs, the rest).

Prints a table per part and writes ``gpu.json`` into ``--out`` after each part (``device``,
``torch``, ``cusparselt``, ``ffn_speedup``, ``step_speedup``, ``command`` and every row).
``--quick`` (about 3 minutes on one H200) measures a subset of the shapes.
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
from nmcompile.kernels import cost, cusparselt
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
          "aten::_cslt_sparse_mm": "sparse_gemm", "aten::_cslt_compress": "all_compress"}
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


# -- report ----------------------------------------------------------------------------------

def _environment(command: str) -> dict:
    if DEVICE.type != "cuda":
        return {"device": str(DEVICE), "torch": torch.__version__, "cusparselt": "model",
                "command": command}
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
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
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
    parser.add_argument("--parts", default="sparsify,gemm,ffn,step",
                        help="comma-separated parts")
    parser.add_argument("--dump", default=None,
                        help="folder for the nm dumps (default: OUT/nm_dump)")
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
                                               "speedup", "compress_ms", "failure")}
                        for r in result["gemms"]], headers="keys", floatfmt=".3f"))
    ffn_configs = {
        "dense (inductor)": ("inductor", {}),
        "nm auto": ("nm", {"options": {"kernels": "auto"}}),
        "nm auto + mvue": ("nm", {"options": {"kernels": "auto", "grad_weight": "mvue"}}),
        "nm sparse": ("nm", {"options": {"kernels": "sparse"}}),
        "nm sparse + mvue": ("nm", {"options": {"kernels": "sparse", "grad_weight": "mvue"}}),
        "nm emulate": ("nm", {"options": {"kernels": "emulate"}}),
    }
    if "ffn" in parts:
        dims = [2048] if args.quick else [1024, 2048, 4096]
        tokens, target_d = (16384, 2048) if not args.smoke else (64, 32)
        dims = [target_d] if args.smoke else dims
        result["ffn"] = bench_ffn(dims, tokens, ffn_configs, steps=10 if args.quick else 20)
        target = [r for r in result["ffn"] if r["d_model"] == target_d]
        result["ffn_speedup"] = _ratio(target, "dense (inductor)", "nm auto")
        result["ffn_speedup_mvue"] = _ratio(target, "dense (inductor)", "nm auto + mvue")
        result["ffn_microstep_speedup"] = _ratio(target, "dense (inductor)", "nm auto",
                                                 "microstep_ms")
        result["ffn_speedup_sparse"] = _ratio(target, "dense (inductor)", "nm sparse")
        result["ffn_microstep_speedup_sparse"] = _ratio(target, "dense (inductor)", "nm sparse",
                                                        "microstep_ms")
        save()
        print(tabulate([{k: r.get(k) for k in ("d_model", "config", "step_ms", "microstep_ms",
                                               "compile_s", "peak_mem_gb")}
                        for r in result["ffn"]], headers="keys", floatfmt=".3f"))
    if "step" in parts:
        step_configs = {"dense (inductor)": ("inductor", {}), "nm auto": ("nm", {}),
                        "nm sparse": ("nm", {"options": {"kernels": "sparse"}})}
        if DEVICE.type == "cuda":  # CUDA graphs: no host overhead per kernel launch
            step_configs["dense (reduce-overhead)"] = ("inductor", {"mode": "reduce-overhead"})
            step_configs["nm sparse (reduce-overhead)"] = (
                "nm", {"options": {"kernels": "sparse", "mode": "reduce-overhead"}})
        cfg = GPT2_MEDIUM
        if args.smoke:
            cfg = GPTConfig(vocab_size=256, seq_len=32, d_model=64, n_layer=2, n_head=2,
                            sdpa=True)
        result["step"] = bench_step(step_configs, batch=8 if not args.smoke else 2,
                                    steps=10 if args.quick else 20,
                                    whole_model=args.whole_model, cfg=cfg)
        result["step_speedup"] = _ratio(result["step"], "dense (inductor)", "nm auto")
        result["step_speedup_sparse"] = _ratio(result["step"], "dense (inductor)", "nm sparse")
        result["step_speedup_cudagraphs"] = _ratio(
            result["step"], "dense (reduce-overhead)", "nm sparse (reduce-overhead)")
        save()
        print(tabulate([{k: r.get(k) for k in ("config", "tokens", "step_ms", "compile_s",
                                               "peak_mem_gb")}
                        for r in result["step"]], headers="keys", floatfmt=".3f"))
    for key in ("sparsify_ms_per_step", "sparsify_tbps",
                "ffn_speedup", "ffn_speedup_mvue", "ffn_microstep_speedup",
                "ffn_speedup_sparse", "ffn_microstep_speedup_sparse", "step_speedup",
                "step_speedup_sparse", "step_speedup_cudagraphs"):
        if result.get(key) is not None:
            print(f"{key}: {result[key]:.3f}x")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
