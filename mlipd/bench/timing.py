"""Timing contenders like for like: interleaved, warm-up excluded, median and spread;
and the deadlines that bound every loop of a suite."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)


class ContenderFailed(Exception):
    """A contender cannot go on (out of memory, over a limit, its process died): the
    others are timed without it; the reason goes into the table."""


class Measured(float):
    """Seconds a contender measured itself (in its own process, where a pipe's latency
    would otherwise be counted): ``interleaved`` uses them instead of its own clock."""


class Deadline:
    """A point in time that loops check before starting more work."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    @property
    def passed(self) -> bool:
        return self.left() <= 0

    def shares(self, items, weights=None):
        """``(item, deadline)`` pairs: each item gets its share (equal, or by
        ``weights``) of the time left when its turn comes (so the first cannot use up
        the last's)."""
        items = list(items)
        weights = [1.0] * len(items) if weights is None else [float(w) for w in weights]
        for i, item in enumerate(items):
            yield item, Deadline(self.left() * weights[i] / sum(weights[i:]))


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one contender: every timed call, their median and range,
    and why it stopped if it failed."""

    seconds: tuple[float, ...]
    failed: str | None = None

    @property
    def ok(self) -> bool:
        return self.failed is None and bool(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def spread(self) -> tuple[float, float]:
        return (min(self.seconds), max(self.seconds)) if self.seconds else (
            float("nan"), float("nan"))

    def cell(self, scale: float = 1.0, digits: int = 3) -> str:
        """``median (min-max)`` in units of ``scale`` seconds, or why it failed."""
        if not self.ok:
            return self.failed or "not run"
        lo, hi = self.spread
        return f"{self.median / scale:.{digits}f} ({lo / scale:.{digits}f}-{hi / scale:.{digits}f})"

    def ratio(self, other: Timing, digits: int = 2) -> str:
        """``other``'s median over this one's (how many times faster this one is)."""
        if not (self.ok and other.ok) or self.median <= 0:
            return "-"  # a block timed below the clock's resolution has no ratio
        return f"{other.median / self.median:.{digits}f}"


def interleaved(contenders: Mapping[str, Callable[[int], object]], *, warmup: int = 1,
                repeats: int = 3, deadline: Deadline | None = None,
                min_repeats: int = 3, label: str = "") -> dict[str, Timing]:
    """Call every contender ``warmup`` times untimed, then up to ``repeats`` rounds in
    which each is called once in turn (so load changes on the machine hit all alike);
    rounds beyond ``min_repeats`` stop at ``deadline``. A contender gets the call's
    index (warm-up calls negative), e.g. to move atoms between calls, and may return
    ``Measured`` seconds. One that raises ``ContenderFailed`` is dropped, with its reason.
    Each round is logged (``label``: what is timed, e.g. the model and size)."""
    failed: dict[str, str] = {}
    times: dict[str, list[float]] = {name: [] for name in contenders}

    def call(name: str, fn: Callable[[int], object], k: int) -> float | None:
        t0 = time.perf_counter()
        try:
            out = fn(k)
        except ContenderFailed as e:
            failed[name] = str(e)
            return None
        dt = time.perf_counter() - t0
        return float(out) if isinstance(out, Measured) else dt

    head = f"{label}: " if label else ""
    log.info("%swarm-up of %s", head, ", ".join(contenders))
    for k in range(-warmup, 0):
        for name, fn in contenders.items():
            if name not in failed:
                call(name, fn, k)
    for k in range(repeats):
        if k >= min_repeats and deadline is not None and deadline.passed:
            break
        for name, fn in contenders.items():
            if name not in failed:
                dt = call(name, fn, k)
                if dt is not None:
                    times[name].append(dt)
        log.info("%sround %d/%d: %s", head, k + 1, repeats, ", ".join(
            f"{n} {times[n][-1] * 1e3:.1f} ms" if n not in failed and times[n]
            else f"{n} {failed.get(n, 'no time')}" for n in contenders))
    return {name: Timing(tuple(t), failed.get(name)) for name, t in times.items()}
