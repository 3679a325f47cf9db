"""The demo end to end: same data, init and steps for a dense and a 2:4 sparse recipe."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import NMConfig
from ..dump import format_table, read_summary
from ..extras import INSTALL_HINT, missing
from ..models import GPTConfig, TinyGPT
from .data import Corpus, load_corpus, sample_offsets, spaced_offsets
from .report import sparse_flop_share, write_outputs
from .train import Phase, Schedule, train_recipe

__all__ = [
    "DENSE_BACKEND",
    "SPARSE_OPTIONS",
    "DemoConfig",
    "DemoResult",
    "make_model",
    "make_schedule",
    "missing_extras_notes",
    "run_demo",
    "sparse_phases",
]

DENSE_BACKEND = "inductor"

#: The sparse recipe (Hu et al. 2024): 2:4 transposable mask for forward and grad-input,
#: MVUE 2:4 on the weight gradient, masked decay 1e-3, then a dense tail of half the steps
#: (``DemoConfig.tail_fraction``): the best by the mean over seeds 1-3 of
#: ``benchmarks/quality.py`` (BENCHMARKS.md, "The sparse recipe over seeds").
SPARSE_OPTIONS: dict[str, Any] = {
    "n": 2,
    "m": 4,
    "forward": "transposable",
    "grad_input": "transposable",
    "grad_weight": "mvue",
    "decay": 1e-3,
    "inductor": True,
}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and settings of one demo run (the CLI's flags)."""

    steps: int = 240
    batch_size: int = 16
    seq_len: int = 64
    d_model: int = 64
    layers: int = 2
    device: str = "cpu"
    seed: int = 0
    out: str = "demo_out"
    lr: float = 3e-3
    corpus_bytes: int = 4 << 20
    val_batches: int = 8
    evals: int = 10
    flip_every: int = 10
    tail_fraction: float = 0.5
    sparse_backend: str = "nm"
    sparse_options: dict[str, Any] = field(default_factory=lambda: dict(SPARSE_OPTIONS))
    progress: bool = True


@dataclass(frozen=True)
class DemoResult:
    """The report (also written as ``report.json``), the per-matmul table text, and the files
    written into the output folder (besides ``dump/``)."""

    report: dict[str, Any]
    matmul_table: str
    files: tuple[str, ...] = ()


def missing_extras_notes(progress: bool = True) -> list[str]:
    """Notes on the ``demo`` extra's modules that are not installed (empty if all are)."""
    absent = missing()
    notes = []
    if "matplotlib" in absent:
        notes.append("matplotlib is not installed: the plots (loss.png, flip_rate.png) are "
                     f"skipped; the results are written all the same ({INSTALL_HINT})")
    if "tqdm" in absent and progress:
        notes.append(f"tqdm is not installed: no progress bars ({INSTALL_HINT})")
    return notes


def sparse_phases(cfg: DemoConfig, options: dict[str, Any] | None) -> list[Phase]:
    """The sparse recipe: one compile; with nm, the dense tail is its ``sparse_stop`` (a
    continuous switch: the pruned weights are zeroed); another backend gets a dense phase."""
    tail = round(cfg.steps * cfg.tail_fraction)
    if not 0 < tail < cfg.steps:
        return [Phase(0, cfg.sparse_backend, options)]
    if cfg.sparse_backend == "nm":
        return [Phase(0, "nm", {**(options or {}), "sparse_stop": cfg.steps - tail},
                      tail_start=cfg.steps - tail)]
    return [Phase(0, cfg.sparse_backend, options), Phase(cfg.steps - tail, DENSE_BACKEND)]


def make_schedule(cfg: DemoConfig, corpus: Corpus) -> Schedule:
    """The batches, evaluation set and bookkeeping intervals of a run of ``cfg``."""
    return Schedule(
        train=corpus.train,
        val=corpus.val,
        seq_len=cfg.seq_len,
        lr=cfg.lr,
        offsets=sample_offsets(len(corpus.train), cfg.steps, cfg.batch_size, cfg.seq_len, cfg.seed),
        val_starts=spaced_offsets(
            len(corpus.val), cfg.val_batches * cfg.batch_size, cfg.seq_len
        ).view(cfg.val_batches, cfg.batch_size),
        eval_every=max(1, cfg.steps // cfg.evals),
        flip_every=cfg.flip_every,
        device=torch.device(cfg.device),
    )


def make_model(cfg: DemoConfig) -> TinyGPT:
    """The demo's model, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    gpt = GPTConfig(seq_len=cfg.seq_len, d_model=cfg.d_model, n_layer=cfg.layers)
    return TinyGPT(gpt).to(torch.device(cfg.device))


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Train both recipes, write the output folder, and return the report.

    Without the ``demo`` extra (matplotlib, tqdm) both recipes still train and the report,
    its table and JSON are written; the plots and progress bars are skipped, with a note in
    the report.
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    dump = out / "dump"
    shutil.rmtree(dump, ignore_errors=True)
    corpus = load_corpus(cfg.corpus_bytes)
    schedule = make_schedule(cfg, corpus)
    dense_model = make_model(cfg)
    gpt = dense_model.cfg
    sparse_model = copy.deepcopy(dense_model)

    notes: list[str] = missing_extras_notes(cfg.progress)
    options = None
    if cfg.sparse_backend == "nm":
        options = {**cfg.sparse_options, "dump_dir": str(dump)}
        NMConfig.from_options(options)  # a bad recipe fails here, before any training
    recipes = []
    for name, model, phases in (
        ("dense", dense_model, [Phase(0, DENSE_BACKEND)]),
        ("sparse 2:4", sparse_model, sparse_phases(cfg, options)),
    ):
        torch.manual_seed(cfg.seed)  # the same RNG stream (MVUE draws) for every run
        recipes.append(train_recipe(name, model, phases, schedule, progress=cfg.progress))

    summary = read_summary(dump) if (dump / "summary.json").exists() else {"matmuls": []}
    recipes[0]["sparse_flop_share"] = 0.0
    share = sparse_flop_share(summary)
    tail_start = recipes[1]["tail_start"]
    tail_frac = (cfg.steps - tail_start) / cfg.steps if tail_start is not None else 0.0
    recipes[1]["sparse_flop_share"] = share
    recipes[1]["sparse_flop_share_whole_run"] = share * (1 - tail_frac)
    report = {
        **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "sparse_options"},
        "model": dataclasses.asdict(gpt)
        | {"parameters": sum(p.numel() for p in dense_model.parameters())},
        "sparse_options": options if options is not None else {},
        "corpus": {
            "train_bytes": len(corpus.train),
            "val_bytes": len(corpus.val),
            "train_files": len(corpus.train_files),
            "val_files": len(corpus.val_files),
        },
        "recipes": recipes,
        "notes": notes,
        "torch": torch.__version__,
        "total_wall_s": round(time.perf_counter() - t0, 1),
    }
    table = format_table(summary["matmuls"]) if summary["matmuls"] else ""
    files = write_outputs(out, report, table)
    return DemoResult(report, table, tuple(files))
