"""Compile time and CPU training-step time: ``backend="nm"`` against ``backend="inductor"``.

Each configuration runs in its own subprocess with an empty Inductor cache, so compile times
are cold and comparable. Compile time = wall time of the first training step minus the median
step time. Step = forward + backward + AdamW step on the demo model (TinyGPT).

    python benchmarks/compile.py [--steps 30] [--batch-size 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    "eager": ("eager", None),
    "inductor": ("inductor", None),
    "nm": ("nm", {}),
    "nm (inductor=False)": ("nm", {"inductor": False}),
}


def _worker(name: str, steps: int, batch: int, threads: int) -> dict:
    import torch

    from nmcompile.models import GPTConfig, TinyGPT

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = GPTConfig()
    model = TinyGPT(cfg)
    backend, options = CONFIGS[name]
    step_model = model if backend == "eager" else torch.compile(model, backend=backend,
                                                                options=options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step_model(idx, idx).backward()
        opt.step()
        return time.perf_counter() - start

    first = step()
    for _ in range(3):
        step()
    times = [step() for _ in range(steps)]
    median = statistics.median(times)
    return {"config": name, "first_step_s": first, "compile_s": first - median,
            "step_ms": 1e3 * median, "tokens_per_s": batch * cfg.seq_len / median}


def _run(name: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.steps, args.batch_size, args.threads)))
        return

    import torch
    from tabulate import tabulate

    rows = [_run(name, args) for name in CONFIGS]
    base = next(r for r in rows if r["config"] == "inductor")
    table = [(r["config"], f"{r['compile_s']:.1f}", f"{r['compile_s'] / base['compile_s']:.2f}x",
              f"{r['step_ms']:.1f}", f"{r['step_ms'] / base['step_ms']:.2f}x",
              f"{r['tokens_per_s']:.0f}") for r in rows]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, TinyGPT defaults, batch {args.batch_size}")
    print(tabulate(table, headers=["config", "compile s", "vs inductor", "step ms",
                                   "vs inductor", "tokens/s"], tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
