"""Command line: ``nmcompile COMMAND [flags]`` (also ``python -m nmcompile``).

Commands: demo, dump, solve, prune, export, bench.

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
    _add_tools(sub)
    return parser


def _add_tools(sub: argparse._SubParsersAction) -> None:
    dump = sub.add_parser(
        "dump", help="compile one training step of a model and print the per-matmul table",
        description="Compile one training step (forward + backward) of MODEL with the nm "
        "backend, write the dump (summary.txt/json, graphs) and print what became of every "
        "matmul. MODEL: 'tinygpt', a transformers model type (gpt2, llama, bert, ...; random "
        "weights, offline) or a JSON config file with a 'model_type' key.")
    dump.add_argument("model", metavar="MODEL")
    dump.add_argument("--out", default="nm_dump", help="dump folder (default: %(default)s)")
    _add_ratio(dump)
    dump.add_argument("--inductor", action=argparse.BooleanOptionalAction, default=True,
                      help="hand the graphs to Inductor (--no-inductor: op by op, fast)")
    dump.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, repeatable (e.g. --set n_layer=1); JSON values")
    dump.add_argument("--batch-size", type=_positive, default=2)
    dump.add_argument("--seq-len", type=_positive, default=16, help="tokens per sample")
    dump.add_argument("--seed", type=int, default=0)

    kinds = ("CHECKPOINT: a save_pretrained directory (sharded or not), a .safetensors file or "
             "a torch.save file")
    solve = sub.add_parser(
        "solve", help="offline transposable N:M masks for the weights of a saved checkpoint",
        description="Solve a transposable N:M mask for every eligible 2-D weight of a "
        "checkpoint and save {name: bool mask} to --out. Embeddings and LM heads are left out "
        "unless --all; weights whose dims are not multiples of m are skipped with a note. "
        + kinds + ".")
    solve.add_argument("checkpoint", metavar="CHECKPOINT")
    _add_ratio(solve)
    solve.add_argument("--method", choices=("mcf", "patterns", "greedy", "auto"),
                       default="auto", help="solver (default: %(default)s)")
    solve.add_argument("--out", default=None,
                       help="masks file, .safetensors or .pt by its suffix (default: masks.pt "
                       "for a torch.save checkpoint, masks.safetensors otherwise)")
    solve.add_argument("--all", action="store_true",
                       help="also solve embeddings and LM heads (drops the default exclude "
                       "patterns)")
    solve.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                       help="leave weights matching this fnmatch pattern out, IN ADDITION to "
                       "the default patterns (repeatable)")
    solve.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    prune = sub.add_parser(
        "prune", help="write the pruned checkpoint (W*M) and its masks, in the kind given",
        description="Prune every masked weight of a checkpoint (W <- W*M) and write it to --out "
        "in the kind it was given, every key kept (tied weights pruned under each of their "
        "names): a directory with the same weight files, the config and tokenizer copied, the "
        "masks in OUT/nm_masks.safetensors; a .safetensors file; a torch.save state_dict, the "
        "masks beside it. Masks: --masks FILE, else the checkpoint's own: a torch.save "
        "{'model': model.state_dict(), 'masks': nmcompile.mask_state_dict(model)}, or the "
        "nm_mask_state.pt NMTrainerCallback saves into each Trainer checkpoint-* folder. "
        + kinds + ".")
    prune.add_argument("checkpoint", metavar="CHECKPOINT")
    prune.add_argument("--out", required=True, help="the pruned checkpoint (a directory for "
                       "a directory)")
    prune.add_argument("--masks", default=None,
                       help="masks file ({name: bool mask}, .pt or .safetensors, e.g. from "
                       "nmcompile solve) instead of the checkpoint's own")
    prune.add_argument("--masks-out", default=None,
                       help="where the masks go (default: OUT/nm_masks.safetensors for a "
                       "directory, else OUT with .masks.pt / .masks.safetensors)")

    export = sub.add_parser(
        "export", help="write a 2:4 Hugging Face checkpoint in the compressed-tensors format",
        description="Prune a save_pretrained directory with its masks and write it to --out "
        "in the compressed-tensors 2:4 sparsity format (sparse-24-bitmask), written by the "
        "compressed-tensors library (pip install 'nmcompile[export]'), config included. "
        "Masks: --masks FILE, else those stored in the directory (NMTrainerCallback's "
        "nm_mask_state.pt, or nm_masks.safetensors from nmcompile prune).")
    export.add_argument("checkpoint", metavar="DIR")
    export.add_argument("--format", choices=("compressed-tensors",), default="compressed-tensors",
                        help="output format (default: %(default)s)")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--masks", default=None, help="masks file (.pt or .safetensors)")

    bench = sub.add_parser(
        "bench", help="run the mask-solver benchmark (and GPU rows when CUDA is present)",
        description="Run benchmarks/solvers.py --quick (from a source checkout); its table "
        "gains CUDA rows when a GPU is present.")
    bench.add_argument("--full", action="store_true", help="all shapes, not --quick")


def _add_ratio(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=_positive, default=2, help="non-zeros per group")
    parser.add_argument("--m", type=_positive, default=4, help="group size")


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    sizes = {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "d_model", "layers")}
    return (sizes | QUICK) if args.quick else sizes


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from .demo import DemoConfig, run_demo
    from .demo.report import results_table
    from .demo.run import missing_extras_notes

    if args.device == "cuda" and not torch.cuda.is_available():
        print("nmcompile demo: --device cuda, but CUDA is not available", file=sys.stderr)
        return 1
    for note in missing_extras_notes(not args.no_progress):  # said before minutes of training
        print(f"nmcompile demo: note: {note}", file=sys.stderr)
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
    written = ", ".join([*result.files, "dump/"])
    print(f"\ntotal {report['total_wall_s']:.0f} s; wrote {args.out}/: {written}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "demo" and _sizes(args)["d_model"] % 4:
            parser.error(f"--d-model must be a multiple of 4 (4 heads), got {args.d_model}")
        if args.command in ("dump", "solve") and not 0 < args.n < args.m:
            parser.error(f"--n and --m need 0 < n < m, got n={args.n}, m={args.m}")
        if args.command == "solve" and args.method == "patterns" and args.m > 4:
            parser.error(f"--method patterns enumerates tiles for m <= 4, got m={args.m}")
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help
        return int(exc.code or 0)
    if args.command == "demo":
        return _run_demo(args)
    return _run_tool(args)


def _run_tool(args: argparse.Namespace) -> int:
    from . import cli_checkpoints, cli_tools

    run = {"dump": cli_tools.run_dump, "solve": cli_tools.run_solve,
           "prune": cli_checkpoints.run_prune, "export": cli_checkpoints.run_export,
           "bench": cli_tools.run_bench}[args.command]
    try:
        return run(args)
    except cli_tools.CliError as error:
        print(f"nmcompile {args.command}: error: {error}", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - a CLI reports any failure and exits 1
        traceback.print_exc()
        print(f"nmcompile {args.command}: failed", file=sys.stderr)
        return 1
