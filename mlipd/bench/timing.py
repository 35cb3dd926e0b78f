"""Timing contenders like for like: interleaved, warm-up excluded, median and spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one contender: every timed call, and their median and range."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.seconds), max(self.seconds)

    def cell(self, scale: float = 1.0, digits: int = 3) -> str:
        """``median (min-max)`` in units of ``scale`` seconds."""
        lo, hi = self.spread
        return f"{self.median / scale:.{digits}f} ({lo / scale:.{digits}f}-{hi / scale:.{digits}f})"


def interleaved(contenders: Mapping[str, Callable[[int], object]], *, warmup: int = 1,
                repeats: int = 3) -> dict[str, Timing]:
    """Call every contender ``warmup`` times untimed, then ``repeats`` rounds in which each
    is called once in turn (so load changes on the machine hit all alike). A contender
    gets the call's index (warm-up calls negative), e.g. to move atoms between calls."""
    for k in range(-warmup, 0):
        for fn in contenders.values():
            fn(k)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for k in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn(k)
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(tuple(t)) for name, t in times.items()}
