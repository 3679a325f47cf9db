"""Quality of the sparse recipe on longer runs: the demo's model and data, dense against 2:4
sparse, over masked-decay strength, dense-tail fraction, mask refresh interval and MVUE, plus a
model-size sweep; and a CNN part: a small ResNet on scikit-learn's digits images, dense against
2:4 transposable, Bi-Mask and 2:4 with a dense tail, over 3 seeds.

    python benchmarks/quality.py [--steps 2000] [--out quality.jsonl]
                                 [--part grid|size|cnn|all] [--cnn-steps 300] [--threads 1]

Each cell is one run of the demo's training loop (``nmcompile.demo``: TinyGPT byte-level on the
standard library's sources, AdamW, the same batches, init and seed for every cell) reporting the
final validation loss, its gap to the dense run of the same size, the jump of the validation
loss at the switch to the dense tail (first validation after the switch over the one at it),
and the mean flip rate over the first 10% of steps. Results are appended to ``--out`` (JSON
lines) as they finish, and cells already there are skipped, so an interrupted sweep resumes.

A CNN cell is one run of ``nmcompile.demo.digits.train_digits`` (same init and batches per
seed for every recipe) reporting the test accuracy; the table gives each recipe's mean over the
seeds with the spread (half the range) and its gap to dense. About 7 minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from nmcompile.demo import DemoConfig
from nmcompile.demo.data import load_corpus
from nmcompile.demo.run import SPARSE_OPTIONS, make_model, make_schedule, sparse_phases
from nmcompile.demo.train import Phase, train_recipe

DECAYS = (1e-4, 3e-4, 1e-3)
TAILS = (0.15, 0.3)
INTERVALS = (1, 10)
MVUE = (True, False)
SIZES = (64, 96, 128)
#: The best cell of the grid (BENCHMARKS.md): the demo's default recipe and the size sweep's.
BEST = {"decay": 1e-4, "tail": 0.3, "interval": 1, "mvue": True}
CNN_SEEDS = (0, 1, 2)


def _key(cell: dict) -> str:
    return json.dumps({k: cell[k] for k in sorted(cell) if k in (
        "part", "recipe", "seed", "d_model", "steps", "decay", "tail", "interval", "mvue")},
        sort_keys=True)


def run_cell(cell: dict, corpus) -> dict:
    cfg = DemoConfig(steps=cell["steps"], d_model=cell["d_model"], progress=False,
                     tail_fraction=cell.get("tail", 0.0))
    schedule = make_schedule(cfg, corpus)
    model = make_model(cfg)
    if cell["recipe"] == "dense":
        phases = [Phase(0, "inductor")]
    else:
        options = {**SPARSE_OPTIONS, "decay": cell["decay"], "mask_interval": cell["interval"],
                   "grad_weight": "mvue" if cell["mvue"] else "dense"}
        phases = sparse_phases(cfg, options)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    rec = train_recipe(cell["recipe"], model, phases, schedule, progress=False)
    early = [r for s, r in rec["flip_curve"] if s <= cell["steps"] // 10]
    jump = None
    if rec.get("val_loss_after_switch") is not None and rec["val_loss_before_tail"]:
        jump = rec["val_loss_after_switch"] / rec["val_loss_before_tail"] - 1
    return {**cell, "final_val_loss": rec["final_val_loss"],
            "final_train_loss": rec["final_train_loss"], "switch_jump": jump,
            "early_flip_rate": sum(early) / len(early) if early else None,
            "mean_flip_rate": rec["mean_flip_rate"], "val_curve": rec["val_curve"],
            "flip_curve": rec["flip_curve"],
            "wall_s": round(time.perf_counter() - start, 1)}


def cells(part: str, steps: int) -> list[dict]:
    """The grid: decay x tail fraction at the base interval and MVUE setting, then the other
    interval and MVUE off at the base decay and tail (one factor at a time)."""
    out = []
    if part in ("grid", "all"):
        out.append({"recipe": "dense", "d_model": 64, "steps": steps})
        base = {"recipe": "sparse", "d_model": 64, "steps": steps, "decay": DECAYS[0],
                "tail": TAILS[0], "interval": INTERVALS[0], "mvue": MVUE[0]}
        for decay, tail in itertools.product(DECAYS, TAILS):
            out.append({**base, "decay": decay, "tail": tail})
        out += [{**base, "interval": i} for i in INTERVALS[1:]]
        out += [{**base, "mvue": v} for v in MVUE[1:]]
    if part in ("size", "all"):
        for d in SIZES:
            out.append({"recipe": "dense", "d_model": d, "steps": steps})
            out.append({"recipe": "sparse", "d_model": d, "steps": steps, **BEST})
    unique = {_key(c): c for c in out}
    return list(unique.values())


def cnn_cells(steps: int) -> list[dict]:
    from nmcompile.demo.digits import RECIPES

    return [{"part": "cnn", "recipe": recipe, "seed": seed, "steps": steps}
            for seed in CNN_SEEDS for recipe in RECIPES]


def run_cnn_cell(cell: dict, data) -> dict:
    from nmcompile.demo.digits import DigitsConfig, train_digits

    result = train_digits(cell["recipe"], DigitsConfig(steps=cell["steps"], seed=cell["seed"]),
                          data)
    return {**cell, **{k: result[k] for k in ("test_accuracy", "final_loss", "wall_s")},
            "sparse_weights": len(result["masked"])}


def cnn_table(results: list[dict]) -> str:
    """Test accuracy per recipe: mean ± spread (half the range) over seeds, gap to dense."""
    from nmcompile.demo.digits import RECIPES

    by_recipe: dict[str, list[dict]] = {}
    for r in results:
        by_recipe.setdefault(r["recipe"], []).append(r)
    dense = by_recipe.get("dense")
    dense_mean = sum(r["test_accuracy"] for r in dense) / len(dense) if dense else None
    rows = []
    for recipe in [r for r in RECIPES if r in by_recipe]:
        accs = [100 * r["test_accuracy"] for r in by_recipe[recipe]]
        mean, spread = sum(accs) / len(accs), (max(accs) - min(accs)) / 2
        gap = ("" if dense_mean is None or recipe == "dense"
               else f"{mean - 100 * dense_mean:+.2f}")
        rows.append([recipe, f"{mean:.2f} ± {spread:.2f}", gap, len(accs),
                     by_recipe[recipe][0].get("sparse_weights", ""),
                     round(sum(r["wall_s"] for r in by_recipe[recipe]) / len(accs), 1)])
    return tabulate(rows, headers=["recipe", "test accuracy %", "vs dense (points)", "seeds",
                                   "sparse weights", "wall s"], tablefmt="github")


def table(results: list[dict]) -> str:
    dense = {(r["d_model"], r["steps"]): r["final_val_loss"] for r in results
             if r["recipe"] == "dense"}
    rows = []
    for r in sorted(results, key=lambda r: (r["d_model"], r["recipe"] != "dense",
                                            r.get("decay", 0), r.get("tail", 0),
                                            r.get("interval", 0), not r.get("mvue", True))):
        base = dense.get((r["d_model"], r["steps"]))
        gap = (r["final_val_loss"] / base - 1) if base else None
        rows.append([r["d_model"], r["recipe"], r.get("decay", ""), r.get("tail", ""),
                     r.get("interval", ""), {True: "on", False: "off"}.get(r.get("mvue"), ""),
                     f"{r['final_val_loss']:.4f}", "" if gap is None else f"{100 * gap:+.2f}%",
                     "" if r.get("switch_jump") is None else f"{100 * r['switch_jump']:+.2f}%",
                     "" if r.get("early_flip_rate") is None else f"{r['early_flip_rate']:.4f}",
                     r["wall_s"]])
    return tabulate(rows, headers=["d_model", "recipe", "decay", "tail", "interval", "mvue",
                                   "val loss", "vs dense", "switch jump", "early flip",
                                   "wall s"], tablefmt="github")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--cnn-steps", type=int, default=300)
    parser.add_argument("--out", default="quality.jsonl")
    parser.add_argument("--part", choices=("grid", "size", "cnn", "all"), default="all")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                result = json.loads(line)
                done[_key(result)] = result
    todo = [] if args.part == "cnn" else [(c, run_cell) for c in cells(args.part, args.steps)]
    if args.part in ("cnn", "all"):
        todo += [(c, run_cnn_cell) for c in cnn_cells(args.cnn_steps)]
    inputs = {}
    for cell, run in todo:
        if _key(cell) in done:
            continue
        print(f"running {cell}", flush=True)
        if run not in inputs:
            inputs[run] = _inputs(run)
        result = run(cell, inputs[run])
        done[_key(cell)] = result
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"  done in {result['wall_s']} s", flush=True)
    if args.part != "cnn":
        print(table([r for r in done.values()
                     if r.get("part") != "cnn" and r["steps"] == args.steps]))
    if args.part in ("cnn", "all"):
        print(cnn_table([r for r in done.values()
                         if r.get("part") == "cnn" and r["steps"] == args.cnn_steps]))
    return 0


def _inputs(run):
    """The data a cell runner takes: the demo's corpus, or the digits split."""
    if run is run_cnn_cell:
        from nmcompile.demo.digits import load_digits_split

        return load_digits_split()
    return load_corpus(DemoConfig().corpus_bytes)


if __name__ == "__main__":
    sys.exit(main())
