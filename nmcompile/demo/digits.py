"""A small ResNet on scikit-learn's bundled digits images, dense against N:M sparse recipes.

The data ship with scikit-learn (``sklearn.datasets.load_digits``: 1,797 grey 8x8 images of
the digits 0-9; no download), so the CNN runs of ``examples/cnn_digits.py`` and
``benchmarks/quality.py`` work offline from a fresh clone. scikit-learn is an optional
dependency (``pip install nmcompile[cnn]``).

Every recipe trains the same :class:`~nmcompile.models.ResNet` (a 3x3 stem, one basic block per
stage, widths 16-32-64) from the same initialisation on the same batches, and reports the test
accuracy on a fixed stratified 20% split. The sparse recipes compile it with ``backend="nm"``
(``inductor=False``: op by op, no compile wait on a small CPU); the dense one runs eagerly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..models import ResNet

__all__ = ["RECIPES", "DigitsConfig", "load_digits_split", "train_digits"]

#: recipe name -> the ``nm`` options it compiles with (``None``: dense, eager); the tail
#: recipe's ``sparse_stop`` is set from the run's steps (:func:`_options`)
RECIPES: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "2:4 transposable": {"forward": "transposable", "grad_input": "transposable"},
    "Bi-Mask": {"forward": "rowwise", "grad_input": "bimask"},
    "2:4 + dense tail": {"forward": "transposable", "grad_input": "transposable",
                         "sparse_stop": 0.7},
}


@dataclass(frozen=True)
class DigitsConfig:
    """One training run: ``steps`` of SGD with momentum (cosine learning rate) on batches of
    ``batch`` images drawn with ``seed`` (which also seeds the initialisation)."""

    steps: int = 400
    batch: int = 64
    lr: float = 0.1
    seed: int = 0
    widths: tuple[int, ...] = (16, 32, 64)


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)``: images ``[N, 1, 8, 8]`` float32 scaled to
    ``[0, 1]`` and labels; a stratified 80/20 split fixed by ``seed``.

    Raises:
        ImportError: scikit-learn is not installed (``pip install nmcompile[cnn]``).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError("the digits data ship with scikit-learn: pip install scikit-learn "
                          "(or nmcompile[cnn])") from error
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    train, test = train_test_split(range(len(labels)), test_size=0.2, random_state=seed,
                                   stratify=data.target)
    return images[train], labels[train], images[test], labels[test]


def _options(recipe: str, steps: int) -> dict[str, Any] | None:
    options = RECIPES[recipe]
    if options is None:
        return None
    options = {"inductor": False, **options}
    if "sparse_stop" in options:
        options["sparse_stop"] = int(options["sparse_stop"] * steps)
    return options


def train_digits(recipe: str, cfg: DigitsConfig | None = None,
                 data: tuple[torch.Tensor, ...] | None = None) -> dict[str, Any]:
    """Train one recipe of :data:`RECIPES`; returns ``{"recipe", "seed", "test_accuracy",
    "final_loss", "masked", "wall_s"}`` (``masked``: weights trained sparse)."""
    import nmcompile

    cfg = cfg or DigitsConfig()
    x_train, y_train, x_test, y_test = data if data is not None else load_digits_split()
    torch.manual_seed(cfg.seed)
    model = ResNet(blocks=(1,) * len(cfg.widths), widths=cfg.widths, in_channels=1,
                   num_classes=10, stem="small")
    options = _options(recipe, cfg.steps)
    run = model if options is None else torch.compile(model, backend="nm", options=options)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, loss = time.perf_counter(), torch.tensor(0.0)
    masked: list[str] = []
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(y_train), (cfg.batch,), generator=gen)
        loss = F.cross_entropy(run(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step == 0 and options is not None:
            masked = sorted(nmcompile.masks(model))
    model.eval()
    with torch.no_grad():
        accuracy = (run(x_test).argmax(1) == y_test).float().mean().item()
    return {"recipe": recipe, "seed": cfg.seed, "steps": cfg.steps, "test_accuracy": accuracy,
            "final_loss": loss.item(), "masked": masked,
            "wall_s": round(time.perf_counter() - start, 1)}
