"""One recipe of the demo: a training loop over phases, each a ``torch.compile`` of the model.

A phase starts at a step and compiles the same module with its own backend, so the sparse
recipe's dense tail continues from the sparse phase's weights and optimizer state. Losses are
evaluated with gradients enabled (the result is detached): a ``no_grad`` forward would make
Dynamo compile a separate inference graph, costing one more compile per phase.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .. import masks  # the public API; its home module may move
from ..extras import progress as progress_bar
from .data import windows
from .report import flip_rate

__all__ = ["Phase", "Schedule", "train_recipe"]


@dataclass(frozen=True)
class Phase:
    """From step ``start`` on, train ``torch.compile(model, backend=backend, options=...)``.

    ``tail_start``: the step at which this compile switches to dense training by itself (the
    nm backend's ``sparse_stop``), if it does.
    """

    start: int
    backend: str
    options: Mapping[str, Any] | None = None
    tail_start: int | None = None


@dataclass(frozen=True)
class Schedule:
    """What a recipe sees: batches, evaluation set and the bookkeeping intervals."""

    train: torch.Tensor  # uint8 bytes
    val: torch.Tensor
    offsets: torch.Tensor  # [steps, batch] window starts into train
    val_starts: torch.Tensor  # [n_val_batches, batch] window starts into val
    seq_len: int
    lr: float
    eval_every: int
    flip_every: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def steps(self) -> int:
        return self.offsets.shape[0]

    def lr_at(self, step: int) -> float:
        """Linear warm-up over 5% of the steps, then cosine decay to 10% of ``lr``."""
        warm = max(1, self.steps // 20)
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1, self.steps - warm)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _loss(compiled: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = compiled(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _evaluate(compiled: Callable, s: Schedule) -> float:
    total = 0.0
    for starts in s.val_starts:
        x, y = (t.to(s.device) for t in windows(s.val, starts, s.seq_len))
        total += _loss(compiled, x, y).detach().item()
    return total / len(s.val_starts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eval_steps(s: Schedule, phases: Sequence[Phase]) -> set[int]:
    """Steps after which validation runs: every ``eval_every``, before each switch, last."""
    points = set(range(s.eval_every, s.steps + 1, s.eval_every))
    points |= {p.start for p in phases if p.start > 0} | {s.steps}
    points |= {p.tail_start for p in phases if p.tail_start is not None}
    points |= {p.tail_start + 1 for p in phases if p.tail_start is not None}  # first after
    return points


def _train_step(
    compiled: Callable, model: torch.nn.Module, opt: torch.optim.Optimizer, s: Schedule, step: int
) -> tuple[float, float]:
    """One optimizer step on batch ``step``; returns its loss and wall time in seconds."""
    for group in opt.param_groups:
        group["lr"] = s.lr_at(step)
    x, y = (t.to(s.device) for t in windows(s.train, s.offsets[step], s.seq_len))
    t0 = time.perf_counter()
    loss = _loss(compiled, x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    value = loss.item()
    _sync(s.device)
    return value, time.perf_counter() - t0


def _summarize(rec: dict[str, Any], s: Schedule, timed_s: float, timed_steps: int) -> None:
    """Headline figures: train loss averaged over the last 5% of steps, last validation loss,
    throughput over the steps that did not compile, mean of the flip-rate snapshots."""
    tail = max(1, s.steps // 20)
    flips = [r for _, r in rec["flip_curve"] if not math.isnan(r)]
    tokens = s.offsets.shape[1] * s.seq_len * timed_steps
    rec.update(
        final_train_loss=sum(v for _, v in rec["train_curve"][-tail:]) / tail,
        final_val_loss=rec["val_curve"][-1][1],
        tokens_per_s=tokens / timed_s if timed_s else None,
        mean_flip_rate=sum(flips) / len(flips) if flips else None,
    )


def train_recipe(
    name: str,
    model: torch.nn.Module,
    phases: Sequence[Phase],
    s: Schedule,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` in place through ``phases``; return curves and headline figures."""
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    starts, evals = {p.start: p for p in phases}, _eval_steps(s, phases)
    rec: dict[str, Any] = {
        "name": name,
        "train_curve": [],
        "val_curve": [],
        "flip_curve": [],
        "compile_s": [],
        "val_loss_before_tail": None,
        "val_loss_after_switch": None,
        "tail_start": (phases[-1].start if len(phases) > 1 else phases[-1].tail_start),
    }
    timed_s, timed_steps, t_start = 0.0, 0, time.perf_counter()
    bar = progress_bar(range(s.steps), desc=name, disable=not progress, dynamic_ncols=True)
    for step in bar:
        if step in starts:
            phase = starts[step]
            compiled = torch.compile(model, backend=phase.backend, options=phase.options)
            snapshot, first = None, True
        value, elapsed = _train_step(compiled, model, opt, s, step)
        if first:  # the step that compiled is kept out of the throughput
            rec["compile_s"].append(round(elapsed, 2))
            first = False
        else:
            timed_s, timed_steps = timed_s + elapsed, timed_steps + 1
        rec["train_curve"].append((step + 1, value))
        if phase.backend == "nm" and (step + 1) % s.flip_every == 0:
            current = {k: v.detach().cpu().clone() for k, v in masks(model).items()}
            if snapshot is not None and current:
                rec["flip_curve"].append((step + 1, flip_rate(snapshot, current)))
            snapshot = current
        if step + 1 in evals:
            rec["val_curve"].append((step + 1, _evaluate(compiled, s)))
            if rec["tail_start"] == step + 1:
                rec["val_loss_before_tail"] = rec["val_curve"][-1][1]
            if rec["tail_start"] is not None and rec["tail_start"] + 1 == step + 1:
                rec["val_loss_after_switch"] = rec["val_curve"][-1][1]
            bar.set_postfix(loss=f"{value:.3f}", val=f"{rec['val_curve'][-1][1]:.3f}")
    bar.close()
    rec["wall_s"] = round(time.perf_counter() - t_start, 2)
    _summarize(rec, s, timed_s, timed_steps)
    return rec
