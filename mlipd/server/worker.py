"""The server loop: one thread owns the engine (torch) and the ZeroMQ sockets.

Why one thread for both: a ZeroMQ request is then read, batched, computed and
answered without a single hand-over between threads (each costs a wake-up and a
GIL switch, which dominated the round trip of small structures). While the
engine runs, new messages wait in ZeroMQ's own queues and are read together
afterwards, so concurrent requests share the next engine call.

Other threads (the i-PI links) call ``submit`` and get a
``concurrent.futures.Future`` that resolves to that request's ``list[Result]`` or
raises its ``MlipdError``; a socketpair wakes the loop. An engine error in a
batch of several requests is retried request by request, so one bad structure
fails only its own request.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import Protocol

import zmq

from mlipd.errors import Busy, CalculationFailed, MlipdError
from mlipd.server.metrics import Metrics
from mlipd.server.scheduler import Scheduler, Ticket, flatten, split
from mlipd.types import Result, Structure

log = logging.getLogger(__name__)


class FrontEnd(Protocol):
    """A socket the loop polls: ``socket`` readable -> ``on_readable()``; after every
    batch and wake-up ``flush()`` sends what is ready."""

    socket: zmq.Socket

    def on_readable(self) -> None: ...

    def flush(self) -> None: ...


class EngineWorker:
    """Owns ``engine`` and the attached front ends on one thread (see module docstring).

    engine:    has ``compute(structures, *, virial) -> list[Result]`` (``mlipd.engine``)
    scheduler: the batching policy (``mlipd.server.scheduler.Scheduler``)
    clock:     seconds, monotonic
    """

    def __init__(self, engine, *, scheduler: Scheduler, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.metrics = metrics if metrics is not None else Metrics()
        self.clock = clock
        self._lock = threading.Lock()
        self._stopping = False
        self._front_ends: list[FrontEnd] = []
        self._current: list[Ticket] = []  # the batch being run (failed on a bug)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._loop, name="mlipd-engine", daemon=True)

    def attach(self, front_end: FrontEnd) -> None:
        """Poll ``front_end`` on the loop thread; call before ``start``."""
        if self._thread.is_alive():
            raise RuntimeError("attach front ends before start()")
        self._front_ends.append(front_end)

    def start(self) -> None:
        self._thread.start()

    # ------------------------------------------------------------ any thread

    def submit(self, source: Hashable, structures: Sequence[Structure], *,
               virial: bool = True) -> Future:
        """Queue one request; the future gives its results. Raises ``Busy`` when full."""
        fut: Future = Future()
        ticket = Ticket(source=source, structures=tuple(structures), arrived=self.clock(),
                        token=fut, virial=virial)
        with self._lock:
            if self._stopping:
                raise Busy("server is shutting down")
            self.scheduler.submit(ticket)
            self.metrics.on_queue(len(self.scheduler))
        if threading.current_thread() is not self._thread:
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

    def compute_for(self, source: Hashable, *, timeout_s: float = 3600.0
                    ) -> Callable[[Sequence[Structure]], list[Result]]:
        """A blocking ``compute(structures) -> results`` for a driver connection."""

        def compute(structures: Sequence[Structure]) -> list[Result]:
            fut = self.submit(source, structures, virial=True)
            try:
                return fut.result(timeout=timeout_s)
            except FutureTimeout as e:
                raise CalculationFailed(f"no result within {timeout_s} s") from e

        return compute

    def close(self, *, timeout_s: float = 60.0) -> None:
        """Answer every queued request, then stop the loop (engine and sockets stay open)."""
        with self._lock:
            self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
            if self._thread.is_alive():
                log.warning("engine loop did not finish within %.0f s", timeout_s)
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full pipe: a wake is pending
            self._wake_w.send(b"\0")

    # ------------------------------------------------------------ loop thread

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        for fe in self._front_ends:
            poller.register(fe.socket, zmq.POLLIN)
        while True:
            try:
                if not self._step(poller):
                    return
            except Exception as e:  # the loop's one catch-all: fail that batch, keep serving
                log.exception("engine loop: unexpected error")
                err = MlipdError(f"internal error: {type(e).__name__}: {e}")  # code "internal"
                for t in self._current:
                    if not t.token.done():
                        self._finish(t, err)
            finally:
                self._current = []

    def _step(self, poller: zmq.Poller) -> bool:
        """One turn: run a due batch, or wait for I/O until one is due. False: stop."""
        with self._lock:
            now = self.clock()
            batch = self.scheduler.take(now, force=self._stopping)
            if batch:
                self.metrics.on_queue(len(self.scheduler))
            done = self._stopping and not batch
            due = self.scheduler.deadline()
        if batch:
            self._current = batch
            self._run(batch)
            self._flush()
            return True
        if done:  # what arrived meanwhile gets a "shutting down" reply, not silence
            for fe in self._front_ends:
                fe.on_readable()
            self._flush()
            return False
        timeout_ms = None if due is None else max(1e3 * (due - now), 0.0) + 0.1
        events = dict(poller.poll(timeout_ms))
        if self._wake_r.fileno() in events:
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)
        for fe in self._front_ends:
            if fe.socket in events:
                fe.on_readable()
        self._flush()
        return True

    def _flush(self) -> None:
        for fe in self._front_ends:
            fe.flush()

    def _run(self, batch: list[Ticket]) -> None:
        try:
            results = self._call(batch)
        except MlipdError as e:
            if len(batch) == 1:
                self._finish(batch[0], e)
                return
            log.info("batch of %d requests failed (%s); retrying one by one", len(batch), e)
            for t in batch:
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
        results = self.engine.compute(structures, virial=any(t.virial for t in batch))
        self.metrics.on_engine_call(n_structures=len(structures),
                                    n_atoms=sum(t.n_atoms for t in batch),
                                    seconds=self.clock() - t0)
        pairs = split(batch, results)
        return [(t, res if t.virial else [replace(r, virial=None) for r in res])
                for t, res in pairs]

    def _finish(self, ticket: Ticket, outcome: list[Result] | MlipdError) -> None:
        fut: Future = ticket.token
        if isinstance(outcome, MlipdError):
            self.metrics.on_error(outcome.code)
            fut.set_exception(outcome)
        else:
            self.metrics.on_answered(self.clock() - ticket.arrived)
            fut.set_result(outcome)
