"""``NMTrainerCallback``: the Hugging Face ``Trainer`` with a model compiled by ``backend="nm"``.

The working path (``transformers`` is an optional dependency; this module imports it)::

    model.compile(backend="nm", options={...})        # in place: the Trainer sees the model
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[NMTrainerCallback()])
    trainer.train()                                   # or train(resume_from_checkpoint=...)

What the callback does:

* **says whether training is sparse**: after the first optimizer step it logs (``logging``,
  INFO) how many weights train with masks, and warns (``DenseFallbackWarning``) when none does
  (the model was not compiled with ``backend="nm"``);
* **logs the sparsity stats** at each logging step, as ``nm/...`` keys added to the
  Trainer's logs (:data:`LOG_KEYS`, from :func:`nmcompile.stats`): the callbacks after it
  (the console printer, and ``report_to`` integrations passed after it) and
  ``trainer.state.log_history`` get them;
* **checkpoints the mask state**: ``nmcompile.mask_state_dict(model)`` goes into each
  ``checkpoint-*`` folder as :data:`~nmcompile.checkpoint_io.MASK_STATE_FILE`, and is loaded
  back (``load_mask_state_dict``) when the Trainer resumes from one, before the first resumed
  step, so a resumed run takes the same steps as an uninterrupted one, also mid-interval with
  ``mask_interval > 1`` and with masks solved outside the graph.

The Trainer calls the integrations its ``report_to`` names *before* the callbacks it is given,
so those integrations log each step before the stats are added; to have TensorBoard, W&B, ...
record them, set ``report_to="none"`` and pass the integration's callback after this one
(``callbacks=[NMTrainerCallback(), TensorBoardCallback()]``). The callback warns when
``report_to`` names integrations.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..checkpoint_io import MASK_STATE_FILE
from ..fallback import DenseFallbackWarning
from ..state import load_mask_state_dict, mask_state_dict, masks, stats

__all__ = ["LOG_KEYS", "NMTrainerCallback", "summarize_stats"]

log = logging.getLogger(__name__)

#: The keys added to the Trainer's logs: ``nm/density`` (kept fraction of the masked weights'
#: elements), ``nm/kept_fraction`` (kept fraction of their magnitude), ``nm/flip_rate``
#: (fraction of mask entries changed since the previous reading; absent before there is one),
#: ``nm/refreshes`` (mask refreshes of the most refreshed weight), ``nm/sparse_phase``
#: (fraction of the weights in the schedule's sparse phase: 1.0 sparse, 0.0 dense) and
#: ``nm/masked_weights``. Density, kept fraction and flip rate are element-weighted means.
LOG_KEYS = ("nm/density", "nm/kept_fraction", "nm/flip_rate", "nm/refreshes",
            "nm/sparse_phase", "nm/masked_weights")


def summarize_stats(model: torch.nn.Module) -> dict[str, float]:
    """The ``nm/...`` log entries (:data:`LOG_KEYS`) of ``model`` from :func:`nmcompile.stats`;
    empty when no weight is masked. A reading: it also starts the next flip-rate interval of
    masks the graph computes itself."""
    found = stats(model)
    if not found:
        return {}
    params = dict(getattr(model, "_orig_mod", model).named_parameters())
    sizes = {name: params[name].numel() for name in found}
    total = sum(sizes.values())

    def mean(field: str) -> float | None:
        values = [(getattr(s, field), sizes[n]) for n, s in found.items()
                  if getattr(s, field) is not None]
        weight = sum(size for _, size in values)
        return sum(v * size for v, size in values) / weight if weight else None

    out = {"nm/density": mean("density"), "nm/kept_fraction": mean("kept_fraction"),
           "nm/flip_rate": mean("flip_rate"),
           "nm/refreshes": float(max(s.refreshes for s in found.values())),
           "nm/sparse_phase": sum(sizes[n] for n, s in found.items() if s.phase == "sparse")
           / total,
           "nm/masked_weights": float(len(found))}
    return {k: v for k, v in out.items() if v is not None}


def _unwrap(model: Any) -> Any:
    """The model the masks are registered on (DDP/FSDP wrappers looked through)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


class NMTrainerCallback(TrainerCallback):
    """Sparsity stats in the Trainer's logs and the mask state in its checkpoints (see the
    module docstring).

    Args:
        resume_from_checkpoint: the checkpoint folder the Trainer resumes from, when it is
            not ``args.output_dir/checkpoint-<step>`` (nor ``args.resume_from_checkpoint``).
    """

    def __init__(self, resume_from_checkpoint: str | None = None) -> None:
        self.resume_from_checkpoint = resume_from_checkpoint
        self._announced = False

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            raise ValueError(
                "NMTrainerCallback: the Trainer was given a torch.compile wrapper; it hides "
                "forward's signature, so the Trainer drops the batch's columns. Compile the "
                "model in place instead: model.compile(backend='nm', options=...), then "
                "Trainer(model=model, ...)")
        if args.report_to:
            warnings.warn(
                f"NMTrainerCallback: the report_to integrations {list(args.report_to)} run "
                "before the callbacks given to Trainer and log without the nm/ stats; to have "
                "them record the stats, set report_to='none' and pass their callbacks after "
                "this one: callbacks=[NMTrainerCallback(), TensorBoardCallback()]",
                UserWarning, stacklevel=2)
        self._announced = False
        if state.global_step > 0 and model is not None:
            self._restore(args, state, _unwrap(model))

    def _restore(self, args: Any, state: Any, model: torch.nn.Module) -> None:
        candidates = [self.resume_from_checkpoint, getattr(args, "resume_from_checkpoint", None),
                      Path(args.output_dir) / f"checkpoint-{state.global_step}"]
        for folder in candidates:
            if isinstance(folder, (str, Path)) and (Path(folder) / MASK_STATE_FILE).is_file():
                saved = torch.load(Path(folder) / MASK_STATE_FILE, map_location="cpu",
                                   weights_only=True)
                if saved.get("global_step") != state.global_step:
                    raise ValueError(
                        f"NMTrainerCallback: {folder}/{MASK_STATE_FILE} was saved at step "
                        f"{saved.get('global_step')}, the Trainer resumes at step "
                        f"{state.global_step}; pass NMTrainerCallback(resume_from_checkpoint="
                        "<the folder you resume from>)")
                load_mask_state_dict(model, saved["masks"])
                log.info("nm: mask state restored from %s (step %d)", folder, state.global_step)
                return
        warnings.warn(
            f"NMTrainerCallback: the Trainer resumes at step {state.global_step}, but no "
            f"{MASK_STATE_FILE} was found (looked in {[str(c) for c in candidates if c]}): "
            "masks kept outside the graph (mask_interval > 1, mcf, greedy, Bi-Mask) restart "
            "from the weights, so the run differs from an uninterrupted one. Pass "
            "NMTrainerCallback(resume_from_checkpoint=FOLDER).", RuntimeWarning, stacklevel=3)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    **kwargs: Any) -> None:
        if self._announced or model is None:
            return
        self._announced = True
        found = masks(_unwrap(model))
        if found:
            log.info("nm: %d weights train with N:M masks", len(found))
        else:
            warnings.warn(
                "NMTrainerCallback: no weight of the model trains with a mask after the first "
                "step: training is dense. Compile the model in place with "
                "model.compile(backend='nm', options=...) before creating the Trainer.",
                DenseFallbackWarning, stacklevel=2)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               model: Any = None, **kwargs: Any) -> None:
        if logs is None or model is None or "loss" not in logs:
            return  # only the training logging steps
        entries = summarize_stats(_unwrap(model))
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None,
                **kwargs: Any) -> None:
        if model is None:
            return
        masks = mask_state_dict(_unwrap(model))  # a collective under FSDP2: every rank
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            warnings.warn(f"NMTrainerCallback: no checkpoint folder {folder} to save the mask "
                          "state into", RuntimeWarning, stacklevel=2)
            return
        torch.save({"masks": masks, "global_step": state.global_step}, folder / MASK_STATE_FILE)
