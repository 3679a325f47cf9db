"""The per-step weight work of 2:4 training on a GPU: exact transposable masks and both compressed
weights, through the mask bank's own code (``nmcompile.refresh.run``), against the path it
replaces and against a plain copy of the same bytes (the memory-speed limit).

    python benchmarks/gpu_sparsify.py [--quick] [--out DIR]
    python benchmarks/gpu.py --parts sparsify              # the same, into gpu.json

bf16, CUDA events after a warm-up, medians over ``--steps``. For each set of weights:

* ``sparsify``: what a training step now does per optimizer step: every mask refreshed and
  ``compress(W*M)``, ``compress((W*M)^T)`` written (the Triton sparsify kernels of
  ``nmcompile.kernels.sparsify``, one launch per kind of weight, where the layout check
  passed on this device; else the fallback below, and ``layout_verified`` says so);
* ``old``: the eager path kept for other devices and shapes: the batched pattern scorer
  (``transposable_masks_scored``) and two ``torch._cslt_compress`` per weight;
* ``copy``: ``dst.copy_(src)`` of a buffer with as many bytes as the sparsify reads and writes
  (W read, the bool mask and both blobs written: 5.25 bytes per weight element).

Sets: the FFN block (d 2048: 8192x2048 and 2048x8192), the GPT-2-medium-size model (24 layers
of 3072x1024, 1024x1024, 4096x1024, 1024x4096: 96 weights, 302 M masked parameters), one
4096x16384 weight. Also MVUE's grad-weight operand (``nmcompile.kernels.mvue24``) of a
16384-token x 4096 ``dY``. Writes ``sparsify.json`` (``sparsify_ms_per_step``: the GPT-2-medium
set, ``sparsify_tbps``: the 4096x16384 weight's effective bandwidth, and every row).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from nmcompile import refresh
from nmcompile.kernels import layout_check
from nmcompile.masking import MaskRecord, MaskSpec, Pack

#: Bytes a sparsify moves per weight element: bf16 W read, bool mask and two 9/16 blobs written.
BYTES_PER_ELEMENT = 2 + 1 + 2 * 2 * 9 / 16
GPT2_MEDIUM = [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)] * 24
SETS = {"ffn d2048": [(8192, 2048), (2048, 8192)], "gpt2-medium": GPT2_MEDIUM,
        "4096x16384": [(4096, 16384)]}


def _timed(fn, device: torch.device, warmup: int = 3, steps: int = 20) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, wall time on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            import time

            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _work(shapes, device: torch.device, writer_kept: bool) -> list[refresh.Work]:
    """One refresh-and-compress ``Work`` per weight, as the mask bank builds them; with
    ``writer_kept=False`` the packs are written by ``torch._cslt_compress`` (the old path)."""
    from nmcompile.state import _new_pack

    gen = torch.Generator(device=device).manual_seed(0)
    work = []
    for rows, cols in shapes:
        w = torch.randn(rows, cols, generator=gen, device=device, dtype=torch.bfloat16)
        record = MaskRecord(MaskSpec(2, 4, "transposable"),
                            forward=torch.ones(rows, cols, dtype=torch.bool, device=device))
        packs = [_new_pack(w, torch.bfloat16, t) for t in (False, True)]
        if not writer_kept:
            packs = [Pack(p.tensor, p.dtype, p.transposed) for p in packs]
        work.append(refresh.Work(record, w, True, packs))
    return work


def _time_work(shapes, device: torch.device, writer_kept: bool,
               steps: int) -> tuple[list[str], float]:
    """Who writes the packs, and the median ms of one step's ``refresh.run``."""
    work = _work(shapes, device, writer_kept)
    writers = sorted({p.label for w in work for p in w.packs})
    return writers, _timed(lambda: refresh.run(work), device, steps=steps)


def _time_copy(nbytes: int, device: torch.device, steps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return _timed(lambda: dst.copy_(src), device, steps=steps)


def bench_set(name: str, shapes, device: torch.device, steps: int) -> dict:
    """Per-step sparsify of one set of weights by the new and the old path, and the copy."""
    elements = sum(r * c for r, c in shapes)
    moved = elements * BYTES_PER_ELEMENT
    row = {"set": name, "weights": len(shapes), "elements": elements}
    row["writer"], row["sparsify_ms"] = _time_work(shapes, device, True, steps)
    _, row["old_ms"] = _time_work(shapes, device, False, max(3, steps // 4))
    row["copy_ms"] = _time_copy(int(moved) // 2, device, steps)
    row["sparsify_tbps"] = moved / (row["sparsify_ms"] * 1e-3) / 1e12
    row["copy_tbps"] = moved / (row["copy_ms"] * 1e-3) / 1e12
    row["speedup_vs_old"] = row["old_ms"] / row["sparsify_ms"]
    return row


def bench_mvue(tokens: int, out: int, device: torch.device, steps: int) -> dict:
    """MVUE's compressed grad-weight operand of a ``[tokens, out]`` dY, by the Triton kernel
    where the layout check passed (else the traced draw plus ``torch._cslt_compress``)."""
    from nmcompile.kernels import cusparselt
    from nmcompile.solvers import mvue

    dy = torch.randn(tokens, out, device=device, dtype=torch.bfloat16)
    row = {"set": f"mvue dY {tokens}x{out}"}
    verdict = layout_check.verdict(device, torch.bfloat16)
    if verdict.writer == "triton":
        from nmcompile.kernels import mvue24

        padded = mvue24.padded_tokens(tokens, verdict.arch)
        blob = torch.empty(out, 9 * padded // 16, dtype=torch.bfloat16, device=device)
        seed = torch.zeros(1, dtype=torch.int64, device=device)
        row["mvue_ms"] = _timed(lambda: mvue24.launch(dy.t(), blob, verdict.arch, exact=True,
                                                      seed=seed), device, steps=steps)
    row["old_ms"] = _timed(lambda: cusparselt.compress(mvue(dy.t(), 2, 4)), device,
                           steps=max(3, steps // 4))
    return row


def run(quick: bool, device: torch.device, smoke: bool = False) -> dict:
    """Every row and the headline figures (the result JSON's ``sparsify_*`` keys)."""
    verdict = layout_check.verdict(device, torch.bfloat16)
    result = {"layout_verified": verdict.writer is not None, "layout": verdict.arch,
              "layout_reason": verdict.reason, "sparsify": []}
    steps = 5 if smoke else (10 if quick else 20)
    sets = {"smoke": [(64, 64), (128, 64)]} if smoke else SETS
    for name, shapes in sets.items():
        result["sparsify"].append(bench_set(name, shapes, device, steps))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tokens, out = (64, 64) if smoke else (16384, 4096)
    result["sparsify"].append(bench_mvue(tokens, out, device, steps))
    by = {r["set"]: r for r in result["sparsify"]}
    headline = by.get("gpt2-medium", by.get("smoke"))
    result["sparsify_ms_per_step"] = headline["sparsify_ms"]
    result["sparsify_tbps"] = by.get("4096x16384", headline)["sparsify_tbps"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("gpu_bench_out"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_sparsify.py needs a CUDA GPU", file=sys.stderr)
        return 2
    result = run(args.quick, torch.device("cuda"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sparsify.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
