"""Timing shared by the Python benchmarks."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, ContextManager, Optional

import torch


def time_us(fn: Callable[[], object], device: str, min_time: float, warmup: int = 2,
            min_samples: int = 3) -> float:
    """Microseconds per call of fn: the median of single calls on CPU (robust
    on a shared machine), the mean of a CUDA-event-timed loop on the GPU."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # One timed call sizes the loop so it runs about min_time seconds.
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        once_ms = max(start.elapsed_time(stop), 1e-3)
        repeats = int(min(max(min_time * 1e3 / once_ms, 5), 10000))
        start.record()
        for _ in range(repeats):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) * 1e3 / repeats
    samples = []
    began = time.perf_counter()
    while len(samples) < min_samples or (time.perf_counter() - began < min_time and len(samples) < 10000):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, min_time: float,
                     rounds: int = 3,
                     contexts: Optional[dict[str, Callable[[], ContextManager]]] = None) -> dict[str, float]:
    """Microseconds per call of each fn, measured in turn for `rounds` rounds
    and keeping each one's best round: a shared machine's speed drifts over
    seconds, and interleaving puts every contender through the same drift.
    ``contexts[name]()``, when given, is entered around that fn's timing (not
    around each call, where its own cost would be timed too)."""
    best = {name: float("inf") for name in fns}
    for round_ in range(rounds):
        for name, fn in fns.items():
            with (contexts or {}).get(name, contextlib.nullcontext)():
                us = time_us(fn, device, min_time / rounds, warmup=2 if round_ == 0 else 0, min_samples=1)
            best[name] = min(best[name], us)
    return best


# The calls one CUDA graph holds: a replay launches them all, so the host's
# cost of launching the graph is spread over this many calls (a replay of a
# few-microsecond kernel alone could take longer to launch than to run).
GRAPH_CALLS = 20


def cuda_graphed(fn: Callable[[], object], calls: int = GRAPH_CALLS) -> Callable[[], None]:
    """`calls` calls of fn captured one after another as one CUDA graph, to
    be timed by its replay: a replay launches their kernels with no host work
    between them, so its time divided by `calls` is one call's kernels,
    whatever fn costs on the host, plus a `calls`-th of the graph's launch.
    The calls all read fn's inputs and each drops its output, which is
    right for timing only. Warmed up on a side stream first, as capture
    wants."""
    if not isinstance(calls, int) or isinstance(calls, bool) or calls < 1:
        raise ValueError(f"calls: expected a positive int, got {calls!r}")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay
