"""Timing on the device, for the cost rule (:mod:`.cost`) and the benchmarks.

Three views of one call: :func:`timer` (back-to-back calls between CUDA events: a call costs
the larger of its host and device time, as in an eager training step whose launches queue ahead
of the GPU), :func:`graph_ms` (replayed from a CUDA graph: device time only, as under
``mode="reduce-overhead"``) and :func:`host_ms` (the host time a call takes to return, the
GPU left running).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["graph_ms", "host_ms", "timer"]


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


def host_ms(fn: Callable[[], object], device: torch.device, calls: int = 20,
            rounds: int = 5) -> float:
    """Median host milliseconds per call of ``fn``: ``calls`` calls timed on the host clock
    without waiting for the GPU in between (few enough not to fill its launch queue), after a
    warm-up; the device is synchronised before each round."""
    fn()
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) * 1e3 / calls)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(times)
