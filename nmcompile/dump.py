"""Dumps of what the backend did: graphs before/after the rewrite and a per-matmul table.

Layout of a dump folder (``options={"dump_dir": DIR}`` or ``NMCOMPILE_DUMP_DIR``)::

    DIR/summary.json, DIR/summary.txt     every matmul of every graph this process compiled,
                                          and every other op that reads a weight the pass
                                          masks (or could have masked)
    DIR/phases.txt                        the schedule's phases as each graph entered them
    DIR/unread.json                       weights of a compiled module that no graph reads
                                          (they train dense; :mod:`nmcompile.coverage`), also
                                          in the summary as ``unread``
    DIR/graph_<k>/joint_before.py         joint forward+backward graph as AOTAutograd traced it
    DIR/graph_<k>/joint_after.py          ... after the N:M rewrite
    DIR/graph_<k>/forward.py, backward.py the partitioned graphs handed to the compiler
    DIR/graph_<k>/matmuls.json            this graph's rows of the table, with the config and
                                          what its symbolic sizes stand for (dynamic shapes)

The same texts are emitted as ``TORCH_TRACE`` structured artifacts (names ``nm_*``).
Graph folders from earlier processes are left alone and kept out of the summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate
from torch._logging import trace_structured

__all__ = ["GraphDump", "format_table", "read_summary", "write_unread"]

_COLUMNS = ("graph", "node", "role", "param", "shapes", "became", "sparse", "kernel", "compress",
            "reason")


def format_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """The per-matmul table (one row per record, as in ``summary.json``: each matmul, and each
    other op reading a weight that is masked, or 2-D and left dense, with role ``-``).

    ``sparse``: the GEMM computes with the N:M mask; ``kernel``: for those GEMMs, what runs
    them (``cuSPARSELt``, with the cost rule's measured speed-up under ``kernels="auto"``, or
    ``dense: <reason>`` for the masked-dense product); ``compress``: for the GEMMs that read a
    compressed weight, what writes it once per optimizer step (``Triton sparsify (sm90)``, or
    ``torch._cslt_compress (<why not the kernels>)``); ``reason``: why a GEMM is not masked.
    Symbolic sizes (dynamic shapes) show as their expressions: ``s0x64 @ 64x64``,
    ``(s0*s1)x64``.
    """
    body = [
        (
            r["graph_id"], r["node"], r["role"] or "-", r["param"] or "-",
            " @ ".join("x".join(map(_dim, s)) for s in r["shapes"]), r["became"],
            "yes" if r["sparse"] else "no", r.get("kernel") or "", r.get("compress") or "",
            r["reason"] or "",
        )
        for r in rows
    ]
    return tabulate(body, headers=_COLUMNS, tablefmt="github")


def _dim(size: int | str) -> str:
    """A dim of the shapes column: ``64``, ``s0``, or ``(s0*s1)`` for a symbolic expression."""
    text = str(size)
    return text if text.isalnum() else f"({text})"


def read_summary(dump_dir: str | os.PathLike) -> dict[str, Any]:
    """Load ``summary.json`` of a dump folder: ``config``, ``matmuls`` (the table's rows),
    ``symbols`` (dynamic shapes) and ``unread`` (``{param: reason}``: weights no graph read)."""
    return json.loads((Path(dump_dir) / "summary.json").read_text())


def write_unread(dump_dir: str | os.PathLike, found: Mapping[str, str],
                 config: Mapping[str, Any]) -> None:
    """Add ``{param: reason}`` of weights no graph read to the dump (``unread.json``, merged
    with this process's earlier entries) and refresh its summary."""
    root = Path(dump_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "unread.json"
    entries: dict[str, str] = {}
    if path.exists():
        part = json.loads(path.read_text())
        if part.get("pid") == os.getpid():
            entries = part["unread"]
    entries.update(found)
    path.write_text(json.dumps({"pid": os.getpid(), "unread": entries}, indent=1))
    _refresh_summary(root, config)


class GraphDump:
    """Writer for one compiled graph's folder inside a dump folder."""

    def __init__(self, root: Path, graph_id: int) -> None:
        self.root, self.graph_id = root, graph_id
        self.dir = root / f"graph_{graph_id:03d}"

    @classmethod
    def create(cls, root: str | os.PathLike) -> GraphDump:
        """Claim the next free ``graph_<k>`` folder under ``root`` (created if missing)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        k = len(list(root.glob("graph_*")))
        while True:
            try:
                (root / f"graph_{k:03d}").mkdir()
                return cls(root, k)
            except FileExistsError:
                k += 1

    def write(self, name: str, text: str) -> None:
        """Write ``graph_<k>/name`` and emit it as a TORCH_TRACE artifact."""
        (self.dir / name).write_text(text)
        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": f"nm_graph{self.graph_id}_{name}", "encoding": "string"},
            payload_fn=lambda: text,
        )

    def note_phase(self, step: int, phase: str) -> None:
        """Record a change of the schedule's phase: a line of ``DIR/phases.txt``."""
        line = f"graph {self.graph_id}: from optimizer step {step}: {phase}\n"
        with open(self.root / "phases.txt", "a") as out:
            out.write(line)
        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": f"nm_graph{self.graph_id}_phase", "encoding": "string"},
            payload_fn=lambda: line,
        )

    def write_records(self, records: Sequence[Any], config: Mapping[str, Any],
                      symbols: Mapping[str, str] | None = None) -> None:
        """Write this graph's matmul rows and refresh the folder's summary.

        ``symbols``: what each symbolic size in the rows' shapes stands for (a graph compiled
        with dynamic shapes), e.g. ``{"s0": "L['x'].size()[0]"}``.
        """
        rows = [dataclasses.asdict(r) for r in records]
        payload = {"pid": os.getpid(), "config": dict(config), "matmuls": rows,
                   "symbols": dict(symbols or {})}
        (self.dir / "matmuls.json").write_text(json.dumps(payload, indent=1))
        _refresh_summary(self.root, config)


def _refresh_summary(root: Path, config: Mapping[str, Any]) -> None:
    """Rewrite ``summary.json``/``summary.txt`` from this process's graph folders."""
    rows: list[dict[str, Any]] = []
    symbols: dict[str, dict[str, str]] = {}
    for path in sorted(root.glob("graph_*/matmuls.json")):
        part = json.loads(path.read_text())
        if part.get("pid") == os.getpid():
            rows.extend(part["matmuls"])
            if part.get("symbols") and part["matmuls"]:
                symbols[str(part["matmuls"][0]["graph_id"])] = part["symbols"]
    unread: dict[str, str] = {}
    if (root / "unread.json").exists():
        part = json.loads((root / "unread.json").read_text())
        if part.get("pid") == os.getpid():
            unread = part["unread"]
    summary = {"config": dict(config), "matmuls": rows, "symbols": symbols,
               "unread": unread}
    text = json.dumps(summary, indent=1)
    (root / "summary.json").write_text(text)
    legend = "".join(
        f"graph {graph}: " + ", ".join(f"{k} = {v}" for k, v in names.items()) + "\n"
        for graph, names in symbols.items())
    if legend:
        legend = "\nsymbolic sizes (dynamic shapes):\n" + legend
    if unread:
        legend += "\nweights no graph reads (they train dense):\n" + "".join(
            f"{name}: {reason}\n" for name, reason in unread.items())
    (root / "summary.txt").write_text(format_table(rows) + "\n" + legend)
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "nm_summary", "encoding": "json"},
        payload_fn=lambda: text,
    )
