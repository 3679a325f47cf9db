"""The cost rule: a GEMM runs on the 2:4 sparse kernel only where, on this device and for this
shape and dtype, the kernel was checked to compute the right numbers and to be faster than the
dense GEMM.

Each distinct ``(device, dtype, role, m, k, n)`` is measured once, at compile time
(:func:`.measure.measure`), on random data of that shape, through the calls the compiled step
makes (:mod:`.cusparselt`: cached plans where they serve, :mod:`.cusparselt_plans`): the sparse
kernel's result and the dense GEMM's result on the same 2:4-masked operand are both compared
with an fp64 product, and both are timed (CUDA events, warm-up, median; :mod:`.timing`). The
host time one sparse call takes to return is recorded too (``host_ms``). The rule judges a GEMM
by what it costs per optimizer step of ``micro_steps`` calls (gradient accumulation; the
``micro_steps`` option, 1 by default). It goes sparse when

* the sparse result is finite and its relative error (Frobenius norm) is at most
  :data:`ERROR_FACTOR` times the dense low-precision GEMM's own (floored at a quarter of the
  dtype's epsilon), and
* ``dense_ms / (sparse_ms + compress_ms / micro_steps) >= MIN_SPEEDUP`` for the forward and
  grad-input GEMMs, whose compressed operand (the masked weight or its transpose) is made once
  per optimizer step and shared by its micro-steps; ``dense_ms / (sparse_ms + compress_ms)``
  for the grad-weight GEMM, whose operand (a pruned output gradient) is compressed at every
  call. Under ``mode="reduce-overhead"`` the GEMMs are compared by their device times replayed
  from CUDA graphs (no host overhead), as they then run.

Otherwise it stays dense, with the reason in the dump: ``dense: cost rule (sparse 0.87x at
4096x4096x512 bf16)`` or ``dense: sparse kernel failed its self-check: <error>``. The shape is
written as the kernel sees it: ``m x k x n`` for a ``[m, k]`` compressed operand times a
``[k, n]`` dense one (forward: out x in x tokens; grad-input: in x out x tokens; grad-weight:
out x tokens x in).

Measurements are cached in memory and on disk, in ``cost_rule.json`` of nmcompile's cache
folder (``$NMCOMPILE_CACHE_DIR``, else ``$XDG_CACHE_HOME/nmcompile``, else
``~/.cache/nmcompile``), keyed by the device's name, the torch version and the cuSPARSELt
version; the file is validated when read (a malformed file or entry is ignored, with one
warning, and measured again). A measurement is taken again when the call path it timed
(``call_path``: ``plans`` or ``torch``) is not the one the device has now.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import cusparselt, cusparselt_plans
from .timing import graph_ms, timer

__all__ = [
    "ERROR_FACTOR",
    "MIN_SPEEDUP",
    "CostRule",
    "GemmShape",
    "Measurement",
    "Verdict",
    "call_path",
    "default_rule",
    "device_key",
    "graph_ms",
    "judge",
    "timer",
    "using",
]

log = logging.getLogger(__name__)

#: Smallest measured speed-up (dense time over sparse time) for which a GEMM goes sparse.
MIN_SPEEDUP = 1.05
#: The sparse kernel's error may be at most this many times the dense GEMM's own error.
ERROR_FACTOR = 4.0
FORMAT = 3
ROLES = ("forward", "grad_input", "grad_weight")
#: What runs a sparse call: cached plans (:mod:`.cusparselt_plans`) or ``torch._cslt_sparse_mm``
CALL_PATHS = ("plans", "torch")
_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_FIELDS = ("sparse_ms", "compress_ms", "dense_ms", "sparse_error", "dense_error", "alg0_ms",
           "sparse_graph_ms", "dense_graph_ms", "host_ms")
_OPTIONAL = ("alg0_ms", "sparse_graph_ms", "dense_graph_ms", "host_ms")


@dataclass(frozen=True)
class GemmShape:
    """One GEMM as the sparse kernel sees it: a compressed ``[m, k]`` operand times a dense
    ``[k, n]`` one, in ``dtype``, for ``role`` (forward, grad_input or grad_weight)."""

    role: str
    m: int
    k: int
    n: int
    dtype: torch.dtype

    def label(self) -> str:
        """``"4096x4096x512 bf16"``."""
        return f"{self.m}x{self.k}x{self.n} {_SHORT.get(self.dtype, str(self.dtype))}"

    def key(self) -> str:
        """Key of the on-disk cache entry."""
        return f"{str(self.dtype).removeprefix('torch.')}/{self.role}/{self.m}/{self.k}/{self.n}"


@dataclass(frozen=True)
class Measurement:
    """What :func:`.measure.measure` found for one shape: median milliseconds of the sparse GEMM
    (with an already compressed operand, with cuSPARSELt algorithm ``alg_id``), of compressing
    that operand and of the dense GEMM; relative errors of both against fp64; the time of
    algorithm 0 for the record. ``failure`` is the error the sparse path raised, if any.
    ``host_ms``: host milliseconds one sparse call takes to return; ``call_path``: what ran it
    (``plans``: cached plans, ``torch``: ``torch._cslt_sparse_mm``; ``None``: not recorded)."""

    sparse_ms: float | None = None
    compress_ms: float | None = None
    dense_ms: float | None = None
    sparse_error: float | None = None
    dense_error: float | None = None
    alg_id: int = 0
    alg0_ms: float | None = None
    sparse_graph_ms: float | None = None
    dense_graph_ms: float | None = None
    failure: str | None = None
    host_ms: float | None = None
    call_path: str | None = None


@dataclass(frozen=True)
class Verdict:
    """The cost rule's decision for one GEMM: ``sparse`` (with cuSPARSELt algorithm
    ``alg_id``), or the dump's reason why not."""

    sparse: bool
    speedup: float | None
    reason: str | None
    alg_id: int = 0


def device_key(device: torch.device) -> str:
    """Cache key of a device: its name, the torch version and the cuSPARSELt version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type} ({cusparselt.ENV_ON_CPU})"
    return f"{name} | torch {torch.__version__} | cusparselt {cusparselt.runtime_version()}"


def _cache_file() -> Path:
    if path := os.environ.get("NMCOMPILE_CACHE_DIR"):
        root = Path(path)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nmcompile"
    return root / "cost_rule.json"


def _valid(entry: object) -> bool:
    if not isinstance(entry, dict) or set(entry) != {*_FIELDS, "alg_id", "failure", "call_path"}:
        return False
    if entry["call_path"] not in (None, *CALL_PATHS):
        return False
    if entry["failure"] is not None:
        return isinstance(entry["failure"], str)
    if not isinstance(entry["alg_id"], int) or isinstance(entry["alg_id"], bool) or (
            entry["alg_id"] < 0):
        return False
    return all((entry[f] is None and f in _OPTIONAL)
               or (isinstance(entry[f], (int, float)) and not isinstance(entry[f], bool)
                   and (f.endswith("error") or entry[f] >= 0)) for f in _FIELDS)


class CostRule:
    """Decides, GEMM by GEMM, sparse kernel or dense; measures each shape once.

    Args:
        measure_fn: ``(device, shape) -> Measurement``; :func:`.measure.measure` by default
            (tests hand in a table).
        path: the JSON cache file; ``None`` keeps results in memory only. Default: the cache
            folder's ``cost_rule.json``.
        key_fn: ``device -> str`` cache key; :func:`device_key` by default.
    """

    def __init__(self, measure_fn: Callable[[torch.device, GemmShape], Measurement] | None = None,
                 path: str | os.PathLike | None | type(...) = ...,
                 key_fn: Callable[[torch.device], str] = device_key) -> None:
        self.measure_fn = measure_fn
        self.path = _cache_file() if path is ... else (Path(path) if path is not None else None)
        self.key_fn = key_fn
        self._memory: dict[str, dict[str, Measurement]] = {}
        self._loaded = False

    def decide(self, device: torch.device | str, shape: GemmShape, graphs: bool = False,
               micro_steps: int = 1) -> Verdict:
        """The verdict for ``shape`` on ``device`` (measured now if not cached); ``graphs``:
        the step runs from CUDA graphs, so the GEMMs are compared by device time;
        ``micro_steps``: calls per optimizer step (see :func:`judge`)."""
        device = torch.device(device)
        found = self.measurement(device, shape)
        return judge(shape, found, graphs, micro_steps)

    def measurement(self, device: torch.device, shape: GemmShape) -> Measurement:
        """The cached measurement of ``shape`` on ``device``, measuring it first if needed."""
        self._load()
        table = self._memory.setdefault(self.key_fn(device), {})
        known = table.get(shape.key())
        if known is None or known.call_path not in (None, call_path(device)):
            try:
                # real tensors, whatever tracing is going on (the pass runs under fake mode)
                with _disable_current_modes(), torch.no_grad():
                    found = (self.measure_fn or _measure)(device, shape)
            except Exception as error:  # noqa: BLE001  (any failure means: stay dense)
                found = Measurement(failure=f"{type(error).__name__}: {error}")
            table[shape.key()] = found
            log.info("nm cost rule: %s %s on %s: %s", shape.role, shape.label(), device, found)
            self._save()
        return table[shape.key()]

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"format is not {FORMAT}")
            devices = data["devices"]
            if not isinstance(devices, dict):
                raise ValueError("'devices' is not a mapping")
        except (OSError, ValueError, KeyError) as error:
            warnings.warn(f"nmcompile: ignoring the cost-rule cache {self.path} ({error}); "
                          "shapes are measured again", RuntimeWarning, stacklevel=2)
            return
        dropped = 0
        for key, entries in devices.items():
            if not isinstance(entries, dict):
                dropped += 1
                continue
            table = self._memory.setdefault(key, {})
            for name, entry in entries.items():
                if _valid(entry):
                    table[name] = Measurement(**entry)
                else:
                    dropped += 1
        if dropped:
            warnings.warn(f"nmcompile: {dropped} malformed entries of the cost-rule cache "
                          f"{self.path} were ignored; those shapes are measured again",
                          RuntimeWarning, stacklevel=2)

    def _save(self) -> None:
        if self.path is None:
            return
        data = {"format": FORMAT, "devices": {
            key: {name: asdict(m) for name, m in table.items()}
            for key, table in self._memory.items()}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as error:
            log.warning("nm cost rule: cannot write %s (%s)", self.path, error)


def judge(shape: GemmShape, found: Measurement, graphs: bool = False,
          micro_steps: int = 1) -> Verdict:
    """Apply the rule to one measurement (with ``graphs``, to the CUDA-graph times if known),
    for an optimizer step of ``micro_steps`` calls: a weight's compression (forward and
    grad-input GEMMs) is charged once per step, the grad-weight operand's at every call."""
    if found.failure is not None:
        return Verdict(False, None, f"dense: sparse kernel failed its self-check: {found.failure}")
    floor = torch.finfo(shape.dtype).eps / 4
    if not (math.isfinite(found.sparse_error)
            and found.sparse_error <= ERROR_FACTOR * max(found.dense_error, floor)):
        return Verdict(False, None, (
            f"dense: sparse kernel failed its self-check: relative error {found.sparse_error:.3g} "
            f"against {found.dense_error:.3g} for the dense GEMM at {shape.label()}"))
    sparse_ms, dense_ms = found.sparse_ms, found.dense_ms
    if graphs and found.sparse_graph_ms is not None and found.dense_graph_ms is not None:
        sparse_ms, dense_ms = found.sparse_graph_ms, found.dense_graph_ms
    compress_ms = found.compress_ms
    if shape.role != "grad_weight":
        compress_ms /= micro_steps
    cost = sparse_ms + compress_ms
    speedup = dense_ms / cost if cost > 0 else math.inf
    if speedup < MIN_SPEEDUP:
        return Verdict(False, speedup,
                       f"dense: cost rule (sparse {speedup:.2f}x at {shape.label()})")
    return Verdict(True, speedup, None, found.alg_id)


def call_path(device: torch.device) -> str:
    """What runs the sparse calls on ``device`` now: ``plans`` (:mod:`.cusparselt_plans`) or
    ``torch`` (``torch._cslt_sparse_mm``)."""
    return "plans" if cusparselt_plans.for_device(device) is not None else "torch"


def _measure(device: torch.device, shape: GemmShape) -> Measurement:
    from .measure import measure

    return measure(device, shape)


def __getattr__(name: str) -> Any:
    if name == "measure":  # the default measure_fn lives in .measure (it uses the rule)
        from .measure import measure

        return measure
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_DEFAULT: CostRule | None = None


def default_rule() -> CostRule:
    """The process's cost rule (measurements shared by every compile)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = CostRule()
    return _DEFAULT


@contextlib.contextmanager
def using(rule: CostRule) -> Iterator[CostRule]:
    """Make ``rule`` the process's cost rule inside the ``with`` block (tests, benchmarks)."""
    global _DEFAULT
    saved, _DEFAULT = _DEFAULT, rule
    try:
        yield rule
    finally:
        _DEFAULT = saved
