"""Timing one operation: warm-up runs excluded, then repetitions until a time budget is spent
(within a minimum and a maximum count); every figure is a percentile of the repetitions."""

import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Budget:
    warmup: int = 1          # runs before timing (allocations, kernel choice, caches)
    seconds: float = 4.0     # timed runs stop once this much time is spent ...
    min_reps: int = 3        # ... but never before this many
    max_reps: int = 50


def stats(seconds: list[float], batch: int = 1) -> dict:
    """Latency percentiles in ms and throughput (items per second at the median latency)."""
    ms = np.asarray(seconds) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {"reps": len(ms), "p50_ms": p50, "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "throughput": batch * 1e3 / p50}


def measure(fn, budget: Budget, batch: int = 1) -> dict:
    for _ in range(budget.warmup):
        fn()
    times, started = [], time.perf_counter()
    while len(times) < budget.max_reps and (len(times) < budget.min_reps
                                            or time.perf_counter() - started < budget.seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return stats(times, batch)


def measure_interleaved(fns: dict, budget: Budget, batch: int = 1) -> dict:
    """Like measure() for several functions, one repetition of each in turn, so that a change in
    the machine's load hits all of them alike (used where the difference is small)."""
    for fn in fns.values():
        for _ in range(budget.warmup):
            fn()
    times = {name: [] for name in fns}
    started = time.perf_counter()
    reps = 0
    while reps < budget.max_reps and (reps < budget.min_reps
                                      or time.perf_counter() - started < budget.seconds * len(fns)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        reps += 1
    return {name: stats(t, batch) for name, t in times.items()}
