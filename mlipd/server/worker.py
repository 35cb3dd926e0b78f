"""The engine loop: one thread owns the engine (torch) and runs the scheduler's batches.

Why the ZeroMQ sockets are served by this thread too, between engine calls: a request
is then read, batched, computed and answered without a single hand-over between
threads (each costs a wake-up and a GIL switch, which on a loaded machine waits for
the scheduler). But a
long engine call must not silence ``ping``: so the loop *lends* its sockets while it
computes. Each front end (``FrontEnd``) has a lock the loop holds except during
engine calls, and a thread of its own that takes the socket once the loop has been
busy for ``LEND_AFTER_S`` (and for good once the loop has ended), answering pings,
stats, ``busy`` and resends, and queueing new requests, until the loop asks for it
back (``reclaim``). Short calls never wake that thread.

Other threads (the i-PI links) call ``submit`` and get a
``concurrent.futures.Future`` that resolves to that request's ``list[Result]`` or
raises its ``MlipdError``; a socketpair wakes the loop. The future is marked running
when its batch starts (so a front end can say "queued" or "computing"), and its
done-callbacks run on this thread. While the engine runs, new requests queue in the
scheduler and go out together in the next call.

Each request carries a deadline (``request_timeout_s`` after it arrived): a request
still queued at its deadline fails without an engine call, and the engine checks the
batch's earliest deadline between its stages (``mlipd.engine.deadline``). An engine
error in a batch of several requests is retried request by request, so one bad
structure (or one late request) fails only its own request.

Memory: the scheduler bounds the queue in bytes as well as in requests. An allocation
failure inside the engine (CPU or CUDA) becomes ``too_large`` for that request, and
the loop gives the heap back to the system (``mlipd.malloc.give_back_heap``) when the
memory a large step left behind will not be reused (``trim_if_due``: after a much
smaller batch, when idle, after an allocation failure), so the resident memory returns
near its baseline instead of keeping the largest request's.
A request cancelled by its client, or whose client went away, leaves the queue at
once and is answered ``cancelled`` (``cancel``), never computed.

``close`` stops taking requests, computes what is queued while its time lasts,
answers the rest ``busy``, and reports whether the loop had to be abandoned (an
engine call that did not return in time).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import Protocol

import zmq

from mlipd.engine.deadline import deadline
from mlipd.errors import (
    Busy,
    CalculationFailed,
    DeadlineExceeded,
    MlipdError,
    ServerUnavailable,
    TooLarge,
)
from mlipd.malloc import give_back_heap, resident_bytes
from mlipd.memory import is_out_of_memory
from mlipd.server.metrics import Metrics
from mlipd.server.scheduler import Scheduler, Ticket, flatten, split
from mlipd.types import Result, Structure

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT_S = 600.0
LEND_AFTER_S = 0.05  # an engine call this long lends the sockets to their own threads
# When to give the heap back (``trim_if_due``). mlipd.malloc keeps freed blocks so that
# steps of one size reuse their pages; a step's memory is set by its atoms and edges, not
# its frame (a 48,668-atom LJ step: a 1.2 MB frame, ~1.5 GB of heap). A trim costs its
# walk (~0.2 s per GB on a 2-core EPYC) and, for the next step that needs that memory
# again, its page faults (that 48k-atom step: 1.9 s on a warm heap, 2.6 s after a trim),
# so it runs only when the memory would otherwise sit unused:
# - after a batch of at most 1/SHRINK the atoms of the largest batch since the last
#   trim: the work moved to smaller structures, whose steps use a fraction of that heap
#   (and that batch's rebuild has freed the large one's cached lists). MD of one
#   system, the same size every step, never meets this;
# - when no batch has run for IDLE_TRIM_S: no step is there to reuse the memory (longer
#   than the pause between the steps of a running simulation); also what frames refused
#   before the queue left behind;
# - after an allocation failure, at once.
# Each only when the resident memory is TRIM_MIN_BYTES (IDLE_TRIM_MIN_BYTES when idle)
# above its lowest level after a trim: the give-back also runs a full garbage collection
# (~0.2 s with torch loaded), worth it between requests only for a large heap.
SHRINK = 4
IDLE_TRIM_S = 2.0
TRIM_MIN_BYTES = 256 << 20
IDLE_TRIM_MIN_BYTES = 64 << 20


class FrontEnd(Protocol):
    """A socket the loop polls while it holds ``lock``: readable -> ``on_readable()``;
    after every batch and wake-up ``flush()`` sends what is ready. ``lend()`` releases
    the socket for an engine call, ``reclaim()`` takes it back (see module docstring)."""

    socket: zmq.Socket

    def on_readable(self) -> None: ...

    def flush(self) -> None: ...

    def lend(self) -> None: ...

    def reclaim(self) -> None: ...


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
        self._front_ends: list[FrontEnd] = []
        self._running = False  # the loop is between start and its end
        self.busy_since: float | None = None  # when the running engine call started
        # heap give-back state (trim_if_due), loop thread only but for _quiet_since
        self._baseline = resident_bytes()  # the lowest resident bytes after a trim
        self._peak_atoms = 0  # the largest batch whose memory the heap may still hold
        self._shrunk = False  # a batch under 1/SHRINK of _peak_atoms has run
        self._failed = False  # an allocation failure: give its memory back at once
        self._last_atoms = 0
        self._last_batch = float("-inf")  # when the last batch started or ended
        self._idle_check: float | None = None  # when to check for idleness (None: no need)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._loop, name="mlipd-engine", daemon=True)

    def attach(self, front_end: FrontEnd) -> None:
        """Serve ``front_end`` on the loop thread; call before ``start``."""
        if self._thread.is_alive():
            raise RuntimeError("attach front ends before start()")
        self._front_ends.append(front_end)

    def start(self) -> None:
        self._running = True
        self._thread.start()

    def needs_help(self) -> bool:
        """Whether front ends should serve their sockets themselves now: the loop is in
        a long engine call, or it has ended (shutdown)."""
        if not self._running:
            return True
        since = self.busy_since
        return since is not None and self.clock() - since > LEND_AFTER_S

    # ------------------------------------------------------------ any thread

    def submit(self, source: Hashable, structures: Sequence[Structure], *,
               virial: bool = True, nbytes: int | None = None) -> Future:
        """Queue one request; the future gives its results. Raises ``Busy`` when full
        or shutting down. ``nbytes``: the memory the request holds while queued (its
        frame; default: its arrays)."""
        fut: Future = Future()
        if nbytes is None:
            nbytes = sum(s.positions.nbytes + s.numbers.nbytes + s.cell.nbytes
                         for s in structures)
        ticket = Ticket(source=source, structures=tuple(structures), arrived=self.clock(),
                        token=fut, virial=virial, nbytes=int(nbytes))
        with self._lock:
            if self._stopping:
                raise Busy("server is shutting down")
            self.scheduler.submit(ticket)
            self.metrics.on_queue(len(self.scheduler))
            self.metrics.on_queue_bytes(self.scheduler.pending_bytes)
        if threading.current_thread() is not self._thread:
            self._wake()
        return fut

    def drop(self, fut: Future, error: MlipdError, *, reason: str) -> bool:
        """Take a queued request out of the queue and answer it ``error`` (its client
        cancelled it or went away; counted in ``stats`` as ``dropped[reason]``). False
        when it is not queued any more (computing or answered): it runs to its end."""
        with self._lock:
            ticket = self.scheduler.remove(fut)
            if ticket is not None:
                self.metrics.on_queue(len(self.scheduler))
                self.metrics.on_queue_bytes(self.scheduler.pending_bytes)
        if ticket is None:
            return False
        self.metrics.on_dropped(reason)
        self.note_freed(ticket.nbytes)
        self._finish(ticket, error)
        return True

    def note_freed(self, nbytes: int) -> None:
        """A front end let go of a request's ``nbytes`` (refused, dropped, answered):
        once the loop is idle (``IDLE_TRIM_S``) it checks for memory to give back."""
        self._arm_idle_check()

    def trim_if_due(self) -> None:
        """Give the heap back when the memory a large step left will not be reused (the
        rules at ``SHRINK``): after a much smaller batch, when idle, or after an
        allocation failure; only when resident memory is well above its baseline. Loop
        thread."""
        idle = False
        check = self._idle_check
        if check is not None and self.clock() >= check:
            self._idle_check = None
            if self.clock() - self._last_batch < IDLE_TRIM_S:  # a batch ran meanwhile
                self._idle_check = self._last_batch + IDLE_TRIM_S
            else:
                idle = not len(self.scheduler)
        if not (self._shrunk or idle or self._failed):
            return
        above = resident_bytes() - self._baseline
        if self._failed or above >= (IDLE_TRIM_MIN_BYTES if idle else TRIM_MIN_BYTES):
            give_back_heap()
            self.metrics.on_trim()
            self._baseline = min(self._baseline, resident_bytes())
            if self._shrunk:  # the large batch's lists were freed by this one's rebuild
                self._peak_atoms = self._last_atoms
        self._shrunk = self._failed = False

    def _arm_idle_check(self) -> None:
        if self._idle_check is None:  # the first activity since the last check
            self._idle_check = self.clock() + IDLE_TRIM_S

    def _ran(self, n_atoms: int) -> None:
        """A batch of ``n_atoms`` goes to the engine (to be answered or refused)."""
        self._last_batch = self.clock()
        self._arm_idle_check()
        self._last_atoms = n_atoms
        if n_atoms * SHRINK <= self._peak_atoms:
            self._shrunk = True
        self._peak_atoms = max(self._peak_atoms, n_atoms)

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
        poller = zmq.Poller()
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        for fe in self._front_ends:
            poller.register(fe.socket, zmq.POLLIN)
            fe.reclaim()
        try:
            while True:
                try:
                    if not self._step(poller):
                        return
                except Exception as e:  # the loop's one catch-all: fail that batch, go on
                    log.exception("engine loop: unexpected error")
                    err = MlipdError(f"internal error: {type(e).__name__}: {e}")  # "internal"
                    for t in self._current:
                        self._finish(t, err)
                finally:
                    self._current = []
        finally:
            self._running = False
            for fe in self._front_ends:
                fe.lend()  # for good: their own threads answer until they close

    def _step(self, poller: zmq.Poller) -> bool:
        """One turn: run a due batch, or wait for I/O until one is due. False: stop."""
        with self._lock:
            now = self.clock()
            late = self._stopping and now > self._drain_until
            refused = self._take_all() if late else None
        if refused is not None:
            if refused:
                log.warning("shutdown: %d queued requests answered busy", len(refused))
            for t in refused:
                self._finish(t, Busy("server is shutting down"))
            self._flush()
            return False
        with self._lock:
            now = self.clock()
            batch = self.scheduler.take(now, force=self._stopping)
            if batch:
                self.metrics.on_queue(len(self.scheduler))
                self.metrics.on_queue_bytes(self.scheduler.pending_bytes)
            due = self.scheduler.deadline()
        if batch:
            self._current = batch
            for fe in self._front_ends:
                fe.lend()
            try:
                self._run(batch)
            finally:
                self.busy_since = None
                self._last_batch = self.clock()  # idle counts from a batch's end
                for fe in self._front_ends:
                    fe.reclaim()
            self._flush()
            return True
        if self._stopping:  # drained: what arrived meanwhile is answered by the front ends
            self._flush()
            return False
        idle_at = self._idle_check
        if idle_at is not None:
            due = idle_at if due is None else min(due, idle_at)
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
        self.trim_if_due()

    def _take_all(self) -> list[Ticket]:
        """Every queued ticket (hold the lock)."""
        out: list[Ticket] = []
        while batch := self.scheduler.take(self.clock(), force=True):
            out += batch
        self.metrics.on_queue(0)
        self.metrics.on_queue_bytes(0)
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
        self._ran(sum(t.n_atoms for t in live))
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
        try:
            with deadline(min(t.arrived for t in batch) + self.request_timeout_s):
                results = self.engine.compute(structures, virial=any(t.virial for t in batch))
        except (MemoryError, RuntimeError, CalculationFailed) as e:
            if not is_out_of_memory(e):
                raise
            self._failed = True  # give the failed call's memory back now
            raise TooLarge(f"out of memory computing {sum(t.n_atoms for t in batch)} atoms "
                           f"({type(e).__name__}: {str(e)[:200]}); lower the request's size "
                           "or --max-request-memory") from e
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
