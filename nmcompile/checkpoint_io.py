"""Reading and writing the checkpoints the command line takes: ``torch.save`` files, single
``.safetensors`` files and Hugging Face ``save_pretrained`` directories (sharded or not).

What is read is written back in the same kind: a directory becomes a directory with the same
weight files (same shard names, same index), the same safetensors metadata and the other files
of the model (config, generation config, tokenizer) copied; a ``.safetensors`` file a
``.safetensors`` file; anything else a ``torch.save`` file. Every key the input had is kept,
and tensors that share storage in a ``torch.save`` file (tied weights) still do.

A directory may also hold the mask state nmcompile wrote into it: :data:`MASK_STATE_FILE`
(``NMTrainerCallback`` in each Trainer ``checkpoint-*`` folder) or :data:`MASKS_FILE`
(``nmcompile prune`` beside the pruned weights).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["MASKS_FILE", "MASK_STATE_FILE", "Checkpoint", "CheckpointError", "alias_groups",
           "bool_masks", "copy_model_files", "load_masks", "prune_state", "read_checkpoint",
           "save_masks", "write_like"]

#: The mask state ``NMTrainerCallback`` saves into each Trainer ``checkpoint-*`` folder:
#: ``{"masks": nmcompile.mask_state_dict(model), "global_step": int}`` (``torch.save``).
MASK_STATE_FILE = "nm_mask_state.pt"
#: The masks ``nmcompile prune`` writes beside pruned weights in a directory:
#: ``{name: bool mask}`` (safetensors).
MASKS_FILE = "nm_masks.safetensors"
#: Weight files of a ``save_pretrained`` directory, most preferred first: (index, single file).
WEIGHT_LAYOUTS = (("model.safetensors.index.json", "model.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin"))
#: Files of a Trainer checkpoint that are training state, not the model: never copied.
TRAINER_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json",
                 "training_args.bin", "rng_state*.pth")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and the fix."""


@dataclass
class Checkpoint:
    """A checkpoint as read: its tensors and how to write them back in the same kind.

    Attributes:
        path: what was read.
        kind: ``"pretrained"`` (a ``save_pretrained`` directory), ``"safetensors"`` or ``"pt"``.
        state: every tensor, by key (for a directory, over all its weight files).
        files: weight file name (relative to the directory) -> its keys, in file order.
        metadata: safetensors file name -> its ``__metadata__`` (``None`` if it has none).
        index: the index file's name of a sharded directory (``None`` if not sharded).
        masks: the masks stored with the checkpoint (a ``torch.save`` checkpoint's ``masks``,
            a directory's :data:`MASK_STATE_FILE` or :data:`MASKS_FILE`), ``{name: entry}``
            where an entry is a bool mask or a ``mask_state_dict`` entry; ``None`` if none.
    """

    path: Path
    kind: str
    state: dict[str, torch.Tensor]
    files: dict[str, list[str]] = field(default_factory=dict)
    metadata: dict[str, dict[str, str] | None] = field(default_factory=dict)
    index: str | None = None
    masks: Mapping[str, Any] | None = None


def _first_line(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    except Exception as error:  # noqa: BLE001 - any unreadable file is one error
        raise CheckpointError(f"cannot read {path}: {_first_line(error)}") from None


def _load_torch(path: Path, what: str = "") -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one error
        raise CheckpointError(f"cannot read {what}{path}: {_first_line(error)}") from None


def _tensors_only(data: Any, origin: str) -> dict[str, torch.Tensor]:
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{origin} holds a {type(data).__name__}, not a state_dict")
    bad = sorted(str(k) for k, v in data.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{origin} has non-tensor entries: {', '.join(bad[:5])}"
                              + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return dict(data)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a ``save_pretrained`` directory, a ``.safetensors`` file or a ``torch.save`` file.

    A ``torch.save`` file holds a ``state_dict``, or a training checkpoint with the
    ``state_dict`` under ``model`` or ``state_dict`` (and its masks under ``masks``).

    Raises:
        CheckpointError: a missing or unreadable file, a directory without weight files, an
            entry that is not a tensor.
    """
    path = Path(path)
    if path.is_dir():
        return _read_directory(path)
    if not path.exists():
        raise CheckpointError(f"cannot read checkpoint {path}: no such file or directory")
    if path.suffix == ".safetensors":
        state, metadata = _load_safetensors(path)
        return Checkpoint(path, "safetensors", state, {path.name: list(state)},
                          {path.name: metadata})
    data = _load_torch(path, "checkpoint ")
    masks = data.get("masks") if isinstance(data, Mapping) else None
    if isinstance(data, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    state = _tensors_only(data, f"checkpoint {path}")
    return Checkpoint(path, "pt", state, {path.name: list(state)}, masks=masks)


def _read_directory(path: Path) -> Checkpoint:
    for index_name, single in WEIGHT_LAYOUTS:
        if (path / index_name).is_file():
            try:
                weight_map = json.loads((path / index_name).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise CheckpointError(f"cannot read {path / index_name}: "
                                      f"{_first_line(error)}") from None
            names, index = list(dict.fromkeys(weight_map.values())), index_name
            break
        if (path / single).is_file():
            names, index = [single], None
            break
    else:
        wanted = ", ".join(name for layout in WEIGHT_LAYOUTS for name in layout)
        raise CheckpointError(f"{path} is a directory without model weights (one of {wanted}, "
                              "as save_pretrained writes them)")
    ckpt = Checkpoint(path, "pretrained", {}, index=index)
    for name in names:
        if name.endswith(".safetensors"):
            state, ckpt.metadata[name] = _load_safetensors(path / name)
        else:
            state = _tensors_only(_load_torch(path / name), f"weight file {path / name}")
        ckpt.files[name] = list(state)
        ckpt.state.update(state)
    ckpt.masks = _directory_masks(path)
    return ckpt


def _directory_masks(path: Path) -> Mapping[str, Any] | None:
    if (path / MASK_STATE_FILE).is_file():
        data = _load_torch(path / MASK_STATE_FILE)
        if not isinstance(data, Mapping) or not isinstance(data.get("masks"), Mapping):
            raise CheckpointError(f"{path / MASK_STATE_FILE} holds no 'masks'")
        return data["masks"]
    if (path / MASKS_FILE).is_file():
        return load_masks(path / MASKS_FILE)
    return None


def load_masks(path: str | Path) -> dict[str, Any]:
    """``{name: mask}`` from a ``.safetensors`` or ``torch.save`` masks file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)[0]
    data = _load_torch(path)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not masks by name")
    return dict(data)


def save_masks(masks: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write ``{name: bool mask}``: safetensors for a ``.safetensors`` path, else ``torch.save``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in masks.items()}, str(path))
    else:
        torch.save(dict(masks), path)


def alias_groups(state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Key -> every key whose tensor is the same view of the same storage (tied weights saved
    with ``torch.save``), in ``state``'s order; keys without aliases map to themselves only."""
    by_view: dict[tuple, list[str]] = {}
    for key, tensor in state.items():
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        by_view.setdefault(view, []).append(key)
    return {key: keys for keys in by_view.values() for key in keys}


def write_like(ckpt: Checkpoint, state: Mapping[str, torch.Tensor], out: str | Path
               ) -> list[Path]:
    """Write ``state`` (the checkpoint's keys, new values) as the kind ``ckpt`` was read in;
    return the files written.

    Raises:
        CheckpointError: ``state`` lacks or adds keys, or ``out`` is the input itself.
    """
    out = Path(out)
    if set(state) != set(ckpt.state):
        missing, extra = sorted(set(ckpt.state) - set(state)), sorted(set(state) - set(ckpt.state))
        raise CheckpointError(f"the output must keep the input's keys: missing {missing[:5]}, "
                              f"extra {extra[:5]}")
    if out.resolve() == ckpt.path.resolve():
        raise CheckpointError(f"--out {out} is the input itself; write elsewhere")
    if ckpt.kind == "pt":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(state), out)
        return [out]
    if ckpt.kind == "safetensors":
        out.parent.mkdir(parents=True, exist_ok=True)
        _save_safetensors(state, list(state), out, ckpt.metadata.get(ckpt.path.name))
        return [out]
    return _write_directory(ckpt, state, out)


def _save_safetensors(state: Mapping[str, torch.Tensor], keys: list[str], path: Path,
                      metadata: dict[str, str] | None) -> None:
    from safetensors.torch import save_file

    save_file({k: state[k].contiguous() for k in keys}, str(path), metadata=metadata)


def _write_directory(ckpt: Checkpoint, state: Mapping[str, torch.Tensor], out: Path
                     ) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in ckpt.files.items():
        if name.endswith(".safetensors"):
            _save_safetensors(state, keys, out / name, ckpt.metadata.get(name))
        else:
            torch.save({k: state[k] for k in keys}, out / name)
        written.append(out / name)
    return written + copy_model_files(ckpt, out, index=True)


def copy_model_files(ckpt: Checkpoint, out: Path, index: bool) -> list[Path]:
    """Copy the files of a ``save_pretrained`` directory that are neither weights, nor the
    Trainer's training state (:data:`TRAINER_STATE`), nor nmcompile's mask files, nor folders:
    the config, generation config, tokenizer files, ...; the weight index too if ``index``."""
    skip = {*ckpt.files, MASK_STATE_FILE, MASKS_FILE, *([] if index else [ckpt.index])}
    copied = []
    for source in sorted(ckpt.path.iterdir()):
        if (source.is_file() and source.name not in skip
                and not any(source.match(p) for p in TRAINER_STATE)):
            shutil.copy2(source, out / source.name)
            copied.append(out / source.name)
    return copied


def bool_masks(found: Any, origin: str) -> dict[str, torch.Tensor]:
    """``{name: bool mask}`` from masks as ``nmcompile solve``/``prune``/``apply_masks`` write
    them or as ``mask_state_dict`` does (``{name: {"forward": mask, ...}}``).

    Raises:
        CheckpointError: not a mapping, or an entry that is no bool tensor.
    """
    if not isinstance(found, Mapping):
        raise CheckpointError(f"{origin}: masks must be a mapping of parameter names, got "
                              f"{type(found).__name__}")
    out = {}
    for name, entry in found.items():
        mask = entry.get("forward") if isinstance(entry, Mapping) else entry
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise CheckpointError(f"{origin}: the mask of {name} is not a bool tensor")
        out[str(name)] = mask
    return out


def prune_state(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """``state`` with every masked weight replaced by ``W*M`` (``torch.where``: exact zeros,
    same dtype); a tied weight is pruned under every key it has, which keep sharing one tensor.

    Raises:
        CheckpointError: a mask names a key ``state`` lacks, or its shape differs.
    """
    unknown = sorted(set(masks) - set(state))
    if unknown:
        raise CheckpointError(f"masks name weights the checkpoint does not have: {unknown[:5]}")
    aliases, out = alias_groups(state), dict(state)
    for name, mask in masks.items():
        weight = state[name]
        if tuple(mask.shape) != tuple(weight.shape):
            raise CheckpointError(f"the mask of {name} is {tuple(mask.shape)}, the weight "
                                  f"{tuple(weight.shape)}")
        pruned = torch.where(mask.to(weight.device), weight,
                             torch.zeros((), dtype=weight.dtype, device=weight.device))
        for key in aliases[name]:
            out[key] = pruned
    return out
