"""Quality of the sparse recipe on longer runs: the demo's model and data, dense against 2:4
sparse, over masked-decay strength, dense-tail fraction, mask refresh interval and MVUE, plus a
model-size sweep.

    python benchmarks/quality.py [--steps 2000] [--out quality.jsonl] [--part grid|size|all]

Each cell is one run of the demo's training loop (``nmcompile.demo``: TinyGPT byte-level on the
standard library's sources, AdamW, the same batches, init and seed for every cell) reporting the
final validation loss, its gap to the dense run of the same size, the jump of the validation
loss at the switch to the dense tail (first validation after the switch over the one at it),
and the mean flip rate over the first 10% of steps. Results are appended to ``--out`` (JSON
lines) as they finish, and cells already there are skipped, so an interrupted sweep resumes.
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


def _key(cell: dict) -> str:
    return json.dumps({k: cell[k] for k in sorted(cell) if k in (
        "recipe", "d_model", "steps", "decay", "tail", "interval", "mvue")}, sort_keys=True)


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
    parser.add_argument("--out", default="quality.jsonl")
    parser.add_argument("--part", choices=("grid", "size", "all"), default="all")
    args = parser.parse_args(argv)
    out = Path(args.out)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                result = json.loads(line)
                done[_key(result)] = result
    corpus = load_corpus(DemoConfig().corpus_bytes)
    for cell in cells(args.part, args.steps):
        if _key(cell) in done:
            continue
        print(f"running {cell}", flush=True)
        result = run_cell(cell, corpus)
        done[_key(cell)] = result
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"  val loss {result['final_val_loss']:.4f} in {result['wall_s']} s", flush=True)
    print(table([r for r in done.values() if r["steps"] == args.steps]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
