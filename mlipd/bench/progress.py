"""A suite's progress in the log while it runs, so minutes of work are never silence.

    with Progress("ipi", "quick"):
        suite.run(...)

logs the start, the end and its time, and, whenever ``TICK_S`` seconds pass without a
log line from ``mlipd.bench`` (a contender starting, a timing round, an i-PI run), one
line with the time so far and the last thing logged: "bench ipi (quick) 40 s: still
at: i-PI run chgnet-mlipd-drive-0: 64 atoms, 4 beads".
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

TICK_S = 10.0  # longest silence while a suite runs


class _LastLine(logging.Handler):
    """Remembers when ``mlipd.bench`` last logged, and what."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.at = time.monotonic()
        self.text = "starting"

    def emit(self, record: logging.LogRecord) -> None:
        self.at = time.monotonic()
        if record.name != __name__:
            self.text = record.getMessage()


class Progress:
    """The progress of one suite run (module docstring); a context manager."""

    def __init__(self, suite: str, size: str, *, tick_s: float = TICK_S) -> None:
        self.suite, self.size, self.tick_s = suite, size, tick_s
        self._last = _LastLine()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()

    @property
    def label(self) -> str:
        return f"bench {self.suite} ({self.size})"

    def __enter__(self) -> Progress:
        self._t0 = time.monotonic()
        logging.getLogger("mlipd.bench").addHandler(self._last)
        log.info("%s: started", self.label)
        self._thread = threading.Thread(target=self._tick, name="mlipd-bench-progress",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        logging.getLogger("mlipd.bench").removeHandler(self._last)
        log.info("%s: %s after %.0f s", self.label, "failed" if exc[0] else "done",
                 time.monotonic() - self._t0)

    def _tick(self) -> None:
        while not self._stop.wait(min(1.0, self.tick_s)):
            if time.monotonic() - self._last.at >= self.tick_s:
                log.info("%s %.0f s: still at: %s", self.label, time.monotonic() - self._t0,
                         self._last.text)
