"""The i-PI link: mlipd as the force client of one i-PI ``<ffsocket>`` (or ASE's
SocketIOCalculator), used by ``mlipd drive`` and ``mlipd serve --ipi`` alike.

A link connects to one address, answers it with ``mlipd.driver.loop.serve_connection``
over the address's transport (the socket stream, or i-PI's shared memory for
``shm:`` addresses) and, with ``reconnect``, connects again when the MD code exits or
restarts (``serve``); without, it ends at EXIT or close (``drive``).

Where the forces come from is the link's ``compute``:

* ``Scheduled``: every POSDATA (one bead, or i-PI's batch) is one request to the
  engine worker, and while connected the link is a *gated* source of the scheduler:
  the beads that i-PI sends over several connections in one step wait for each other
  (bounded by ``--max-wait-ms``) and become one engine call. While its request waits,
  the link watches its socket: a request whose socket has closed is cancelled and
  never computed (counted as ``dropped`` in ``stats``).
* ``Inline``: the engine is called on the link's own thread. Used when this link is
  the only source (one address, no ZeroMQ): a single i-PI client then pays no thread
  hand-off (two wake-ups per step).
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import socket
import threading
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Protocol

from mlipd.driver.loop import ConnectionReport, SocketTransport, Transport, serve_connection
from mlipd.driver.socket_io import (
    DEFAULT_FRAME_TIMEOUT_S,
    Address,
    FramedSocket,
    connect,
)
from mlipd.driver.template import Template
from mlipd.engine.deadline import deadline
from mlipd.errors import ConnectionClosed, MlipdError, ServerUnavailable
from mlipd.protocols import ipi
from mlipd.server.metrics import Metrics
from mlipd.server.worker import DEFAULT_REQUEST_TIMEOUT_S, EngineWorker
from mlipd.types import Result, Structure

log = logging.getLogger(__name__)

_WATCH_S = 1.0  # longest wait between two looks at a waiting request (lost wake-ups)


@dataclass(frozen=True)
class LinkOptions:
    """How links connect and read.

    template:          atomic numbers and pbc, which i-PI never sends
    reconnect:         connect again after EXIT or a close (``serve``); else end (``drive``)
    connect_timeout_s: give up connecting after this long (without ``reconnect``)
    idle_timeout_s:    longest silence between two messages (``--timeout``)
    frame_timeout_s:   a message begun must be complete within this
    max_atoms:         refuse messages with more atoms
    busy_poll_s:       poll for the next message without sleeping for up to this long
                       (``FramedSocket``'s ``busy_poll``; ``--busy-poll-us``)
    """

    template: Template
    reconnect: bool = True
    connect_timeout_s: float = math.inf
    idle_timeout_s: float = 3600.0  # an MD code may think for a long time between steps
    frame_timeout_s: float = DEFAULT_FRAME_TIMEOUT_S
    max_atoms: int = ipi.DEFAULT_MAX_ATOMS
    busy_poll_s: float = 0.0


class LinkCompute(Protocol):
    """Forces for one POSDATA of the connection ``conn``."""

    def __call__(self, conn: FramedSocket, structures: Sequence[Structure]) -> list[Result]: ...


class Inline:
    """The engine called on the caller's thread (the only source: nothing to batch with).

    Keeps the worker's counters and deadline, so ``stats`` and the logs read the same.
    """

    def __init__(self, engine, *, metrics: Metrics,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> None:
        self.engine = engine
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s

    def __call__(self, conn: FramedSocket, structures: Sequence[Structure]) -> list[Result]:
        t0 = time.monotonic()
        try:
            with deadline(t0 + self.request_timeout_s):
                results = self.engine.compute(list(structures), virial=True)
        except MlipdError as e:
            self.metrics.on_error(e.code)
            raise
        dt = time.monotonic() - t0
        self.metrics.on_engine_call(n_structures=len(structures),
                                    n_atoms=sum(s.n_atoms for s in structures), seconds=dt)
        self.metrics.on_answered(dt)
        return results


class Scheduled:
    """Each POSDATA a request to the engine worker, from ``source``; cancelled when the
    connection closes while it waits."""

    def __init__(self, worker: EngineWorker, *, source: Hashable, metrics: Metrics) -> None:
        self.worker = worker
        self.source = source
        self.metrics = metrics
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def __call__(self, conn: FramedSocket, structures: Sequence[Structure]) -> list[Result]:
        fut = self.worker.submit(self.source, structures, virial=True)
        fut.add_done_callback(self._wake)
        watch = select.poll()
        watch.register(self._wake_r, select.POLLIN)
        watch.register(conn.sock, select.POLLIN)
        limit = time.monotonic() + self.worker.request_timeout_s + 60.0
        while not fut.done():
            events = dict(watch.poll(1e3 * _WATCH_S))
            if self._wake_r.fileno() in events:  # a wake-up, perhaps an earlier request's
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(64)
            if conn.sock.fileno() in events:
                if conn.peer_closed():
                    if fut.cancel():
                        self.metrics.on_dropped("disconnected")
                        raise ConnectionClosed("the server closed the connection while its "
                                               "request waited; dropped, not computed")
                    fut.exception()  # computing already: let it finish, then end
                    raise ConnectionClosed("the server closed the connection during its "
                                           "request")
                watch.unregister(conn.sock)  # a message waits (i-PI's STATUS): read later
            if time.monotonic() > limit:  # the deadline fails a request; a lost future:
                raise ServerUnavailable("no result from the engine worker")
        try:
            return fut.result()
        except CancelledError:
            raise ConnectionClosed("request cancelled") from None

    def _wake(self, _fut: Future) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()


@dataclass
class LinkOutcome:
    """What a link did: ``reports`` of its connections, ``error`` of the last one
    (None when it ended cleanly)."""

    address: str
    reports: list[ConnectionReport] = field(default_factory=list)
    error: str | None = None

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.reports)


class IpiLink:
    """One i-PI client connection (reconnecting or not) on a thread of its own.

    address: a parsed ``mlipd.driver.socket_io.Address`` (``shm`` picks the transport)
    compute: ``Inline`` or ``Scheduled``
    worker:  with ``Scheduled``, the worker the link registers with as a gated source
    """

    def __init__(self, address: Address, *, compute: LinkCompute, options: LinkOptions,
                 metrics: Metrics, worker: EngineWorker | None = None,
                 source: Hashable = None) -> None:
        self.address = address
        self.compute = compute
        self.options = options
        self.metrics = metrics
        self.worker = worker
        self.source = source if source is not None else ("ipi", address.text)
        self.outcome = LinkOutcome(address.text)
        self.connected = False
        self.sessions = 0  # connections made so far
        self._stop = threading.Event()
        self._conn: FramedSocket | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"mlipd-ipi-{address.text}",
                                        daemon=True)
        self._waits_logged = 0

    def start(self) -> None:
        self._thread.start()

    @property
    def done(self) -> bool:
        return self._thread.ident is not None and not self._thread.is_alive()

    @property
    def running(self) -> bool:
        """The link's thread is alive (connecting, serving, or computing)."""
        return self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the link to end (only without ``reconnect``); True when it has."""
        self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """No (re)connecting from now on; the current exchange may still finish."""
        self._stop.set()

    def join(self, *, timeout_s: float = 10.0) -> None:
        """Close the connection (i-PI requeues what it had sent) and wait for the thread."""
        self._stop.set()
        with self._lock:
            if self._conn is not None:
                self._conn.close()  # unblocks the reading thread
        self._thread.join(timeout=timeout_s)
        if isinstance(self.compute, Scheduled) and not self._thread.is_alive():
            self.compute.close()

    # ------------------------------------------------------------ link thread

    def _say_waiting(self, line: str) -> None:
        """The first wait for a server, and every 10 s after, at info; a reconnecting
        link's later waits (the MD code gone for good?) at debug after the first minute."""
        self._waits_logged += 1
        quiet = self.options.reconnect and self._waits_logged > 6
        log.log(logging.DEBUG if quiet else logging.INFO, "%s", line)

    def _run(self) -> None:
        # a link that connects once (drive) is a gated source from the start: the first
        # force requests wait (bounded) for the connections still being made, so the
        # beads of the first step share one engine call too
        gate_all_along = self.worker is not None and not self.options.reconnect
        if gate_all_along:
            self.worker.add_gated(self.source)
        try:
            self._connect_and_serve()
        finally:
            if gate_all_along:
                self.worker.remove_gated(self.source)

    def _connect_and_serve(self) -> None:
        o = self.options
        while not self._stop.is_set():
            self._waits_logged = 0
            try:
                sock = connect(self.address, timeout=o.connect_timeout_s, stop=self._stop,
                               say=self._say_waiting)
            except ServerUnavailable as e:
                if not self._stop.is_set():
                    self.outcome.error = str(e)
                    log.error("%s", e)
                return
            conn = FramedSocket(sock, timeout=o.idle_timeout_s, frame_timeout=o.frame_timeout_s,
                                busy_poll=o.busy_poll_s)
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    return
                self._conn = conn
            self._session(conn)
            if not o.reconnect:
                return
            self._stop.wait(0.05)  # do not spin against a server that closes at once

    def _session(self, conn: FramedSocket) -> None:
        name = self.address.text
        self.connected = True
        self.sessions += 1
        gate = self.worker is not None and self.options.reconnect
        if gate:
            self.worker.add_gated(self.source)
        log.info("%s: connected", name)
        transport = self._transport()
        self.outcome.error = None

        def compute(structures):
            self.metrics.on_request("ipi")
            return self.compute(conn, structures)

        report = ConnectionReport()
        try:
            serve_connection(conn, compute, transport, name=name, report=report)
        except (MlipdError, OSError) as e:
            if not self._stop.is_set():
                self.outcome.error = f"{type(e).__name__}: {e}"
                then = "reconnecting" if self.options.reconnect else "closing this connection"
                log.error("%s: %s; %s", name, self.outcome.error, then)
                self.metrics.on_error(getattr(e, "code", "closed"))
        except Exception as e:  # the link's one catch-all: this connection only
            self.outcome.error = f"{type(e).__name__}: {e}"
            log.exception("%s: unexpected error; closing this connection", name)
            self.metrics.on_error("internal")
        finally:
            self.outcome.reports.append(report)
            if gate:
                self.worker.remove_gated(self.source)
            self.connected = False
            transport.close()
            with self._lock:
                self._conn = None
            with contextlib.suppress(OSError):
                conn.close()

    def _transport(self) -> Transport:
        o = self.options
        if self.address.shm:
            from mlipd.driver.shm import ShmTransport

            return ShmTransport(template=o.template, max_atoms=o.max_atoms)
        return SocketTransport(template=o.template, max_atoms=o.max_atoms)
