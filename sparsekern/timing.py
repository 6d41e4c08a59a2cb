"""Wall-clock timing done one way everywhere (sparsify's auto policy, lth's step times, the
benchmark harness): the candidates run interleaved in one process, warm-up first, one call of
each per round, so drift and a busy neighbour hit all of them alike; each one's time is the
median of its rounds.

How many rounds: until the figure a decision is made from is stable. That figure is every
candidate's ratio to the first one, the baseline (running median of the baseline's rounds /
running median of the candidate's; the baseline's own running median when it runs alone).
After at least `min_rounds` rounds, measuring stops as soon as each ratio stayed within
`tolerance` (3%: max / min - 1) over the last `window` + 1 rounds; at `max_rounds` it stops
anyway and says the ratio was not stable.

How busy the machine was: the 1-minute load average at the end, and the share of the time this
process's threads were runnable but waiting for a CPU (Linux schedstat) while they were measured.
More than BUSY_WAIT_FRACTION of waiting means other work had the cores: `busy`. Where the wait
cannot be read, busy means a load average above the number of CPUs.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

BUSY_WAIT_FRACTION = 0.10
TOLERANCE, WINDOW, MIN_ROUNDS = 0.03, 3, 5


@dataclass(frozen=True)
class Measurement:
    seconds: dict[str, float]   # median seconds per call of each candidate
    rounds: int                 # timed rounds, after the warm-up
    stable: bool                # every ratio settled before max_rounds
    load_average: float | None  # 1-minute load average at the end; None where the OS has none
    cpu_wait: float | None      # share of our threads' runnable time spent waiting for a CPU
    busy: bool | None           # other work had the cores during the measurement

    def record(self) -> dict:
        """How the figures were taken, for a decision or a report to keep beside them."""
        return {"rounds": self.rounds, "stable": self.stable, "load_average": self.load_average,
                "cpu_wait": self.cpu_wait, "busy": self.busy}


def _synchronize():
    """GPU work is asynchronous: without a sync, a CUDA call's time is its launch time only."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def thread_schedstat() -> dict[str, tuple[int, int]] | None:
    """{thread id: (ns on a CPU, ns runnable but waiting for one)} of this process's threads,
    or None where the platform does not tell (no /proc schedstat)."""
    out = {}
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            on_cpu, waiting, _ = (task / "schedstat").read_text().split()
        except (OSError, ValueError):  # the thread ended meanwhile, or no schedstat
            continue
        out[task.name] = (int(on_cpu), int(waiting))
    return out or None


def cpu_wait_share(before, after) -> float | None:
    """Share of the threads' runnable time (on a CPU + waiting) they spent waiting, between two
    thread_schedstat() readings; threads started in between count from zero."""
    if before is None or after is None:
        return None
    on_cpu = waiting = 0
    for tid, (cpu1, wait1) in after.items():
        cpu0, wait0 = before.get(tid, (0, 0))
        on_cpu, waiting = on_cpu + cpu1 - cpu0, waiting + wait1 - wait0
    return waiting / (on_cpu + waiting) if on_cpu + waiting > 0 else None


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not every OS has one
        return None


def is_busy(cpu_wait: float | None, load: float | None) -> bool | None:
    if cpu_wait is not None:
        return cpu_wait > BUSY_WAIT_FRACTION
    if load is not None:
        return load > (os.cpu_count() or 1)
    return None


def _watched(samples: dict[str, list[float]]) -> list[float]:
    """The figures that must settle: each candidate's ratio to the baseline (the first)."""
    medians = [statistics.median(s) for s in samples.values()]
    if len(medians) == 1:
        return medians
    return [medians[0] / m if m > 0 else float("inf") for m in medians[1:]]


def settled(history: list[list[float]], tolerance: float, window: int) -> bool:
    """Whether every watched figure stayed within `tolerance` over the last window + 1 rounds."""
    if len(history) < window + 1:
        return False
    for series in zip(*history[-(window + 1):]):
        low, high = min(series), max(series)
        if not (low > 0 and high / low - 1 <= tolerance):
            return False
    return True


def measure(fns: dict[str, Callable[[], object]], warmup: int = 2, max_rounds: int = 15,
            min_rounds: int | None = None, tolerance: float = TOLERANCE, window: int = WINDOW,
            clock: Callable[[], float] = time.perf_counter,
            schedstat: Callable[[], dict | None] = thread_schedstat) -> Measurement:
    """Times the fns interleaved (the first one is the baseline of the ratios) by the rule in
    the module docstring. min_rounds defaults to min(MIN_ROUNDS, max_rounds); min_rounds =
    max_rounds times a fixed number of rounds. clock and schedstat are injectable for tests."""
    if not fns:
        raise ValueError("fns: nothing to time")
    min_rounds = min(MIN_ROUNDS, max_rounds) if min_rounds is None else min_rounds
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not 1 <= min_rounds <= max_rounds:
        raise ValueError(f"need 1 <= min_rounds <= max_rounds, got {min_rounds}, {max_rounds}")
    if tolerance <= 0 or window < 1:
        raise ValueError(f"tolerance must be > 0 and window >= 1, got {tolerance}, {window}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    history: list[list[float]] = []
    before = schedstat()
    stable = False
    while len(history) < max_rounds:
        for name, fn in fns.items():
            _synchronize()
            start = clock()
            fn()
            _synchronize()
            samples[name].append(clock() - start)
        history.append(_watched(samples))
        stable = settled(history, tolerance, window)
        if stable and len(history) >= min_rounds:
            break
    wait = cpu_wait_share(before, schedstat())
    load = load_average()
    return Measurement({name: statistics.median(s) for name, s in samples.items()},
                       len(history), stable, load, wait, is_busy(wait, load))

