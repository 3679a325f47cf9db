"""The CNN part of ``benchmarks/quality.py``: a small ResNet on scikit-learn's digits images,
dense against 2:4 transposable, Bi-Mask and 2:4 with a dense tail, over 3 seeds.

A CNN cell is one run of ``nmcompile.demo.digits.train_digits`` (same init and batches per
seed for every recipe) reporting the test accuracy; the table gives each recipe's mean over the
seeds with the spread (half the range) and its gap to dense. About 7 minutes on one CPU core.
"""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

__all__ = ["CNN_SEEDS", "cnn_cells", "cnn_table", "load_cnn_data", "run_cnn_cell"]

CNN_SEEDS = (0, 1, 2)


def cnn_cells(steps: int) -> list[dict[str, Any]]:
    """Every (recipe, seed) cell of the CNN part."""
    from nmcompile.demo.digits import RECIPES

    return [{"part": "cnn", "recipe": recipe, "seed": seed, "steps": steps}
            for seed in CNN_SEEDS for recipe in RECIPES]


def load_cnn_data() -> Any:
    """The digits split the CNN cells train and test on."""
    from nmcompile.demo.digits import load_digits_split

    return load_digits_split()


def run_cnn_cell(cell: dict[str, Any], data: Any) -> dict[str, Any]:
    """Train one CNN cell; its test accuracy, final loss and wall time in seconds."""
    from nmcompile.demo.digits import DigitsConfig, train_digits

    result = train_digits(cell["recipe"], DigitsConfig(steps=cell["steps"], seed=cell["seed"]),
                          data)
    return {**cell, **{k: result[k] for k in ("test_accuracy", "final_loss", "wall_s")},
            "sparse_weights": len(result["masked"])}


def cnn_table(results: list[dict[str, Any]]) -> str:
    """Test accuracy per recipe: mean ± spread (half the range) over seeds, gap to dense."""
    from nmcompile.demo.digits import RECIPES

    by_recipe: dict[str, list[dict[str, Any]]] = {}
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
