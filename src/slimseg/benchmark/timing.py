"""Wall-clock timing of one repeated piece of work: warm-up runs, then the median of timed runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from slimseg.devices import synchronize
from slimseg.validation import as_integer


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed run (warm-up runs excluded)."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def check_runs(runs: int, warmup: int) -> None:
    as_integer(runs, "runs", 1)
    as_integer(warmup, "warm-up runs", 0)


def time_runs(work: Callable[[], object], device: torch.device, runs: int, warmup: int = 1) -> Timing:
    """Call ``work`` ``warmup`` times untimed (allocator, caches, lazy compilation), then
    ``runs`` times, each timed alone with the device synchronised before and after."""
    return time_alternating([work], device, runs, warmup)[0]


def time_alternating(works: Sequence[Callable[[], object]], device: torch.device, runs: int,
                     warmup: int = 1) -> list[Timing]:
    """:func:`time_runs` for several pieces of work taken in turn, run by run: a machine whose
    speed drifts while it measures (shared, throttled) then slows each of them alike, and
    their ratio is fairer than one of medians taken minutes apart. One Timing per work."""
    check_runs(runs, warmup)
    for _ in range(warmup):
        for work in works:
            work()
    seconds: list[list[float]] = [[] for _ in works]
    for _ in range(runs):
        for work, taken in zip(works, seconds):
            synchronize(device)
            started = time.perf_counter()
            work()
            synchronize(device)
            taken.append(time.perf_counter() - started)
    return [Timing(tuple(taken)) for taken in seconds]
