"""The engine loop: one thread owns the engine (torch) and runs the scheduler's batches.

Front ends (the ZeroMQ endpoint's I/O thread, the i-PI links) call ``submit`` and get
a ``concurrent.futures.Future`` that resolves to that request's ``list[Result]`` or
raises its ``MlipdError``; a socketpair wakes the loop. The future is marked running
when its batch starts (so a front end can say "queued" or "computing"), and its
done-callbacks run on this thread. While the engine runs, new requests queue in the
scheduler and go out together in the next call.

Each request carries a deadline (``request_timeout_s`` after it arrived): a request
still queued at its deadline fails without an engine call, and the engine checks the
batch's earliest deadline between its stages (``mlipd.engine.deadline``). An engine
error in a batch of several requests is retried request by request, so one bad
structure (or one late request) fails only its own request.

``close`` stops taking requests, computes what is queued while its time lasts,
answers the rest ``busy``, and reports whether the loop had to be abandoned (an
engine call that did not return in time).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace

from mlipd.engine.deadline import deadline
from mlipd.errors import Busy, CalculationFailed, DeadlineExceeded, MlipdError, ServerUnavailable
from mlipd.server.metrics import Metrics
from mlipd.server.scheduler import Scheduler, Ticket, flatten, split
from mlipd.types import Result, Structure

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT_S = 600.0


class EngineWorker:
    """Owns ``engine`` on one thread (see module docstring).

    engine:    has ``compute(structures, *, virial) -> list[Result]`` (``mlipd.engine``)
    scheduler: the batching policy (``mlipd.server.scheduler.Scheduler``)
    request_timeout_s: each request's deadline after it arrived
    clock:     seconds, monotonic
    """

    def __init__(self, engine, *, scheduler: Scheduler, metrics: Metrics | None = None,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.metrics = metrics if metrics is not None else Metrics()
        self.request_timeout_s = float(request_timeout_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._stopping = False
        self._drain_until = float("inf")
        self._current: list[Ticket] = []  # the batch being run
        self.busy_since: float | None = None  # when the running engine call started
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._loop, name="mlipd-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ------------------------------------------------------------ any thread

    def submit(self, source: Hashable, structures: Sequence[Structure], *,
               virial: bool = True) -> Future:
        """Queue one request; the future gives its results. Raises ``Busy`` when full
        or shutting down."""
        fut: Future = Future()
        ticket = Ticket(source=source, structures=tuple(structures), arrived=self.clock(),
                        token=fut, virial=virial)
        with self._lock:
            if self._stopping:
                raise Busy("server is shutting down")
            self.scheduler.submit(ticket)
            self.metrics.on_queue(len(self.scheduler))
        self._wake()
        return fut

    def add_gated(self, source: Hashable) -> None:
        """Register an i-PI-like source: batches wait (bounded) for all such sources."""
        with self._lock:
            self.scheduler.add_gated(source)
        self._wake()

    def remove_gated(self, source: Hashable) -> None:
        with self._lock:
            self.scheduler.remove_gated(source)
        self._wake()

    def compute_for(self, source: Hashable) -> Callable[[Sequence[Structure]], list[Result]]:
        """A blocking ``compute(structures) -> results`` for a driver connection."""

        def compute(structures: Sequence[Structure]) -> list[Result]:
            fut = self.submit(source, structures, virial=True)
            try:  # the deadline fails the request; this only guards against a lost future
                return fut.result(timeout=self.request_timeout_s + 60.0)
            except FutureTimeout as e:
                raise CalculationFailed(f"no result within {self.request_timeout_s} s") from e

        return compute

    def close(self, *, timeout_s: float = 60.0) -> bool:
        """Stop taking requests, compute what is queued for up to ``timeout_s``, answer
        the rest ``busy``. True when the loop finished; False when an engine call was
        still running after ``timeout_s`` (its requests are then answered with an error)."""
        with self._lock:
            self._stopping = True
            self._drain_until = self.clock() + timeout_s
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s + 1.0)
        finished = not self._thread.is_alive()
        if not finished:
            log.error("engine call still running %.0f s after shutdown began; abandoning it",
                      timeout_s)
            err = ServerUnavailable("server stopped before the engine call finished")
            with self._lock:
                queued = self._take_all()
            for t in [*self._current, *queued]:
                self._finish(t, err)
        self._wake_r.close()
        self._wake_w.close()
        return finished

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full pipe: a wake is pending
            self._wake_w.send(b"\0")

    # ------------------------------------------------------------ loop thread

    def _loop(self) -> None:
        while True:
            try:
                if not self._step():
                    return
            except Exception as e:  # the loop's one catch-all: fail that batch, keep serving
                log.exception("engine loop: unexpected error")
                err = MlipdError(f"internal error: {type(e).__name__}: {e}")  # code "internal"
                for t in self._current:
                    self._finish(t, err)
            finally:
                self._current = []
                self.busy_since = None

    def _step(self) -> bool:
        """One turn: run a due batch, or wait until one is due. False: stop."""
        with self._lock:
            now = self.clock()
            late = self._stopping and now > self._drain_until
            refused = self._take_all() if late else None
        if refused is not None:
            if refused:
                log.warning("shutdown: %d queued requests answered busy", len(refused))
            for t in refused:
                self._finish(t, Busy("server is shutting down"))
            return False
        with self._lock:
            now = self.clock()
            batch = self.scheduler.take(now, force=self._stopping)
            if batch:
                self.metrics.on_queue(len(self.scheduler))
            elif self._stopping:
                return False
            due = self.scheduler.deadline()
        if batch:
            self._current = batch
            self._run(batch)
            return True
        timeout = None if due is None else max(due - now, 0.0) + 1e-4
        readable, _, _ = select.select([self._wake_r], [], [], timeout)
        if readable:
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)
        return True

    def _take_all(self) -> list[Ticket]:
        """Every queued ticket (hold the lock)."""
        out: list[Ticket] = []
        while batch := self.scheduler.take(self.clock(), force=True):
            out += batch
        self.metrics.on_queue(0)
        return out

    def _run(self, batch: list[Ticket]) -> None:
        now = self.clock()
        live = []
        for t in batch:
            if now > t.arrived + self.request_timeout_s:
                self._finish(t, DeadlineExceeded(
                    f"request waited {now - t.arrived:.3g} s in the queue (deadline "
                    f"{self.request_timeout_s:g} s, --request-timeout)"))
            elif t.token.set_running_or_notify_cancel():
                live.append(t)
        if not live:
            return
        self.busy_since = now
        try:
            results = self._call(live)
        except MlipdError as e:
            if len(live) == 1:
                self._finish(live[0], e)
                return
            log.info("batch of %d requests failed (%s); retrying one by one", len(live), e)
            for t in live:
                try:
                    self._finish(t, self._call([t])[0][1])
                except MlipdError as e1:
                    self._finish(t, e1)
            return
        for t, res in results:
            self._finish(t, res)

    def _call(self, batch: list[Ticket]) -> list[tuple[Ticket, list[Result]]]:
        structures = flatten(batch)
        t0 = self.clock()
        with deadline(min(t.arrived for t in batch) + self.request_timeout_s):
            results = self.engine.compute(structures, virial=any(t.virial for t in batch))
        self.metrics.on_engine_call(n_structures=len(structures),
                                    n_atoms=sum(t.n_atoms for t in batch),
                                    seconds=self.clock() - t0)
        pairs = split(batch, results)
        return [(t, res if t.virial else [replace(r, virial=None) for r in res])
                for t, res in pairs]

    def _finish(self, ticket: Ticket, outcome: list[Result] | MlipdError) -> None:
        fut: Future = ticket.token
        if fut.done():
            return
        try:
            if isinstance(outcome, MlipdError):
                fut.set_exception(outcome)
                self.metrics.on_error(outcome.code)
            else:
                fut.set_result(outcome)
                self.metrics.on_answered(self.clock() - ticket.arrived)
        except InvalidStateError:  # answered meanwhile by close() (abandoned loop)
            pass
