"""Figures of a demo run: GEMM FLOP shares, flip rates, tables, plots and report files."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from ..extras import INSTALL_HINT, missing

__all__ = [
    "HEADERS",
    "flip_rate",
    "matmul_flops",
    "results_table",
    "sparse_flop_share",
    "write_outputs",
]

HEADERS = (
    "recipe",
    "final train loss",
    "final val loss",
    "tokens/s",
    "mean flip rate",
    "sparse GEMM FLOPs",
)


def matmul_flops(shapes: Sequence[Sequence[int]]) -> int:
    """FLOPs of one matmul record: 2 x (all dims of the left operand) x (right's last dim).

    For ``[M, K] @ [K, N]`` that is ``2MKN``; for a batched ``[B, M, K] @ [B, K, N]``,
    ``2BMKN``. A record carrying more than two shapes (a bias first) uses its last two.
    """
    if len(shapes) < 2:
        raise ValueError(f"a matmul record needs two operand shapes, got {shapes!r}")
    left, right = shapes[-2], shapes[-1]
    return 2 * math.prod(left) * right[-1]


def sparse_flop_share(summary: Mapping[str, Any]) -> float:
    """Share of GEMM FLOPs in ``summary.json``'s records that ran sparse (0 if none)."""
    total = sparse = 0
    for record in summary.get("matmuls", []):
        flops = matmul_flops(record["shapes"])
        total += flops
        sparse += flops if record["sparse"] else 0
    return sparse / total if total else 0.0


def flip_rate(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> float:
    """Fraction of mask entries (over all parameters both snapshots hold) that changed."""
    names = sorted(set(before) & set(after))
    if not names:
        return math.nan
    changed = sum(int((before[k] != after[k]).sum()) for k in names)
    return changed / sum(before[k].numel() for k in names)


def _fmt(value: float | None, spec: str) -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def results_table(recipes: Sequence[Mapping[str, Any]], tablefmt: str = "simple") -> str:
    """One row per recipe with the headline figures."""
    rows = [
        (
            r["name"],
            _fmt(r["final_train_loss"], ".4f"),
            _fmt(r["final_val_loss"], ".4f"),
            _fmt(r["tokens_per_s"], ",.0f"),
            _fmt(r["mean_flip_rate"], ".4%"),
            _fmt(r["sparse_flop_share"], ".1%"),
        )
        for r in recipes
    ]
    return tabulate(rows, headers=HEADERS, tablefmt=tablefmt, disable_numparse=True)


def _plot_losses(recipes: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(recipes):
        color = f"C{i}"
        steps, losses = zip(*r["train_curve"], strict=True) if r["train_curve"] else ((), ())
        ax.plot(steps, losses, color=color, alpha=0.35, lw=0.8, label=f"{r['name']} train")
        if r["val_curve"]:
            vs, vl = zip(*r["val_curve"], strict=True)
            ax.plot(vs, vl, color=color, marker="o", ms=3, lw=1.6, label=f"{r['name']} val")
        if r.get("tail_start") is not None:
            ax.axvline(r["tail_start"], color=color, ls=":", lw=1, label=f"{r['name']} dense tail")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/byte)", title="TinyGPT on stdlib sources")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_flips(recipes: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(recipes):
        if r["flip_curve"]:
            steps, rates = zip(*r["flip_curve"], strict=True)
            ax.plot(steps, rates, color=f"C{i}", marker=".", label=r["name"])
    ax.set(xlabel="step", ylabel="flip rate", title="Forward-mask entries changed per snapshot")
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no mask snapshots", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, report: Mapping[str, Any], matmul_table: str) -> list[str]:
    """Write ``report.json`` and ``report.md`` into ``out``, then ``loss.png`` and
    ``flip_rate.png`` if matplotlib is installed; return the names of the files written.

    Without matplotlib (the ``demo`` extra) the plots are skipped and ``report.md`` says what
    to install; the figures and tables are written all the same.
    """
    out.mkdir(parents=True, exist_ok=True)
    plots = not missing(("matplotlib",))
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    recipes, model = report["recipes"], report["model"]
    md = [
        "# nmcompile demo",
        "",
        f"TinyGPT (d_model {model.get('d_model')}, {model.get('n_layer')} layers, "
        f"{model.get('parameters', '?'):,} parameters), {report['steps']} steps of batch "
        f"{report['batch_size']} x {report['seq_len']} bytes on {report['device']}; corpus: "
        f"{report['corpus']['train_bytes']:,} train / {report['corpus']['val_bytes']:,} "
        "validation bytes of Python stdlib sources.",
        "",
        results_table(recipes, tablefmt="github"),
        "",
        f"Sparse recipe options: `{json.dumps(report['sparse_options'])}`.",
    ]
    if report.get("notes"):
        md += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    md += [""]
    if plots:
        md += ["![loss](loss.png)", "", "![flip rate](flip_rate.png)", ""]
    else:
        md += [f"(Plots skipped: matplotlib is not installed; `{INSTALL_HINT}` draws them.)", ""]
    md += [
        "## Matmuls of the sparse recipe's graphs",
        "",
        matmul_table or "(no dump)",
        "",
    ]
    (out / "report.md").write_text("\n".join(md))
    written = ["report.json", "report.md"]
    if plots:
        _plot_losses(recipes, out / "loss.png")
        _plot_flips(recipes, out / "flip_rate.png")
        written += ["loss.png", "flip_rate.png"]
    return written
