"""Export a 2:4 Hugging Face checkpoint in the ``compressed-tensors`` sparsity format.

The format (``quantization_config.sparsity_config`` in ``config.json`` with ``format:
"sparse-24-bitmask"`` and ``sparsity_structure: "2:4"``; each compressed ``nn.Linear`` weight
stored as ``<module>.compressed`` (its kept values, ``[out, in/2]``), ``<module>.bitmask`` (the
packed positions) and ``<module>.shape``) is written by the ``compressed-tensors`` library
itself: its ``ModelCompressor`` with a ``Sparse24BitMaskConfig`` compresses the state dict and
writes the config. Loading decompresses every weight back to ``W*M`` (the library's
``ModelCompressor.decompress``, which ``transformers.AutoModel*.from_pretrained`` calls).

The sparse formats exist only up to ``compressed-tensors`` 0.14.0.1 (later releases removed
them, and vLLM releases since 0.19.1 refuse Sparse24 checkpoints), so the ``export`` extra
pins that release, which needs ``transformers<5``.

Which weights are compressed: the ``weight`` of every ``nn.Linear`` module that has a mask and
is 2:4 along its in-features once pruned; the compressor's ``targets`` are ``["Linear"]`` and
every other ``nn.Linear`` is listed in ``ignore`` (stored dense). Masked weights of other
modules (GPT-2's ``Conv1D``) are stored pruned but dense, with a note.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint_io import (
    Checkpoint,
    CheckpointError,
    bool_masks,
    copy_model_files,
    prune_state,
    read_checkpoint,
)

__all__ = ["ExportReport", "export_compressed_tensors", "is_24_along_rows"]


@dataclass
class ExportReport:
    """What :func:`export_compressed_tensors` did.

    Attributes:
        compressed: names of the weights stored in the sparse-24-bitmask format.
        dense_notes: ``{name: why}`` for masked weights stored dense.
        files: the files written.
        global_sparsity: fraction of zeros over every floating-point tensor written.
    """

    compressed: list[str] = field(default_factory=list)
    dense_notes: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    global_sparsity: float = 0.0


def is_24_along_rows(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive elements along the last dim holds at most 2
    non-zeros (what the sparse-24-bitmask compressor stores without loss)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1).max() <= 2)


def _skeleton(path: Path) -> torch.nn.Module:
    """The checkpoint's model class built from its config on the meta device (no weights)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise CheckpointError(f"{path}/config.json names no transformers model class "
                              f"(architectures: {names}); export needs one")
    with torch.device("meta"):
        return cls(config)


def export_compressed_tensors(checkpoint: str | Path | Checkpoint, out: str | Path,
                              masks: Mapping[str, torch.Tensor] | None = None) -> ExportReport:
    """Prune a ``save_pretrained`` directory with its masks and write it to ``out`` in the
    ``compressed-tensors`` 2:4 format (weights, ``config.json`` with the sparsity config, and
    the directory's other model files).

    Args:
        checkpoint: a ``save_pretrained`` directory (sharded or not; a Trainer
            ``checkpoint-*`` folder with ``NMTrainerCallback``'s mask state, or the output of
            ``nmcompile prune``), or what :func:`~nmcompile.checkpoint_io.read_checkpoint`
            read from one.
        out: the output directory (created).
        masks: ``{name: bool mask}`` or a ``mask_state_dict``; ``None`` reads the masks
            stored in the directory.

    Raises:
        ImportError: ``compressed-tensors`` (the ``export`` extra) is not installed.
        CheckpointError: no masks, unreadable files, or a masked ``nn.Linear`` weight that is
            not 2:4 along its in-features once pruned (other ratios, or column-wise masks).
    """
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.config import Sparse24BitMaskConfig
    except ImportError as error:
        raise ImportError("export needs compressed-tensors==0.14.0.1 (the last release with "
                          "its sparse formats): pip install 'nmcompile[export]'") from error
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    checkpoint = ckpt.path
    if ckpt.kind != "pretrained":
        raise CheckpointError(f"{checkpoint}: export takes a save_pretrained directory (with "
                              "its config.json)")
    found = masks if masks is not None else ckpt.masks
    if not found:
        raise CheckpointError(f"no masks for {checkpoint}: pass masks (--masks FILE), or export "
                              "a Trainer checkpoint saved with NMTrainerCallback or the output "
                              "of nmcompile prune")
    found = bool_masks(found, str(checkpoint))
    state = prune_state(ckpt.state, found)
    model, report = _skeleton(ckpt.path), ExportReport()
    modules = dict(model.named_modules())
    for name in found:
        module = modules.get(name.rpartition(".")[0])
        if not isinstance(module, torch.nn.Linear) or not name.endswith(".weight"):
            report.dense_notes[name] = (f"a {type(module).__name__} weight (only nn.Linear "
                                        "weights are compressed): stored pruned, dense")
        elif not is_24_along_rows(state[name]):
            raise CheckpointError(f"{name} is not 2:4 along its in-features once pruned; "
                                  "compressed-tensors stores 2:4 only (train with n=2, m=4)")
        else:
            report.compressed.append(name)
    targets = {n.rpartition(".")[0] for n in report.compressed}
    ignore = sorted(n for n, m in modules.items()
                    if isinstance(m, torch.nn.Linear) and n not in targets)
    floats = [t for t in state.values() if t.is_floating_point()]
    report.global_sparsity = (sum(int((t == 0).sum()) for t in floats)
                              / max(1, sum(t.numel() for t in floats)))
    config = Sparse24BitMaskConfig(targets=["Linear"], ignore=ignore,
                                   global_sparsity=report.global_sparsity,
                                   sparsity_structure="2:4")
    compressor = ModelCompressor(sparsity_config=config)
    compressed = compressor.compress(model, state_dict=state)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report.files = _save(compressed, out) + copy_model_files(ckpt, out, index=False)
    compressor.update_config(str(out))
    return report


def _save(state: Mapping[str, torch.Tensor], out: Path) -> list[Path]:
    """Write ``state`` as ``save_pretrained`` does (safetensors, sharded above 5 GB)."""
    from huggingface_hub import save_torch_state_dict

    before = set(out.iterdir())
    save_torch_state_dict(dict(state), out)
    return sorted(set(out.iterdir()) - before)
