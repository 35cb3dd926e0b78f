"""Server counters: requests, errors, batches, queue depth, latencies. Thread-safe.

Times are seconds from the caller's clock; the ``stats`` op and the periodic log
line both show ``snapshot()``.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Timing:
    """count, total, max and last of a duration (s)."""

    count: int = 0
    total: float = 0.0
    max: float = 0.0
    last: float = 0.0

    def add(self, dt: float) -> None:
        self.count += 1
        self.total += dt
        self.max = max(self.max, dt)
        self.last = dt

    def as_dict(self) -> dict[str, float]:
        mean = self.total / self.count if self.count else 0.0
        return {"count": self.count, "total_s": self.total, "mean_s": mean, "max_s": self.max,
                "last_s": self.last}


@dataclass
class Metrics:
    """Everything ``stats`` reports. Call the ``on_*`` methods from any thread."""

    requests: Counter = field(default_factory=Counter)  # by front end (zmq, ipi) and by op
    errors: Counter = field(default_factory=Counter)  # by error code
    structures: int = 0
    engine_calls: int = 0
    batch_structures: Counter = field(default_factory=Counter)  # structures per call -> calls
    batch_atoms_max: int = 0
    queue_depth: int = 0
    queue_depth_max: int = 0
    queue_bytes: int = 0
    queue_bytes_max: int = 0
    dropped: Counter = field(default_factory=Counter)  # not computed: cancelled, disconnected
    # (a ZeroMQ client's connection or an i-PI socket closed while its request was queued)
    heap_trims: int = 0
    engine_time: _Timing = field(default_factory=_Timing)
    request_latency: _Timing = field(default_factory=_Timing)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def on_request(self, kind: str) -> None:
        with self._lock:
            self.requests[kind] += 1

    def on_error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def on_queue(self, depth: int) -> None:
        with self._lock:
            self.queue_depth = depth
            self.queue_depth_max = max(self.queue_depth_max, depth)

    def on_queue_bytes(self, nbytes: int) -> None:
        with self._lock:
            self.queue_bytes = nbytes
            self.queue_bytes_max = max(self.queue_bytes_max, nbytes)

    def on_dropped(self, reason: str) -> None:
        """A request not computed because its client cancelled it or went away."""
        with self._lock:
            self.dropped[reason] += 1

    def on_trim(self) -> None:
        with self._lock:
            self.heap_trims += 1

    def on_engine_call(self, *, n_structures: int, n_atoms: int, seconds: float) -> None:
        with self._lock:
            self.engine_calls += 1
            self.structures += n_structures
            self.batch_structures[n_structures] += 1
            self.batch_atoms_max = max(self.batch_atoms_max, n_atoms)
            self.engine_time.add(seconds)

    def on_answered(self, seconds: float) -> None:
        """A compute request answered, ``seconds`` after it arrived."""
        with self._lock:
            self.request_latency.add(seconds)

    def snapshot(self) -> dict[str, Any]:
        """A msgpack/JSON-friendly copy (string keys only)."""
        with self._lock:
            return {
                "requests": dict(self.requests),
                "errors": dict(self.errors),
                "structures": self.structures,
                "engine_calls": self.engine_calls,
                "batch_structures": {str(k): v for k, v in sorted(self.batch_structures.items())},
                "batch_atoms_max": self.batch_atoms_max,
                "queue_depth": self.queue_depth,
                "queue_depth_max": self.queue_depth_max,
                "queue_bytes": self.queue_bytes,
                "queue_bytes_max": self.queue_bytes_max,
                "dropped": dict(self.dropped),
                "heap_trims": self.heap_trims,
                "engine_time": self.engine_time.as_dict(),
                "request_latency": self.request_latency.as_dict(),
            }

    def summary(self) -> str:
        """One log line."""
        s = self.snapshot()
        front = s["requests"].get("zmq", 0) + s["requests"].get("ipi", 0)
        return (f"requests={front} errors={sum(s['errors'].values())} "
                f"engine_calls={s['engine_calls']} structures={s['structures']} "
                f"queue={s['queue_depth']} (max {s['queue_depth_max']}) "
                f"engine_mean={s['engine_time']['mean_s'] * 1e3:.2f}ms "
                f"latency_mean={s['request_latency']['mean_s'] * 1e3:.2f}ms")
