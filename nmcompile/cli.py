"""Command line: ``nmcompile demo [flags]`` (also ``python -m nmcompile demo``).

Exit codes: 0 success, 1 failure while running, 2 usage error (argparse's convention).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

#: ``--quick``: a smoke run of about half a minute (after the first, cold compile).
QUICK = {"steps": 40, "batch_size": 8, "seq_len": 32, "d_model": 32, "layers": 1}


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig

    d = DemoConfig()
    parser = argparse.ArgumentParser(prog="nmcompile", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train TinyGPT dense vs 2:4 sparse on stdlib sources and compare",
        description="Train TinyGPT byte-level on the Python standard library's sources with "
        "a dense recipe (Inductor) and a 2:4 sparse recipe (nm backend + dense tail), then "
        "print and save the comparison.",
    )
    demo.add_argument("--steps", type=_positive, default=d.steps, help="optimizer steps")
    demo.add_argument("--batch-size", type=_positive, default=d.batch_size)
    demo.add_argument("--seq-len", type=_positive, default=d.seq_len, help="bytes per sample")
    demo.add_argument(
        "--d-model", type=_positive, default=d.d_model, help="model width (a multiple of 4)"
    )
    demo.add_argument("--layers", type=_positive, default=d.layers, help="transformer blocks")
    demo.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    demo.add_argument("--seed", type=int, default=d.seed)
    demo.add_argument("--out", default=d.out, help="output folder (default: %(default)s)")
    demo.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    sizes = {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "d_model", "layers")}
    return (sizes | QUICK) if args.quick else sizes


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from .demo import DemoConfig, run_demo
    from .demo.report import results_table

    if args.device == "cuda" and not torch.cuda.is_available():
        print("nmcompile demo: --device cuda, but CUDA is not available", file=sys.stderr)
        return 1
    cfg = DemoConfig(
        **_sizes(args),
        device=args.device,
        seed=args.seed,
        out=args.out,
        progress=not args.no_progress,
    )
    try:
        result = run_demo(cfg)
    except Exception:  # noqa: BLE001 - a CLI reports any failure and exits 1
        traceback.print_exc()
        print("nmcompile demo: failed", file=sys.stderr)
        return 1
    report = result.report
    print()
    print(results_table(report["recipes"]))
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"\nmatmuls of the sparse recipe's graphs ({args.out}/dump/summary.txt):")
    print(result.matmul_table or "(no dump written)")
    print(
        f"\ntotal {report['total_wall_s']:.0f} s; wrote {args.out}/: loss.png, flip_rate.png, "
        "report.json, report.md, dump/"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "demo" and _sizes(args)["d_model"] % 4:
            parser.error(f"--d-model must be a multiple of 4 (4 heads), got {args.d_model}")
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help
        return int(exc.code or 0)
    return _run_demo(args)
