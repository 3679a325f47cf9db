"""Quality of the sparse recipes on longer runs, over seeds: the demo's model and data, dense
against 2:4 sparse, over masked-decay strength, dense-tail fraction, mask refresh interval and
MVUE, beside S-STE, at three seeds per cell, plus the default recipe at a larger width; and a
CNN part (``benchmarks/quality_cnn.py``): a small ResNet on scikit-learn's digits images.

    python benchmarks/quality.py [--steps 2000] [--seeds 1 2 3]
                                 [--part baseline|grid|sste|size|cnn|all] [--cnn-steps 300]
                                 [--out quality.jsonl] [--shard 0/2] [--threads 1]
                                 [--skip PART ...] [--table]
                                 [--recipe KEY=VALUE ... [--d-model D]]

Each cell is one run of the demo's training loop (``nmcompile.demo``: TinyGPT byte-level on the
standard library's sources, AdamW), exactly as ``nmcompile demo --seed S`` trains it: the seed
sets the init, the batches and the RNG stream of the MVUE draws. A cell reports the final
validation loss, the validation losses at the switch to the dense tail and right after it, and
the mean flip rate over the first 10% of steps. Results are appended to ``--out`` (JSON lines)
as they finish and cells already there are skipped, so a sweep runs in parts and resumes;
``--shard i/k`` takes every k-th cell from the i-th, so k processes (``--threads 1`` each) share
a machine without running a cell twice. ``--table`` prints the table of what ``--out`` holds:
per recipe, the mean over seeds and the min-max of the validation loss, of its gap to the
dense run of the same seed (at the end, and at the first evaluation, 10% into the run), and
of the jump at the switch. ``--recipe tail=0.5 decay=0.001`` runs one recipe outside the grid
(the default's fields with these changed; ``--recipe recipe=dense`` the dense baseline) at
``--seeds`` and ``--d-model``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from quality_cnn import cnn_cells, cnn_table, load_cnn_data, run_cnn_cell
from tabulate import tabulate

from nmcompile.demo import DemoConfig
from nmcompile.demo.data import load_corpus
from nmcompile.demo.run import SPARSE_OPTIONS, make_model, make_schedule, sparse_phases
from nmcompile.demo.train import Phase, train_recipe

SEEDS = (1, 2, 3)
DECAYS = (1e-4, 3e-4, 1e-3)
TAILS = (0.15, 0.3, 0.5)
INTERVALS = (1, 10)
MVUE = (True, False)
SIZES = (128,)
#: ``baseline``: dense and the default recipe; ``grid``: decay x tail, then the interval and
#: MVUE; ``sste``: S-STE in both forms beside row-wise SR-STE; ``size``: at other widths;
#: ``cnn``: the digits ResNet (``quality_cnn.py``).
PARTS = ("baseline", "grid", "sste", "size", "cnn")
#: Fields of a cell that name it (the rest are results). A field at its default here is left
#: out of the key, so cells written before the field existed keep their key.
CELL_FIELDS = ("part", "recipe", "d_model", "steps", "seed", "decay", "tail", "interval",
               "mvue", "prune", "forward")
FIELD_DEFAULTS = {"prune": "hard", "forward": "transposable"}


def default_cell() -> dict[str, Any]:
    """The demo's default sparse recipe (``SPARSE_OPTIONS`` and the demo's tail) as a cell."""
    return {"recipe": "sparse", "decay": SPARSE_OPTIONS.get("decay", 0.0),
            "tail": DemoConfig().tail_fraction, "interval": SPARSE_OPTIONS.get("mask_interval", 1),
            "mvue": SPARSE_OPTIONS.get("grad_weight") == "mvue",
            "prune": SPARSE_OPTIONS.get("prune", "hard"),
            "forward": SPARSE_OPTIONS.get("forward", "transposable")}


def _key(cell: dict[str, Any]) -> str:
    fields = {k: cell[k] for k in CELL_FIELDS
              if k in cell and FIELD_DEFAULTS.get(k, object()) != cell[k]}
    return json.dumps(fields, sort_keys=True)


def recipe_of(cell: dict[str, Any]) -> tuple[str, ...]:
    """A cell's recipe without its size, length and seed (what the seeds are pooled over)."""
    key = json.loads(_key(cell))
    return tuple(f"{k}={key[k]}" for k in sorted(key) if k not in ("d_model", "steps", "seed"))


def sparse_options(cell: dict[str, Any]) -> dict[str, Any]:
    """The nm backend's options of a sparse cell: every field the grid varies set explicitly."""
    forward = cell.get("forward", "transposable")
    return {"n": 2, "m": 4, "inductor": True, "forward": forward,
            "grad_input": "transposable" if forward == "transposable" else "dense",
            "decay": cell["decay"], "mask_interval": cell["interval"],
            "grad_weight": "mvue" if cell["mvue"] else "dense",
            "prune": cell.get("prune", "hard")}


def run_cell(cell: dict[str, Any], corpus) -> dict[str, Any]:
    """Train one cell as the demo does (same config, init, batches, RNG stream)."""
    cfg = DemoConfig(steps=cell["steps"], d_model=cell["d_model"], seed=cell["seed"],
                     progress=False, tail_fraction=cell.get("tail", 0.0))
    schedule = make_schedule(cfg, corpus)
    model = make_model(cfg)
    if cell["recipe"] == "dense":
        phases = [Phase(0, "inductor")]
    else:
        phases = sparse_phases(cfg, sparse_options(cell))
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    rec = train_recipe(cell["recipe"], model, phases, schedule, progress=False)
    early = [r for s, r in rec["flip_curve"] if s <= cell["steps"] // 10]
    jump = None
    if rec.get("val_loss_after_switch") is not None and rec["val_loss_before_tail"]:
        jump = rec["val_loss_after_switch"] / rec["val_loss_before_tail"] - 1
    return {**cell, "final_val_loss": rec["final_val_loss"],
            "final_train_loss": rec["final_train_loss"], "switch_jump": jump,
            "val_loss_before_tail": rec["val_loss_before_tail"],
            "val_loss_after_switch": rec["val_loss_after_switch"],
            "early_flip_rate": sum(early) / len(early) if early else None,
            "mean_flip_rate": rec["mean_flip_rate"], "val_curve": rec["val_curve"],
            "flip_curve": rec["flip_curve"], "threads": torch.get_num_threads(),
            "torch": torch.__version__, "wall_s": round(time.perf_counter() - start, 1)}


def _recipes(part: str) -> list[dict[str, Any]]:
    """Sparse recipes (without size, length, seed) of a part."""
    base = {"recipe": "sparse", "decay": DECAYS[0], "tail": TAILS[0], "interval": INTERVALS[0],
            "mvue": MVUE[0]}
    out: list[dict[str, Any]] = []
    if part == "baseline":
        out.append(default_cell())
    if part == "grid":  # the longer tail first: the default's candidates
        out += [{**base, "decay": d, "tail": t}
                for t, d in itertools.product(sorted(TAILS, reverse=True), DECAYS)]
        out += [{**base, "interval": i} for i in INTERVALS[1:]]
        out += [{**base, "mvue": v} for v in MVUE[1:]]
    if part == "sste":  # S-STE (no masked decay, as the paper) in both forms, beside SR-STE
        tail = DemoConfig().tail_fraction  # (the default's transposable form: baseline) in
        # the row-wise form of the paper, all with the default's dense tail
        out += [{**base, "decay": 0.0, "tail": tail, "prune": "sste", "forward": f}
                for f in ("transposable", "rowwise")]
        out.append({**base, "decay": default_cell()["decay"], "tail": tail,
                    "forward": "rowwise"})
    if part == "size":
        out.append(default_cell())
    return out


def cells(part: str, steps: int, seeds: tuple[int, ...],
          sizes: tuple[int, ...] = SIZES) -> list[dict[str, Any]]:
    """Every (recipe, seed) cell of ``part``, recipe-major (a partial sweep has its first
    recipes at every seed); the dense baselines first."""
    parts = PARTS if part == "all" else (part,)
    out = []
    for p in (p for p in parts if p != "cnn"):  # the CNN's cells: quality_cnn.cnn_cells
        for d in sizes if p == "size" else (64,):
            recipes = [{"recipe": "dense"}, *_recipes(p)]
            out += [{**r, "d_model": d, "steps": steps, "seed": seed}
                    for r in recipes for seed in seeds]
    unique = {_key(c): c for c in out}
    return list(unique.values())


def recipe_cells(pairs: list[str], steps: int, seeds: tuple[int, ...],
                 d_model: int) -> list[dict[str, Any]]:
    """The cells of ``--recipe KEY=VALUE ...``: the default recipe with these fields changed
    (values as JSON, else strings), or dense for ``recipe=dense``, at every seed."""
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        fields = [k for k in CELL_FIELDS if k not in ("part", "d_model", "steps", "seed")]
        if not sep or key not in fields:
            raise ValueError(f"--recipe {pair!r}: expected KEY=VALUE with KEY one of {fields}")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    recipe = {"recipe": "dense"} if changes.get("recipe") == "dense" else {
        **default_cell(), **changes}
    return [{**recipe, "d_model": d_model, "steps": steps, "seed": seed} for seed in seeds]


def _spread(values: list[float], pct: bool = False) -> str:
    if not values:
        return ""
    scale, fmt = (100, "{:+.2f}%") if pct else (1, "{:.4f}")
    mean = fmt.format(scale * statistics.fmean(values))
    lo, hi = fmt.format(scale * min(values)), fmt.format(scale * max(values))
    return f"{mean} ({lo} … {hi})"


def table(results: list[dict[str, Any]], tablefmt: str = "github") -> str:
    """Mean over seeds and min-max per recipe and width; gaps against the same seed's dense."""
    dense = {(r["d_model"], r["steps"], r["seed"]): r for r in results if r["recipe"] == "dense"}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["d_model"], r["steps"], recipe_of(r)), []).append(r)
    default = recipe_of(default_cell())
    rows = []
    for (d, steps, recipe), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2])):
        base = [(r, dense[(d, steps, r["seed"])]) for r in rs if (d, steps, r["seed"]) in dense]
        gaps = [r["final_val_loss"] / b["final_val_loss"] - 1 for r, b in base]
        early = [r["val_curve"][0][1] / b["val_curve"][0][1] - 1 for r, b in base]
        jumps = [r["switch_jump"] for r in rs if r.get("switch_jump") is not None]
        flips = [r["early_flip_rate"] for r in rs if r.get("early_flip_rate") is not None]
        first = rs[0]
        rows.append([d, first["recipe"] + (" (default)" if recipe == default else ""),
                     first.get("prune", "hard") if first["recipe"] != "dense" else "",
                     first.get("forward", "transposable") if first["recipe"] != "dense" else "",
                     first.get("decay", ""), first.get("tail", ""), first.get("interval", ""),
                     {True: "on", False: "off"}.get(first.get("mvue"), ""),
                     ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"])),
                     _spread([r["final_val_loss"] for r in rs]),
                     _spread(gaps, pct=True) if first["recipe"] != "dense" else "",
                     _spread(early, pct=True) if first["recipe"] != "dense" else "",
                     _spread(jumps, pct=True),
                     f"{statistics.fmean(flips):.3f}" if flips else ""])
    return tabulate(rows, headers=["d_model", "recipe", "prune", "forward", "decay", "tail",
                                   "interval", "mvue", "seeds", "val loss mean (min … max)",
                                   "vs dense", "vs dense, first eval", "switch jump",
                                   "early flip"], tablefmt=tablefmt)


def _read(out: Path) -> dict[str, dict[str, Any]]:
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                result = json.loads(line)
                if result.get("prune") == "mask":  # its name before the option existed
                    result["prune"] = "hard"
                done[_key(result)] = result
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--cnn-steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES),
                        help="widths of the size part (default: %(default)s)")
    parser.add_argument("--out", default="quality.jsonl")
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all")
    parser.add_argument("--shard", default="0/1", help="i/k: run every k-th cell from the i-th")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--skip", nargs="+", default=[], choices=PARTS,
                        help="leave the cells of these parts to another process")
    parser.add_argument("--table", action="store_true", help="only print the tables of --out")
    parser.add_argument("--recipe", nargs="+", default=[], metavar="KEY=VALUE",
                        help="run only this recipe (the default's fields with these changed)")
    parser.add_argument("--d-model", type=int, default=64, help="width of --recipe's cells")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.table:
        done = list(_read(out).values())
        print(table([r for r in done if r.get("part") != "cnn" and r["steps"] == args.steps
                     and "seed" in r]))
        cnn = [r for r in done if r.get("part") == "cnn" and r["steps"] == args.cnn_steps]
        if cnn:
            print(cnn_table(cnn))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    index, count = (int(v) for v in args.shard.split("/"))
    seeds, sizes = tuple(args.seeds), tuple(args.sizes)
    skip = {_key(c) for p in args.skip for c in cells(p, args.steps, seeds, sizes)}
    planned = (recipe_cells(args.recipe, args.steps, seeds, args.d_model) if args.recipe
               else cells(args.part, args.steps, seeds, sizes))
    if args.part in ("cnn", "all") and not args.recipe and "cnn" not in args.skip:
        planned += cnn_cells(args.cnn_steps)
    todo = [c for c in planned if _key(c) not in skip][index::count]
    data: dict[bool, Any] = {}
    for cell in todo:
        if _key(cell) in _read(out):  # re-read: another shard may have appended meanwhile
            continue
        print(f"running {cell}", flush=True)
        cnn = cell.get("part") == "cnn"
        if cnn not in data:
            data[cnn] = load_cnn_data() if cnn else load_corpus(DemoConfig().corpus_bytes)
        result = (run_cnn_cell if cnn else run_cell)(cell, data[cnn])
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"  done in {result['wall_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
