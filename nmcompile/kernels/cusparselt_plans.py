"""The cached-plan path: ``torch._cslt_sparse_mm``'s product without its per-call host cost.

torch's ``_cslt_sparse_mm`` builds cuSPARSELt's descriptors, algorithm selection and plan anew at
every call and destroys them after it (every torch release through 2.14.1: :mod:`.cusparselt`),
about 0.4 ms of host time per GEMM on an H200. Here the same library (:mod:`.cusparselt_lib`,
the copy torch loaded) runs from plans built once per :class:`~.plan_cache.PlanKey` and kept
per thread (:mod:`.plan_cache`):

* **Per call**: the data pointers, the bias pointer (set on the cached matmul descriptor), a
  workspace from torch's caching allocator and torch's current stream. No host sync and nothing
  CUDA-graph capture forbids, so a captured graph replays the call.
* **Self-check**: the first use of a key in the process multiplies random operands of that key
  (a 2:4 matrix compressed by ``torch._cslt_compress``, a dense one in the key's layout, a bias
  if it has one) both here and through ``torch._cslt_sparse_mm`` with the same algorithm. Both
  run the same library, so they must agree to the dtype's epsilon. An error or a mismatch sends
  that key to ``torch._cslt_sparse_mm`` for the rest of the process, with the reason logged,
  listed by :func:`failures` and warned about once per process (``RuntimeWarning``). A first use
  under CUDA-graph capture, where the check cannot run (it reads a result on the host), goes
  through torch for that call and is checked at the next call outside capture. Verdicts hold
  for one device of the process, hence one GPU and one library version.
* **Where**: CUDA tensors whenever the library loads, unless ``NMCOMPILE_CSLT_PLANS=0``; CPU
  tensors only inside :func:`using`, with a fake library (``tests/cslt_library_fake.py``). Without
  a GPU the real library is never loaded.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

from . import cusparselt_lib as lt
from .plan_cache import MAX_PLANS, PlanCache, PlanKey, key_of, operand_pointers

__all__ = ["ENV_PLANS", "PROFILER_NAME", "CachedPlans", "PlanKey", "failures", "for_device",
           "status", "using"]

log = logging.getLogger(__name__)
#: ``0`` turns the cached-plan path off: every sparse GEMM goes through ``torch._cslt_sparse_mm``
ENV_PLANS = "NMCOMPILE_CSLT_PLANS"
_OK = "ok"
#: the name of a cached-plan call in ``torch.profiler`` traces
PROFILER_NAME = "nm::cslt_matmul"
_profiling = torch.autograd._profiler_enabled


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _cuda_stream(device: torch.device) -> int:
    """torch's current stream on ``device`` (a ``cudaStream_t`` as an int)."""
    if _RAW_STREAM is not None:
        return _RAW_STREAM(device.index)
    return torch.cuda.current_stream(device).cuda_stream


class CachedPlans:
    """The cached-plan path of one device: the library, the keys' verdicts, one
    :class:`~.plan_cache.PlanCache` per thread.

    Args:
        lib: the library (:func:`.cusparselt_lib.load`, or a fake in tests).
        device: the device whose tensors it multiplies.
        version: the library's version (for messages).
        stream: ``device -> raw stream`` the calls are enqueued on (torch's current stream).
        capturing: ``() -> bool``, whether the current stream is capturing a CUDA graph.
        max_plans: plans per thread before the least recently used is evicted.
    """

    def __init__(self, lib: Any, device: torch.device, version: str, *,
                 stream: Callable[[torch.device], int] = _cuda_stream,
                 capturing: Callable[[], bool] = torch.cuda.is_current_stream_capturing,
                 max_plans: int = MAX_PLANS) -> None:
        self.lib, self.device, self.version = lib, device, version
        self._stream, self._capturing, self.max_plans = stream, capturing, max_plans
        self._cuda = device.type == "cuda"
        self._local = threading.local()
        self._lock = threading.RLock()
        self._verdicts: dict[PlanKey, str] = {}
        #: every thread's cache (statistics, tests)
        self.caches: list[PlanCache] = []

    def cache(self) -> PlanCache:
        """This thread's plan cache (created, with its handle, at its first use)."""
        found = getattr(self._local, "cache", None)
        if found is None:
            with self._guard():
                found = self._local.cache = PlanCache(self.lib, self.max_plans)
            with self._lock:
                self.caches.append(found)
        return found

    def _guard(self) -> contextlib.AbstractContextManager:
        if self._cuda and torch.cuda.current_device() != self.device.index:
            return torch.cuda.device(self.device.index)
        return contextlib.nullcontext()

    def matmul(self, a: Tensor, b: Tensor, bias: Tensor | None, transpose_result: bool,
               alg_id: int) -> Tensor | None:
        """``torch._cslt_sparse_mm(a, b, bias, transpose_result=..., alg_id=...)`` from a cached
        plan, or ``None`` where that key goes through torch (it failed its self-check, or it is
        first met under CUDA-graph capture). ``b`` must be contiguous or the transpose of a
        contiguous matrix; ``a`` a blob of ``torch._cslt_compress``."""
        key = key_of(a, b, bias, transpose_result, alg_id)
        verdict = self._verdicts.get(key)
        if verdict is None:
            if self._capturing():
                return None
            verdict = _OK if self.check(key) is None else "failed"
        if verdict != _OK:
            return None
        try:
            if _profiling():  # the profiler's name for these calls (torch's: aten::_cslt_*)
                with torch.profiler.record_function(PROFILER_NAME):
                    return self._run(key, a, b, bias)
            return self._run(key, a, b, bias)
        except lt.CusparseltError as error:  # a checked key failing later: torch from now on
            self._fail(key, str(error))
            return None

    def _run(self, key: PlanKey, a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
        ptrs = operand_pointers(key, a, b, bias)
        cache = self.cache()
        plan = cache.plan(key, ptrs[2])
        if a.numel() * a.element_size() < plan.compressed_bytes:
            raise ValueError(f"cuSPARSELt plans: a compressed operand of {tuple(a.shape)} "
                             f"{a.dtype} holds fewer than the {plan.compressed_bytes} bytes of a "
                             f"[{key.m}, {key.k}] one")
        shape = (key.n, key.m) if key.transpose_result else (key.m, key.n)
        out = torch.empty(shape, dtype=a.dtype, device=a.device)
        workspace = (torch.empty(plan.workspace, dtype=torch.uint8, device=a.device)
                     if plan.workspace else None)
        args = (plan, *ptrs, out.data_ptr(), None if workspace is None else workspace.data_ptr(),
                self._stream(self.device))
        if self._cuda and torch.cuda.current_device() != self.device.index:
            with torch.cuda.device(self.device.index):
                cache.run(*args)
        else:
            cache.run(*args)
        return out

    def check(self, key: PlanKey) -> str | None:
        """Why ``key`` goes through ``torch._cslt_sparse_mm`` (``None``: its cached plan
        serves it), running its self-check at the first call."""
        with self._lock:
            verdict = self._verdicts.get(key)
            if verdict is None:
                reason = self._self_check(key)
                verdict = self._verdicts[key] = _OK if reason is None else reason
                if reason is not None:
                    _report(self, key, reason)
        return None if verdict == _OK else verdict

    def _self_check(self, key: PlanKey) -> str | None:
        """Why the cached plan of ``key`` cannot stand in for ``torch._cslt_sparse_mm`` on random
        operands (``None``: it can). Two calls with fresh operands (and biases), so a plan that
        kept a pointer of its first call is caught."""
        from ..solvers import nm_mask

        m, k, n, dtype = key.m, key.k, key.n, key.dtype
        try:
            with _disable_current_modes(), torch.no_grad():
                gen = torch.Generator(self.device).manual_seed(m * 131 + k * 17 + n)

                def rand(*shape: int) -> Tensor:
                    return torch.randn(*shape, generator=gen, device=self.device)

                a = rand(m, k)
                packed = torch._cslt_compress((a * nm_mask(a, 2, 4)).to(dtype))
                worst = 0.0
                for _ in range(2):
                    b = rand(n, k).to(dtype).t() if key.b_transposed else rand(k, n).to(dtype)
                    bias = rand(m).to(dtype) if key.bias else None
                    ref = torch._cslt_sparse_mm(packed, b, bias, alg_id=key.alg_id,
                                                transpose_result=key.transpose_result).double()
                    diff = torch.linalg.vector_norm(self._run(key, packed, b, bias).double() - ref)
                    error = (diff / torch.linalg.vector_norm(ref).clamp_min(1e-300)).item()
                    worst = error if not math.isfinite(error) else max(worst, error)
        except Exception as failure:  # noqa: BLE001  (any failure: torch's path for this key)
            return f"{type(failure).__name__}: {failure}"
        if not (math.isfinite(worst) and worst <= torch.finfo(dtype).eps):
            return (f"its result differs from torch._cslt_sparse_mm's (relative error "
                    f"{worst:.3g})")
        return None

    def _fail(self, key: PlanKey, reason: str) -> None:
        with self._lock:
            self._verdicts[key] = reason
        _report(self, key, reason)

    def failures(self) -> dict[PlanKey, str]:
        """Key -> why it goes through ``torch._cslt_sparse_mm`` (the keys that failed)."""
        return {key: v for key, v in self._verdicts.items() if v != _OK}

    def stats(self) -> dict[str, int]:
        """Plans held, lookups that found one (hits), built one (misses), evictions: summed
        over threads."""
        caches = list(self.caches)
        return {"plans": sum(len(c.plans) for c in caches),
                "hits": sum(c.hits for c in caches), "misses": sum(c.misses for c in caches),
                "evictions": sum(c.evictions for c in caches)}


_PATHS: dict[torch.device, CachedPlans | str] = {}
_TEST_PLANS: list[CachedPlans] = []
_WARNED: list[bool] = []


def _report(plans: CachedPlans, key: PlanKey, reason: str) -> None:
    log.warning("nm cuSPARSELt plans on %s (cuSPARSELt %s): %s goes through "
                "torch._cslt_sparse_mm: %s", plans.device, plans.version, key.label(), reason)
    if not _WARNED:
        _WARNED.append(True)
        warnings.warn(
            f"nmcompile: a cached cuSPARSELt plan failed its self-check on {plans.device} "
            f"(cuSPARSELt {plans.version}) at {key.label()}: {reason}. That GEMM runs through "
            "torch._cslt_sparse_mm (descriptors and plan rebuilt at every call, slower on the "
            "host); further failures are logged (logger nmcompile.kernels.cusparselt_plans), "
            "not warned.", RuntimeWarning, stacklevel=3)


def _open(device: torch.device) -> CachedPlans | str:
    if os.environ.get(ENV_PLANS) == "0":
        return f"turned off by {ENV_PLANS}=0"
    try:
        lib, path = lt.load()
        found = CachedPlans(lib, device, lt.version(lib))
    except (OSError, lt.CusparseltError) as error:
        log.info("nm cuSPARSELt plans: not available on %s: %s", device, error)
        return f"the cuSPARSELt library cannot be called directly: {error}"
    log.info("nm cuSPARSELt plans on %s: %s (cuSPARSELt %s)", device, path, found.version)
    return found


def _normal(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def for_device(device: torch.device | str) -> CachedPlans | None:
    """The cached-plan path of ``device`` (opened at the first call), or ``None``: on CPU
    outside :func:`using`, or where the library cannot be called (:func:`status` says why)."""
    if not isinstance(device, torch.device) or device.index is None:
        device = _normal(device)  # tensors' devices are normal already
    if device.type != "cuda":
        return _TEST_PLANS[-1] if _TEST_PLANS and device.type == "cpu" else None
    found = _PATHS.get(device)
    if found is None:
        found = _PATHS[device] = _open(device)
    return found if isinstance(found, CachedPlans) else None


def status(device: torch.device | str) -> str | None:
    """Why GEMMs on ``device`` go through ``torch._cslt_sparse_mm`` instead of cached plans
    (``None``: cached plans serve them)."""
    device = _normal(device)
    if for_device(device) is not None:
        return None
    if device.type != "cuda":
        return f"no cached plans on {device.type}"
    return _PATHS[device]


def failures() -> dict[str, dict[str, str]]:
    """Device -> key label -> reason, for every key that failed its self-check so far."""
    paths = [p for p in (*_PATHS.values(), *_TEST_PLANS) if isinstance(p, CachedPlans)]
    return {str(p.device): {k.label(): r for k, r in p.failures().items()}
            for p in paths if p.failures()}


@contextlib.contextmanager
def using(lib: Any, *, capturing: Callable[[], bool] = lambda: False,
          max_plans: int = MAX_PLANS, version: str = "fake") -> Iterator[CachedPlans]:
    """Serve CPU tensors from cached plans on ``lib`` inside the block (tests: a fake library
    and ``torch._cslt_*`` replaced by a model). ``capturing`` stands for CUDA-graph capture."""
    plans = CachedPlans(lib, torch.device("cpu"), version, stream=lambda device: 0,
                        capturing=capturing, max_plans=max_plans)
    _TEST_PLANS.append(plans)
    saved = list(_WARNED)
    _WARNED.clear()
    try:
        yield plans
    finally:
        _TEST_PLANS.remove(plans)
        _WARNED[:] = saved
