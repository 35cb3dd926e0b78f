"""What ``mlipd drive`` has served, logged every few seconds while it runs.

``Progress.counted(compute)`` counts every engine call (force requests, structures,
engine seconds); a daemon thread logs the counts of each interval, so a long run
shows it is alive between ``connected`` and ``EXIT`` (and a silent server shows as
"no requests").
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from mlipd.driver.loop import Compute

log = logging.getLogger(__name__)

DEFAULT_EVERY_S = 30.0


@dataclass
class Counts:
    requests: int = 0  # engine calls: one per force request (padded batch copies excluded)
    structures: int = 0
    engine_s: float = 0.0

    def minus(self, other: Counts) -> Counts:
        return Counts(self.requests - other.requests, self.structures - other.structures,
                      self.engine_s - other.engine_s)


def describe(delta: Counts, seconds: float, *, idle: str = "no force requests") -> str:
    """One interval: ``12 force requests, 48 structures (1.6 structures/s), mean engine
    time 812.3 ms``, or ``idle`` when nothing was asked."""
    if delta.requests == 0:
        return idle
    rate = delta.structures / seconds if seconds > 0 else float("nan")
    return (f"{delta.requests} force requests, {delta.structures} structures "
            f"({rate:.3g} structures/s), mean engine time "
            f"{1e3 * delta.engine_s / delta.requests:.1f} ms")


class Progress:
    """Counts engine calls and logs them every ``every_s`` seconds (0: never)."""

    def __init__(self, *, every_s: float = DEFAULT_EVERY_S) -> None:
        self.every_s = every_s
        self.total = Counts()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def counted(self, compute: Compute) -> Compute:
        """``compute``, counted."""

        def call(structures):
            t0 = time.perf_counter()
            results = compute(structures)
            dt = time.perf_counter() - t0
            with self._lock:
                self.total.requests += 1
                self.total.structures += len(structures)
                self.total.engine_s += dt
            return results

        return call

    def snapshot(self) -> Counts:
        with self._lock:
            return Counts(self.total.requests, self.total.structures, self.total.engine_s)

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
