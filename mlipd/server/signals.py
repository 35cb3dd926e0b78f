"""SIGINT and SIGTERM as an event: a command notes which signal came, stops in order,
logs its summary as at a normal end, and exits with 128 + the signal's number
(``drive``) or its own documented status (``serve``)."""

from __future__ import annotations

import signal
import threading


class Interrupts:
    """Within ``with Interrupts() as i:``, SIGINT/SIGTERM set ``i.event`` and
    ``i.signal`` instead of raising; the previous handlers come back at exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return "" if self.signal is None else signal.Signals(self.signal).name

    def _handle(self, signum, _frame) -> None:
        if self.signal is None:
            self.signal = signum
        self.event.set()

    def __enter__(self) -> Interrupts:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
