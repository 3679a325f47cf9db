"""The ``prune`` and ``export`` commands of the ``nmcompile`` command line.

Both take a ``torch.save`` checkpoint, a ``.safetensors`` file or a Hugging Face
``save_pretrained`` directory (:mod:`nmcompile.checkpoint_io`); ``prune`` writes the same kind
it was given, ``export`` a ``compressed-tensors`` directory. Each ``run_*`` function takes the
parsed arguments and returns the exit code; errors are :class:`~nmcompile.cli_tools.CliError`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .checkpoint_io import (
    MASKS_FILE,
    Checkpoint,
    CheckpointError,
    bool_masks,
    load_masks,
    prune_state,
    save_masks,
    write_like,
)
from .cli_tools import CliError, read_checkpoint

__all__ = ["run_export", "run_prune"]


def _masks(args: argparse.Namespace, ckpt: Checkpoint) -> dict[str, Any]:
    """``--masks FILE``, else the masks stored with the checkpoint."""
    if args.masks is not None:
        try:
            return bool_masks(load_masks(args.masks), args.masks)
        except CheckpointError as error:
            raise CliError(str(error)) from None
    if ckpt.masks is None:
        where = ("its 'masks' entry" if ckpt.kind == "pt" else
                 "nm_mask_state.pt (NMTrainerCallback) or nm_masks.safetensors (prune)")
        raise CliError(f"no masks in {args.checkpoint} (looked for {where}): save "
                       "{'model': model.state_dict(), 'masks': nmcompile.mask_state_dict(model)}, "
                       "train with NMTrainerCallback, or pass --masks FILE (e.g. from nmcompile "
                       "solve)")
    try:
        return bool_masks(ckpt.masks, f"{args.checkpoint} (its masks)")
    except CheckpointError as error:
        raise CliError(str(error)) from None


def _default_masks_out(ckpt: Checkpoint, out: str) -> Path:
    if ckpt.kind == "pretrained":
        return Path(out) / MASKS_FILE
    suffix = ".masks.safetensors" if ckpt.kind == "safetensors" else ".masks.pt"
    return Path(str(Path(out).with_suffix("")) + suffix)


def run_prune(args: argparse.Namespace) -> int:
    """Write the pruned checkpoint (``W*M`` for every masked weight) and the masks."""
    from tabulate import tabulate

    ckpt = read_checkpoint(args.checkpoint)
    masks = _masks(args, ckpt)
    try:
        state = prune_state(ckpt.state, masks)
        write_like(ckpt, state, args.out)
    except CheckpointError as error:
        raise CliError(str(error)) from None
    rows = []
    for name, mask in masks.items():
        weight = ckpt.state[name].abs().double()
        total = weight.sum()
        kept = float((weight * mask).sum() / total) if total > 0 else 1.0
        rows.append([name, "x".join(map(str, weight.shape)),
                     f"{mask.double().mean().item():.4f}", f"{kept:.4f}"])
    masks_out = Path(args.masks_out) if args.masks_out else _default_masks_out(ckpt, args.out)
    save_masks(masks, masks_out)
    print(tabulate(rows, headers=["weight", "shape", "density", "kept |W|"],
                   tablefmt="github"))
    what = {"pt": "state_dict", "safetensors": "safetensors",
            "pretrained": "save_pretrained directory"}[ckpt.kind]
    print(f"\n{len(masks)} weights pruned -> {args.out} ({what}, {len(ckpt.state)} keys); "
          f"masks -> {masks_out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Write a ``save_pretrained`` directory in the ``compressed-tensors`` 2:4 format."""
    from .integrations.compressed_tensors import export_compressed_tensors

    ckpt = read_checkpoint(args.checkpoint)
    masks = _masks(args, ckpt)
    try:
        report = export_compressed_tensors(ckpt, args.out, masks)
    except CheckpointError as error:
        raise CliError(str(error)) from None
    except ImportError as error:
        raise CliError(str(error)) from None
    for name, note in report.dense_notes.items():
        print(f"note: {name}: {note}")
    print(f"{len(report.compressed)} weights stored 2:4 (sparse-24-bitmask), global sparsity "
          f"{report.global_sparsity:.3f} -> {args.out}/ "
          f"({', '.join(p.name for p in report.files)})")
    return 0
