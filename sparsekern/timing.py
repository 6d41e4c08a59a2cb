"""Wall-clock timing done one way everywhere (the auto policy and the benchmark harness):
candidates run interleaved in one process, warm-up first, median of the repeats."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _synchronize():
    """GPU work is asynchronous: without a sync, a CUDA call's time is its launch time only."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_medians(fns: dict[str, Callable[[], object]], warmup: int = 3,
                        repeats: int = 15) -> dict[str, float]:
    """Median seconds per call of each fn; one call of each per round so drift hits all alike."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _synchronize()
            start = time.perf_counter()
            fn()
            _synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}
