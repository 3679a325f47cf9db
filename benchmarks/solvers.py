"""Speed and quality of the transposable mask solvers.

Prints one table (tabulate): median time, weights per second and the fraction of ``sum|W|``
kept, per method, ratio and shape, on Gaussian weights. ``patterns`` runs the C kernel on CPU
(``patterns (torch)`` is its pure-torch fallback, for comparison) and is also timed on CUDA
when a GPU is present. Every method is warmed up on a small matrix first (table caches, imports,
kernels), then timed ``--repeats`` times on the real shape.

    python benchmarks/solvers.py            # 1024^2, 4096^2, 4096x16384
    python benchmarks/solvers.py --quick    # 1024^2 only, 2 repeats

Targets: exact 2:4 transposable of 4096^2 by ``patterns`` <= 0.15 s on CPU; exact 4:8 of
4096^2 by ``mcf`` <= 10 s; ``greedy`` >= 20 M weights/s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
from tabulate import tabulate

from nmcompile.solvers import native, transposable_mask, transposable_mask_scored

#: ``scored (compiled)``: the one-matmul scorer as the backend runs it inside training graphs,
#: compiled by Inductor (the first, compiling call is the warm-up).
_SCORED = torch.compile(transposable_mask_scored, dynamic=False)

SHAPES = [(1024, 1024), (4096, 4096), (4096, 16384)]
#: (n, m, method, exact_n) rows of the table.
CASES = [
    (2, 4, "patterns", False),
    (2, 4, "patterns", True),
    (2, 4, "patterns (torch)", False),
    (2, 4, "patterns (torch)", True),
    (2, 4, "scored (compiled)", False),
    (2, 4, "greedy", False),
    (2, 4, "mcf", False),
    (4, 8, "greedy", False),
    (4, 8, "mcf", False),
    (4, 8, "mcf", True),
]
#: mcf is skipped above this many weights (4096x16384 would take minutes per run).
MCF_MAX_WEIGHTS = 4096 * 4096


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_case(w: torch.Tensor, n: int, m: int, method: str, exact_n: bool, repeats: int):
    """Median seconds over ``repeats`` runs and the kept fraction of ``sum|w|``."""
    device = w.device.type
    if method == "scored (compiled)":
        def solve(x):
            return _SCORED(x, n, m, exact_n)
        solve(w)  # compiles for this shape
    elif method == "patterns (torch)":
        def solve(x):
            with mock.patch.object(native, "kernel", return_value=None):
                return transposable_mask(x, n, m, "patterns", exact_n)
        solve(w[:256, :256])  # warm-up
    else:
        def solve(x):
            return transposable_mask(x, n, m, method, exact_n)
        solve(w[:256, :256])  # warm-up (and the C kernel's first-use build)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mask = solve(w)
        _sync(device)
        times.append(time.perf_counter() - start)
    kept = float((w.abs() * mask).sum() / w.abs().sum())
    return statistics.median(times), kept


def run(shapes, repeats: int) -> list[list]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        w = torch.randn(*shape, generator=gen)
        for n, m, method, exact_n in CASES:
            label = [f"{shape[0]}x{shape[1]}", f"{n}:{m}", method, "exact" if exact_n else "<=n"]
            if method == "mcf" and w.numel() > MCF_MAX_WEIGHTS:
                rows.append(label + ["cpu", "skipped (minutes)", "", ""])
                continue
            sec, kept = time_case(w, n, m, method, exact_n, repeats)
            speed = f"{w.numel() / sec / 1e6:.1f}"
            rows.append(label + ["cpu", f"{sec:.3f}", speed, f"{kept:.4f}"])
        if torch.cuda.is_available():
            wc = w.cuda()
            for exact_n in (False, True):
                sec, kept = time_case(wc, 2, 4, "patterns", exact_n, repeats)
                rows.append([f"{shape[0]}x{shape[1]}", "2:4", "patterns",
                             "exact" if exact_n else "<=n", "cuda", f"{sec:.4f}",
                             f"{wc.numel() / sec / 1e6:.1f}", f"{kept:.4f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024^2 only, 2 repeats")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES[:1] if args.quick else SHAPES
    repeats = 2 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"CPU pattern search: {native.status()}")
    headers = ["shape", "ratio", "method", "per row/col", "device", "seconds", "M weights/s",
               "kept |W|"]
    print(tabulate(run(shapes, repeats), headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
