"""What ``mlipd drive`` has served, logged every few seconds while it runs.

``Progress`` reads the server's counters (``Counts``, from ``mlipd.server.metrics``)
on a daemon thread and logs each interval's, so a long run shows it is alive between
``connected`` and ``EXIT`` (and a silent server shows as "no force requests").
Nothing is added to the request path: the counters are kept anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_EVERY_S = 30.0


@dataclass(frozen=True)
class Counts:
    """requests: force requests (one POSDATA: a bead, or i-PI's batch of beads);
    structures: structures computed; engine_calls: calls, each computing the beads of
    every connection that arrived together; engine_s: seconds in those calls."""

    requests: int = 0
    structures: int = 0
    engine_calls: int = 0
    engine_s: float = 0.0

    def minus(self, other: Counts) -> Counts:
        return Counts(self.requests - other.requests, self.structures - other.structures,
                      self.engine_calls - other.engine_calls, self.engine_s - other.engine_s)

    @classmethod
    def from_stats(cls, s: dict) -> Counts:
        """From ``Metrics.snapshot()``."""
        return cls(requests=int(s["requests"].get("ipi", 0)), structures=int(s["structures"]),
                   engine_calls=int(s["engine_calls"]),
                   engine_s=float(s["engine_time"]["total_s"]))


def describe(delta: Counts, seconds: float, *, idle: str = "no force requests") -> str:
    """One interval: ``12 force requests, 48 structures (1.6 structures/s) in 12 engine
    calls, mean engine time 812.3 ms``, or ``idle`` when nothing was asked."""
    if delta.requests == 0:
        return idle
    rate = delta.structures / seconds if seconds > 0 else float("nan")
    calls = max(delta.engine_calls, 1)
    return (f"{delta.requests} force requests, {delta.structures} structures "
            f"({rate:.3g} structures/s) in {delta.engine_calls} engine "
            f"call{'s' if delta.engine_calls != 1 else ''}, mean engine "
            f"time {1e3 * delta.engine_s / calls:.1f} ms")


class Progress:
    """Logs ``snapshot()``'s counts every ``every_s`` seconds (0: never)."""

    def __init__(self, snapshot: Callable[[], Counts], *,
                 every_s: float = DEFAULT_EVERY_S) -> None:
        self.snapshot = snapshot
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self.every_s > 0:
            self._thread = threading.Thread(target=self._run, name="mlipd-progress",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        last, t_last = self.snapshot(), time.monotonic()
        while not self._stop.wait(self.every_s):
            now, t_now = self.snapshot(), time.monotonic()
            log.info("last %.0f s: %s; %d in all", t_now - t_last,
                     describe(now.minus(last), t_now - t_last,
                              idle="no force requests (waiting for the server)"),
                     now.requests)
            last, t_last = now, t_now
