"""Measuring one GEMM shape for the cost rule (:mod:`.cost`): the sparse kernel's result and time
against the dense GEMM's, on random data, through the calls the compiled step makes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import cusparselt
from .cost import GemmShape, Measurement, call_path, judge
from .timing import graph_ms, host_ms, timer

__all__ = ["measure"]

log = logging.getLogger(__name__)


def _relative_error(out: Tensor, ref: Tensor) -> float:
    diff = torch.linalg.vector_norm(out.double() - ref)
    return (diff / torch.linalg.vector_norm(ref).clamp_min(1e-300)).item()


class _Problem(NamedTuple):
    """Random operands of one shape and the calls that multiply them."""

    a: Tensor  # the 2:4 operand, dense
    packed: Tensor  # ... compressed
    ref: Tensor  # the fp64 product
    operand: Tensor  # the dense operand as the sparse call reads it (for the search)
    transposed: bool  # the product's result is transposed (forward, grad-input)
    sparse: Callable[[int], Tensor]  # alg_id -> the product, through the compiled step's call
    dense: Callable[[], Tensor]


def _problem(device: torch.device, shape: GemmShape) -> _Problem:
    from ..solvers import nm_mask

    m, k, n, dtype = shape.m, shape.k, shape.n, shape.dtype
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(m, k, generator=gen, device=device, dtype=torch.float32)
    a = (a * nm_mask(a, 2, 4)).to(dtype)
    packed = cusparselt.compress(a)
    if shape.role == "grad_weight":  # a @ b, b [k, n]
        b = torch.randn(k, n, generator=gen, device=device, dtype=torch.float32).to(dtype)
        return _Problem(a, packed, a.double() @ b.double(), cusparselt.dense_operand(b), False,
                        lambda alg: cusparselt.sparse_mm_packed(packed, b, alg),
                        lambda: torch.mm(a, b))
    # (a @ x^T)^T = x @ a^T, x [n, k] (tokens x reduction)
    x = torch.randn(n, k, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return _Problem(a, packed, x.double() @ a.double().t(), x.t(), True,
                    lambda alg: cusparselt.linear_forward(x, packed, None, m, alg),
                    lambda: torch.nn.functional.linear(x, a))


def measure(device: torch.device, shape: GemmShape) -> Measurement:
    """Check and time the sparse kernel of ``shape`` against the dense GEMM on ``device``.

    Random normal operands (never zeros), the compressed one 2:4 along ``k`` by magnitude;
    the same calls as the training graph (:mod:`.cusparselt`, through cached plans where they
    serve). Algorithm 0 is measured, then the one ``torch._cslt_sparse_mm_search`` picks for
    this shape: that one is kept if it passes the same fp64 check and is faster (on an H200
    with cuSPARSELt 0.8.0 the search picks an algorithm 1.2-1.6x faster than cuBLAS where
    algorithm 0 is slower; see BENCHMARKS.md).
    """
    p = _problem(device, shape)
    time_ms = timer(device)
    try:
        sparse_error = _relative_error(p.sparse(0), p.ref)
    except Exception as error:  # noqa: BLE001
        return Measurement(failure=f"{type(error).__name__}: {error}")
    dense_error = _relative_error(p.dense(), p.ref)
    alg0_ms = time_ms(lambda: p.sparse(0))
    best, best_ms, best_error = 0, alg0_ms, sparse_error
    searched = _searched(shape, p, time_ms, dense_error)
    if searched is not None and searched[1] < best_ms:
        best, best_ms, best_error = searched
    graphs = {}
    if device.type == "cuda":
        try:
            graphs = {"sparse_graph_ms": graph_ms(lambda: p.sparse(best)),
                      "dense_graph_ms": graph_ms(p.dense)}
        except Exception as error:  # noqa: BLE001  (no graph times: eager times are used)
            log.info("nm cost rule: no CUDA-graph timing for %s (%s)", shape.label(), error)
    return Measurement(
        sparse_ms=best_ms, compress_ms=time_ms(lambda: cusparselt.compress(p.a)),
        dense_ms=time_ms(p.dense), sparse_error=best_error, dense_error=dense_error,
        alg_id=best, alg0_ms=alg0_ms, **graphs,
        host_ms=host_ms(lambda: p.sparse(best), device), call_path=call_path(device))


def _searched(shape: GemmShape, p: _Problem, time_ms: Callable, dense_error: float,
              ) -> tuple[int, float, float] | None:
    """(alg, ms, error) of the algorithm ``torch._cslt_sparse_mm_search`` picks, if it is not
    0, passes the fp64 check and runs; else ``None``."""
    try:
        found = int(torch._cslt_sparse_mm_search(p.packed, p.operand, None, None, None,
                                                 p.transposed))
    except Exception:  # noqa: BLE001  (no search on this library: algorithm 0)
        return None
    if not found:
        return None
    try:
        error = _relative_error(p.sparse(found), p.ref)
        if not judge(shape, Measurement(0.0, 0.0, 1.0, error, dense_error)).sparse:
            return None
        return found, time_ms(lambda: p.sparse(found)), error
    except Exception:  # noqa: BLE001  (an algorithm that fails is not used)
        return None
