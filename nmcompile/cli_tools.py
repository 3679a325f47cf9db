"""The ``dump``, ``solve`` and ``bench`` commands of the ``nmcompile`` command line.

Each ``run_*`` function takes the parsed arguments and returns the exit code (0 success, 1
failure); :mod:`nmcompile.cli` builds the parser and handles usage errors (exit 2). The CLI
may print; library modules do not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CliError", "build_model", "read_checkpoint", "run_bench", "run_dump", "run_solve"]

#: Built-in example models of ``nmcompile dump``.
BUILTIN_MODELS = ("tinygpt",)
_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "solvers.py"


class CliError(Exception):
    """A failure the CLI reports in one line and exits 1 on."""


# -- dump ------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key] = _parse_value(value)
    return out


def build_model(name: str, overrides: Mapping[str, Any]) -> tuple[Any, int, str]:
    """The model ``nmcompile dump`` compiles, its vocabulary size and a description.

    ``name``: a built-in model (``tinygpt``), a transformers model type (``gpt2``, ``llama``,
    ``bert``, ...) or a JSON config file with a ``model_type`` key. Transformers models get
    random weights from their config; nothing is downloaded.
    """
    if name == "tinygpt":
        from .models import GPTConfig, TinyGPT

        cfg = GPTConfig(**overrides)
        return TinyGPT(cfg), cfg.vocab_size, f"TinyGPT {cfg}"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as error:
        raise CliError(f"{name!r} is not a built-in model ({', '.join(BUILTIN_MODELS)}) and "
                       f"transformers is not importable: {error}") from None
    fields = dict(overrides)
    if name.endswith(".json") or os.path.isfile(name):
        try:
            fields = {**json.loads(Path(name).read_text()), **fields}
        except (OSError, json.JSONDecodeError) as error:
            raise CliError(f"cannot read config file {name}: {error}") from None
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise CliError(f"config file {name} has no 'model_type'")
    else:
        model_type = name
    try:
        config = transformers.AutoConfig.for_model(model_type, **fields)
    except ValueError as error:
        raise CliError(f"unknown model {name!r}: not one of {', '.join(BUILTIN_MODELS)}, "
                       f"a transformers model type or a JSON config ({error})") from None
    # masked LM first: encoders (BERT) also have a causal-LM class meant for decoder configs
    for mapping in ("MODEL_FOR_MASKED_LM_MAPPING", "MODEL_FOR_CAUSAL_LM_MAPPING",
                    "MODEL_MAPPING"):
        classes = getattr(transformers, mapping)
        if type(config) in classes:
            model = classes[type(config)](config)
            if hasattr(model, "loss_type") and model.loss_type is None:
                model.loss_type = "ForCausalLM"  # a warning_once in forward breaks the graph
            return model, config.vocab_size, f"{type(model).__name__} ({model_type})"
    raise CliError(f"no causal-LM, masked-LM or base model class for {model_type!r}")


def _loss(output: Any) -> Any:
    import torch

    if isinstance(output, torch.Tensor):
        return output if output.dim() == 0 else output.float().pow(2).mean()
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    return output[0].float().pow(2).mean()


def run_dump(args: argparse.Namespace) -> int:
    """Compile one training step of MODEL with the nm backend, write the dump, print the table."""
    import torch

    from .dump import format_table, read_summary

    model, vocab, description = build_model(args.model, _overrides(args.set))
    model.train()
    out = Path(args.out)
    if (out / "summary.json").exists():
        for old in out.glob("graph_*"):  # a fresh dump: the summary lists this run only
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    options = {"n": args.n, "m": args.m, "inductor": args.inductor, "dump_dir": str(out)}
    compiled = torch.compile(model, backend="nm", options=options)
    torch.manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len))
    start = time.perf_counter()
    if args.model == "tinygpt":
        loss = _loss(compiled(ids, ids))
    else:
        loss = _loss(compiled(input_ids=ids, labels=ids) if _takes_labels(model)
                     else compiled(input_ids=ids))
    loss.backward()
    seconds = time.perf_counter() - start
    rows = read_summary(out)["matmuls"]
    print(f"{description}: one training step, loss {loss.item():.4f}, {seconds:.1f} s "
          f"(compile included)")
    print(format_table(rows))
    sparse = sum(r["sparse"] for r in rows)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    print(f"\n{sparse} of {len(rows)} matmuls sparse ({args.n}:{args.m}), {breaks} graph "
          f"break(s); wrote {out}/summary.txt, summary.json, graph_*/")
    return 0


def _takes_labels(model: Any) -> bool:
    import inspect

    return "labels" in inspect.signature(model.forward).parameters


# -- solve -----------------------------------------------------------------------------------
def read_checkpoint(path: str) -> Any:
    """:func:`nmcompile.checkpoint_io.read_checkpoint`, its errors as :class:`CliError`."""
    from .checkpoint_io import CheckpointError
    from .checkpoint_io import read_checkpoint as read

    try:
        return read(path)
    except CheckpointError as error:
        raise CliError(str(error)) from None


def run_solve(args: argparse.Namespace) -> int:
    """Transposable N:M masks of every eligible 2-D weight of a checkpoint, saved to ``--out``."""
    from tabulate import tabulate

    from .checkpoint_io import alias_groups, save_masks
    from .config import DEFAULT_EXCLUDE, NMConfig
    from .extras import progress
    from .solvers import transposable_mask

    ckpt = read_checkpoint(args.checkpoint)
    state, aliases = ckpt.state, alias_groups(ckpt.state)
    layer_filter = NMConfig(n=args.n, m=args.m, exclude=() if args.all else DEFAULT_EXCLUDE,
                            extra_exclude=tuple(args.exclude))
    todo, notes = [], []
    for name, w in state.items():
        if w.dim() != 2 or not w.is_floating_point() or aliases[name][0] != name:
            continue  # a tied weight is solved once, under its first key
        reason = layer_filter.excludes(name, w, aliases[name][1:])
        if reason is None and (w.shape[0] % args.m or w.shape[1] % args.m):
            reason = f"shape {tuple(w.shape)}: dims not multiples of m={args.m}"
        if reason is None:
            todo.append(name)
        else:
            notes.append(f"skipped {name}: {reason}")
    masks, rows = {}, []
    for name in progress(todo, desc="solving", unit="weight", disable=args.no_progress,
                         file=sys.stderr):
        w = state[name].float()
        start = time.perf_counter()
        mask = transposable_mask(w, args.n, args.m, method=args.method)
        seconds = time.perf_counter() - start
        kept = float((w.abs() * mask).sum() / w.abs().sum()) if w.abs().sum() > 0 else 1.0
        masks[name] = mask
        rows.append([name, "x".join(map(str, w.shape)), f"{kept:.4f}",
                     f"{mask.float().mean().item():.4f}", f"{seconds:.3f}"])
    print(tabulate(rows, headers=["weight", "shape", "kept |W|", "density", "seconds"],
                   tablefmt="github"))
    for note in notes:
        print(f"note: {note}")
    out = args.out or ("masks.pt" if ckpt.kind == "pt" else "masks.safetensors")
    save_masks(masks, out)
    print(f"\n{len(masks)} transposable {args.n}:{args.m} masks ({args.method}) -> {out}")
    return 0


# -- bench -----------------------------------------------------------------------------------
def run_bench(args: argparse.Namespace) -> int:
    """The solver benchmark (``benchmarks/solvers.py``), with CUDA rows when a GPU is present."""
    import torch

    if not _BENCH.is_file():
        raise CliError(f"{_BENCH} not found: `nmcompile bench` runs from a source checkout")
    command = [sys.executable, str(_BENCH)] + ([] if args.full else ["--quick"])
    print("$ " + " ".join(command), flush=True)
    code = subprocess.run(command, check=False).returncode
    if torch.cuda.is_available():
        print(f"GPU benchmark: the cuda rows above ({torch.cuda.get_device_name()}); the "
              "semi-structured GEMM kernels are not wired in, so there is no sparse-GEMM "
              "timing yet")
    else:
        print("GPU benchmark: skipped, no CUDA device on this machine")
    return 0 if code == 0 else 1
