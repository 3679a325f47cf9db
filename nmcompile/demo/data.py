"""The demo's corpus: the Python standard library's own sources, read as bytes.

Every machine that runs the demo has them, so no download is needed. Files are the ``*.py``
files under ``sysconfig.get_paths()["stdlib"]`` (third-party ``site-packages`` excluded),
taken in sorted order of their relative paths until a byte cap is reached. A file goes to the
validation split when the SHA-256 of its relative path falls in the first ``val_fraction`` of
the hash range, so the split is by whole files, disjoint, and stable across runs.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Corpus", "load_corpus", "sample_offsets", "spaced_offsets", "stdlib_files", "windows"]

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    """Byte tensors (uint8) of the two splits and the relative paths that went into each."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]


def stdlib_files(root: str | Path | None = None) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every ``*.py`` under ``root``, sorted by the former."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.isdisjoint(rel.parts[:-1]) and path.is_file():
            found.append((rel.as_posix(), path))
    return sorted(found)


def is_validation(rel_path: str, val_fraction: float) -> bool:
    """Whether a file belongs to the validation split (by the hash of its relative path)."""
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


def load_corpus(
    max_bytes: int, val_fraction: float = 0.1, root: str | Path | None = None
) -> Corpus:
    """Read stdlib sources in sorted order until ``max_bytes`` and split them by file."""
    if max_bytes <= 0 or not 0 < val_fraction < 1:
        raise ValueError(
            f"need max_bytes > 0 and 0 < val_fraction < 1, got {max_bytes}, {val_fraction}"
        )
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    names: dict[bool, list[str]] = {False: [], True: []}
    total = 0
    for rel, path in stdlib_files(root):
        if total >= max_bytes:
            break
        try:
            data = path.read_bytes()[: max_bytes - total]
        except OSError:
            continue  # unreadable files are skipped the same way on every run
        split = is_validation(rel, val_fraction)
        parts[split].append(data)
        names[split].append(rel)
        total += len(data)
    if not parts[False] or not parts[True]:
        raise ValueError(f"{max_bytes} bytes of stdlib sources leave a split empty; raise the cap")
    return Corpus(
        _as_tensor(parts[False]), _as_tensor(parts[True]), tuple(names[False]), tuple(names[True])
    )


def _as_tensor(chunks: list[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).clone()


def sample_offsets(n_tokens: int, steps: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """``[steps, batch]`` random window starts, from a generator seeded with ``seed``."""
    if n_tokens <= seq_len + 1:
        raise ValueError(f"{n_tokens} bytes are too few for windows of {seq_len + 1}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len - 1, (steps, batch), generator=gen)


def spaced_offsets(n_tokens: int, n_windows: int, seq_len: int) -> torch.Tensor:
    """``n_windows`` window starts spread evenly over the data (a fixed evaluation set)."""
    if n_tokens <= seq_len + 1:
        raise ValueError(f"{n_tokens} bytes are too few for windows of {seq_len + 1}")
    return torch.linspace(0, n_tokens - seq_len - 1, n_windows).long()


def windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, ...]:
    """Inputs and next-byte targets ``[len(starts), seq_len]`` (int64) at the given starts."""
    idx = starts.reshape(-1, 1) + torch.arange(seq_len + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]
