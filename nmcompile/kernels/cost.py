"""The cost rule: a GEMM runs on the 2:4 sparse kernel only where, on this device and for this
shape and dtype, the kernel was checked to compute the right numbers and to be faster than the
dense GEMM.

Each distinct ``(device, dtype, role, m, k, n)`` is measured once, at compile time
(:func:`measure`), on random data of that shape: the sparse kernel's result and the dense GEMM's
result on the same 2:4-masked operand are both compared with an fp64 product, and both are timed
(CUDA events, warm-up, median). The GEMM goes sparse when

* the sparse result is finite and its relative error (Frobenius norm) is at most
  :data:`ERROR_FACTOR` times the dense low-precision GEMM's own (floored at a quarter of the
  dtype's epsilon), and
* ``dense_ms / (sparse_ms + compress_ms) >= MIN_SPEEDUP``: the compression of the sparse
  operand is charged in full to every call, which is exact for the grad-weight GEMM (a pruned
  output gradient is compressed at every micro-step) and conservative for the weights (compressed
  once per optimizer step and shared by its micro-steps). Under ``mode="reduce-overhead"`` the
  GEMMs are compared by their device times replayed from CUDA graphs (no host overhead), as
  they then run.

Otherwise it stays dense, with the reason in the dump: ``dense: cost rule (sparse 0.87x at
4096x4096x512 bf16)`` or ``dense: sparse kernel failed its self-check: <error>``. The shape is
written as the kernel sees it: ``m x k x n`` for a ``[m, k]`` compressed operand times a
``[k, n]`` dense one (forward: out x in x tokens; grad-input: in x out x tokens; grad-weight:
out x tokens x in).

Measurements are cached in memory and on disk, in ``cost_rule.json`` of nmcompile's cache
folder (``$NMCOMPILE_CACHE_DIR``, else ``$XDG_CACHE_HOME/nmcompile``, else
``~/.cache/nmcompile``), keyed by the device's name, the torch version and the cuSPARSELt
version; the file is validated when read (a malformed file or entry is ignored, with one
warning, and measured again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

from . import cusparselt

__all__ = [
    "ERROR_FACTOR",
    "MIN_SPEEDUP",
    "CostRule",
    "GemmShape",
    "Measurement",
    "Verdict",
    "default_rule",
    "device_key",
    "graph_ms",
    "judge",
    "measure",
    "timer",
    "using",
]

log = logging.getLogger(__name__)

#: Smallest measured speed-up (dense time over sparse time) for which a GEMM goes sparse.
MIN_SPEEDUP = 1.05
#: The sparse kernel's error may be at most this many times the dense GEMM's own error.
ERROR_FACTOR = 4.0
FORMAT = 2
ROLES = ("forward", "grad_input", "grad_weight")
_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_FIELDS = ("sparse_ms", "compress_ms", "dense_ms", "sparse_error", "dense_error", "alg0_ms",
           "sparse_graph_ms", "dense_graph_ms")
_OPTIONAL = ("alg0_ms", "sparse_graph_ms", "dense_graph_ms")


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
    """What :func:`measure` found for one shape: median milliseconds of the sparse GEMM (with an
    already compressed operand, with cuSPARSELt algorithm ``alg_id``), of compressing that
    operand and of the dense GEMM; relative errors of both against fp64; the time of algorithm 0
    for the record. ``failure`` is the error the sparse path raised, if any."""

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
    if not isinstance(entry, dict) or set(entry) != {*_FIELDS, "alg_id", "failure"}:
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
        measure_fn: ``(device, shape) -> Measurement``; :func:`measure` by default (tests hand
            in a table).
        path: the JSON cache file; ``None`` keeps results in memory only. Default: the cache
            folder's ``cost_rule.json``.
        key_fn: ``device -> str`` cache key; :func:`device_key` by default.
    """

    def __init__(self, measure_fn: Callable[[torch.device, GemmShape], Measurement] | None = None,
                 path: str | os.PathLike | None | type(...) = ...,
                 key_fn: Callable[[torch.device], str] = device_key) -> None:
        self.measure_fn = measure_fn or measure
        self.path = _cache_file() if path is ... else (Path(path) if path is not None else None)
        self.key_fn = key_fn
        self._memory: dict[str, dict[str, Measurement]] = {}
        self._loaded = False

    def decide(self, device: torch.device | str, shape: GemmShape,
               graphs: bool = False) -> Verdict:
        """The verdict for ``shape`` on ``device`` (measured now if not cached); ``graphs``:
        the step runs from CUDA graphs, so the GEMMs are compared by device time."""
        device = torch.device(device)
        found = self.measurement(device, shape)
        return judge(shape, found, graphs)

    def measurement(self, device: torch.device, shape: GemmShape) -> Measurement:
        """The cached measurement of ``shape`` on ``device``, measuring it first if needed."""
        self._load()
        table = self._memory.setdefault(self.key_fn(device), {})
        if shape.key() not in table:
            try:
                # real tensors, whatever tracing is going on (the pass runs under fake mode)
                with _disable_current_modes(), torch.no_grad():
                    found = self.measure_fn(device, shape)
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


def judge(shape: GemmShape, found: Measurement, graphs: bool = False) -> Verdict:
    """Apply the rule to one measurement (with ``graphs``, to the CUDA-graph times if known)."""
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
    cost = sparse_ms + found.compress_ms
    speedup = dense_ms / cost if cost > 0 else math.inf
    if speedup < MIN_SPEEDUP:
        return Verdict(False, speedup,
                       f"dense: cost rule (sparse {speedup:.2f}x at {shape.label()})")
    return Verdict(True, speedup, None, found.alg_id)


# -- measuring on the device -----------------------------------------------------------------

def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds per call of ``fn``: rounds of back-to-back calls between two CUDA
    events after a warm-up, so a call costs the larger of its host and device time, as in a
    training step whose launches queue ahead of the GPU."""

    def cuda_ms(fn: Callable[[], object], warmup: int = 3, rounds: int = 7,
                inner: int = 5) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(rounds):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        return statistics.median(times)

    def host_ms(fn: Callable[[], object], warmup: int = 1, rounds: int = 3) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cuda_ms if device.type == "cuda" else host_ms


def graph_ms(fn: Callable[[], object], replays: int = 20) -> float:
    """Median milliseconds per call of ``fn`` replayed from a CUDA graph (device time only)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return statistics.median(times)


def _relative_error(out: Tensor, ref: Tensor) -> float:
    diff = torch.linalg.vector_norm(out.double() - ref)
    return (diff / torch.linalg.vector_norm(ref).clamp_min(1e-300)).item()


def measure(device: torch.device, shape: GemmShape) -> Measurement:
    """Check and time the sparse kernel of ``shape`` against the dense GEMM on ``device``.

    Random normal operands (never zeros), the compressed one 2:4 along ``k`` by magnitude;
    the same call forms as the training graph (:mod:`.cusparselt`). Algorithm 0 is measured,
    then the one ``torch._cslt_sparse_mm_search`` picks for this shape: that one is kept if it
    passes the same fp64 check and is faster (on an H200 with cuSPARSELt 0.8.0 the search picks
    an algorithm 1.2-1.6x faster than cuBLAS where algorithm 0 is slower; see BENCHMARKS.md).
    """
    from ..solvers import nm_mask

    m, k, n, dtype = shape.m, shape.k, shape.n, shape.dtype
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(m, k, generator=gen, device=device, dtype=torch.float32)
    a = (a * nm_mask(a, 2, 4)).to(dtype)
    packed = cusparselt.compress(a)
    if shape.role == "grad_weight":  # a @ b, b [k, n]
        b = torch.randn(k, n, generator=gen, device=device, dtype=torch.float32).to(dtype)
        ref = a.double() @ b.double()
        operand, transposed = cusparselt.dense_operand(b), False

        def sparse(alg: int) -> Tensor:
            return cusparselt.sparse_mm_packed(packed, b, alg)

        def dense() -> Tensor:
            return torch.mm(a, b)
    else:  # (a @ x^T)^T = x @ a^T, x [n, k] (tokens x reduction)
        x = torch.randn(n, k, generator=gen, device=device, dtype=torch.float32).to(dtype)
        ref = x.double() @ a.double().t()
        operand, transposed = x.t(), True

        def sparse(alg: int) -> Tensor:
            return cusparselt.linear_forward(x, packed, None, m, alg)

        def dense() -> Tensor:
            return torch.nn.functional.linear(x, a)

    time_ms = timer(device)
    try:
        sparse_error = _relative_error(sparse(0), ref)
    except Exception as error:  # noqa: BLE001
        return Measurement(failure=f"{type(error).__name__}: {error}")
    dense_error = _relative_error(dense(), ref)
    alg0_ms = time_ms(lambda: sparse(0))
    best, best_ms, best_error = 0, alg0_ms, sparse_error
    try:
        found = int(torch._cslt_sparse_mm_search(packed, operand, None, None, None, transposed))
    except Exception:  # noqa: BLE001  (no search on this library: algorithm 0)
        found = 0
    if found:
        try:
            error = _relative_error(sparse(found), ref)
            candidate = judge(shape, Measurement(0.0, 0.0, 1.0, error, dense_error))
            found_ms = time_ms(lambda: sparse(found)) if candidate.sparse else math.inf
        except Exception:  # noqa: BLE001  (an algorithm that fails is not used)
            found_ms = math.inf
        if found_ms < best_ms:
            best, best_ms, best_error = found, found_ms, error
    graphs = {}
    if device.type == "cuda":
        try:
            graphs = {"sparse_graph_ms": graph_ms(lambda: sparse(best)),
                      "dense_graph_ms": graph_ms(dense)}
        except Exception as error:  # noqa: BLE001  (no graph times: eager times are used)
            log.info("nm cost rule: no CUDA-graph timing for %s (%s)", shape.label(), error)
    return Measurement(
        sparse_ms=best_ms,
        compress_ms=time_ms(lambda: cusparselt.compress(a)),
        dense_ms=time_ms(dense),
        sparse_error=best_error,
        dense_error=dense_error,
        alg_id=best,
        alg0_ms=alg0_ms,
        **graphs,
    )


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
