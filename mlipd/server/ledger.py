"""Which requests of which connection are under way or answered, so that a repeated
id is answered, never computed again.

A ZeroMQ client resends a request (same id, same connection) as its heartbeat while
it waits; the ledger says what to answer: ``pending`` while the request is queued or
computing, the reply itself once it is finished. Each entry keeps a fingerprint of
the request frame, a BLAKE2b digest of every byte (a cryptographic hash: a length and
CRC-32 could be forged, so that a different geometry got the first request's
result), so a client that reuses an id for a different request gets that request
computed, never the old reply; only a byte-identical resend is answered from here.
Finished replies are kept for a short
while (``keep_s``) within a byte budget, for a resend that crossed its reply;
a request older than that is simply new again. Pending entries are bounded by the
scheduler's queue. Thread-safe (the I/O thread reads, the engine thread finishes).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass


@dataclass
class Entry:
    """One request: ``future`` while at work; ``reply`` (the packed frame) once answered."""

    future: Future | None
    arrived: float
    fingerprint: bytes = b""
    reply: bytes | None = None
    finished: float = 0.0


FINGERPRINT_BYTES = 32  # BLAKE2b-256: collisions are out of reach, not just unlikely


def fingerprint(frame: bytes | memoryview) -> bytes:
    """The request's identity for resends: BLAKE2b-256 of the whole frame."""
    return hashlib.blake2b(frame, digest_size=FINGERPRINT_BYTES).digest()


class Ledger:
    """Entries by (connection, request id).

    keep_s:    how long a finished reply stays for a repeated id
    max_bytes: the finished replies kept, in bytes, at most (oldest dropped first)
    clock:     seconds, monotonic
    """

    def __init__(self, *, keep_s: float = 30.0, max_bytes: int = 64 << 20,
                 max_finished: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.keep_s = keep_s
        self.max_bytes = max_bytes
        self.max_finished = max_finished
        self.clock = clock
        self._pending: dict[Hashable, Entry] = {}
        self._finished: OrderedDict[Hashable, Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Entry | None:
        with self._lock:
            self._expire()
            return self._pending.get(key) or self._finished.get(key)

    def start(self, key: Hashable, future: Future, fingerprint: bytes) -> None:
        with self._lock:
            self._pending[key] = Entry(future=future, arrived=self.clock(),
                                       fingerprint=fingerprint)

    def forget(self, key: Hashable) -> None:
        """Drop a finished entry (its id is being used for another request)."""
        with self._lock:
            entry = self._finished.pop(key, None)
            if entry is not None:
                self._bytes -= len(entry.reply)

    def discard(self, key: Hashable) -> None:
        """Drop a pending entry without a reply (its client went away): a resend of the
        same request is then new again."""
        with self._lock:
            self._pending.pop(key, None)

    def finish(self, key: Hashable, reply: bytes) -> None:
        """The request's reply is ``reply``: keep it (bounded) for a repeat."""
        with self._lock:
            entry = self._pending.pop(key, None)
            if entry is None:
                return
            entry.future, entry.reply, entry.finished = None, reply, self.clock()
            self._finished[key] = entry
            self._bytes += len(reply)
            self._expire()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._finished)

    def _expire(self) -> None:
        old = self.clock() - self.keep_s
        while self._finished:
            key, entry = next(iter(self._finished.items()))
            if (entry.finished >= old and self._bytes <= self.max_bytes
                    and len(self._finished) <= self.max_finished):
                break
            del self._finished[key]
            self._bytes -= len(entry.reply)
