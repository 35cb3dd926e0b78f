"""The ZeroMQ front end: a ROUTER socket, served by the engine loop between engine
calls and by a thread of its own during long ones (``mlipd.server.worker``).

Frames in: ``[routing id(s)..., payload]`` (a DEALER client sends one payload frame,
a REQ client an empty delimiter before it; both work, the envelope goes back
unchanged). The payload is a ``mlipd.protocols.zmq_msgs`` request.

Whoever holds ``lock`` uses the socket (its acquire/release is the full memory
barrier under which libzmq lets a socket migrate between threads): the engine loop
(no hand-over between threads on the fast path), or, while the loop computes for longer than
``LEND_AFTER_S`` or after it has ended, this endpoint's own thread, so ``ping``,
``info``, ``stats`` and ``busy`` are answered during long engine calls (torch cannot
be interrupted, and a long call must not look like a dead server). Compute requests
go to the engine worker; their replies are packed on the engine thread when the
future resolves and sent by whoever holds the socket. A request repeated with the
same id on the same connection (a client's heartbeat) is answered from the
``Ledger``: ``pending`` while it is queued or computing, the same reply once
finished; it is never computed twice.

A client may ``cancel`` a request of its own (same connection, by id): still queued, it
leaves the queue at once and is answered ``cancelled``; computing or answered, the
cancel says so and changes nothing. When a client's connection closes, its queued
requests are dropped the same way, uncomputed, and forgotten by the ledger (a client
that reconnects and resends gets its request computed). Which connection a request came
over is its frame's file descriptor (ZMQ_SRCFD); a socket monitor reports each closed
descriptor (EVENT_DISCONNECTED), read before every message, so a descriptor the kernel
reuses for a new connection is never confused with the closed one. libzmq's
ROUTER_NOTIFY would name the routing id, but it is a draft API that pyzmq's libzmq 4.3
does not enable. Both count in ``stats`` (``dropped``).

Every failure is an error reply: bad frames (``protocol``), bad fields
(``bad_input``), sizes (``too_large``), a full queue or shutdown (``busy``), and any
unexpected exception (``internal``). A frame larger than ``max_message_bytes``
makes zmq drop that peer's connection (ZMQ_MAXMSGSIZE).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future
from typing import Any

import zmq
import zmq.utils.monitor

from mlipd.errors import (
    Busy,
    Cancelled,
    MlipdError,
    ProtocolError,
    SetupError,
    TooLarge,
    UnknownSpecies,
    ValidationError,
)
from mlipd.protocols import zmq_msgs
from mlipd.protocols.zmq_address import parse_zmq_address
from mlipd.server.ledger import Entry, Ledger, fingerprint
from mlipd.server.metrics import Metrics
from mlipd.server.security import CurveServer, IpcSocket, check_reach
from mlipd.server.worker import EngineWorker

log = logging.getLogger(__name__)

_RECV_BURST = 64  # messages read per wake-up before replies get a turn
_LINGER_MS = 2000  # replies still queued at close get this long to leave
_LENT_POLL_S = 0.02  # how often the endpoint's thread looks whether the loop needs help
_GIVE_BACK_MS = 10  # while lent, the socket is polled this long before checking reclaim


def max_message_bytes(max_atoms: int, max_structures: int) -> int:
    """A frame limit that fits the largest allowed request (int32 numbers, f8 positions)."""
    return 32 * max_atoms + 512 * max_structures + 65536


class ZmqEndpoint:
    """Serve ``address`` (``tcp://host:port``, port ``*`` or 0 picks one; ``ipc://path``).

    info:    the ``info`` op's value
    stats:   returns the ``stats`` op's value
    species: atomic numbers the model knows (None: any); others get ``unknown_species``
    allow_remote: bind beyond loopback
    curve:   CURVE keys and authenticator (``mlipd.server.security``), or None
    context: the zmq context (the authenticator must share it)
    """

    def __init__(self, address: str, *, worker: EngineWorker, info: Mapping[str, Any],
                 stats: Callable[[], Mapping[str, Any]], metrics: Metrics,
                 context: zmq.Context, species: frozenset[int] | None = None,
                 max_atoms: int = zmq_msgs.DEFAULT_MAX_ATOMS,
                 max_structures: int = zmq_msgs.DEFAULT_MAX_STRUCTURES,
                 allow_remote: bool = False, curve: CurveServer | None = None) -> None:
        self.worker = worker
        self.info = dict(info)
        self.stats = stats
        self.metrics = metrics
        self.species = species
        self.max_atoms = max_atoms
        self.max_structures = max_structures
        self.ledger = Ledger()
        parsed = parse_zmq_address(address, bind=True)
        check_reach(parsed, allow_remote=allow_remote)
        self._ipc = IpcSocket(parsed.path) if parsed.transport == "ipc" else None
        if self._ipc is not None:
            self._ipc.check_free()
        self._sock = context.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes(max_atoms, max_structures))
        self._sock.setsockopt(zmq.LINGER, _LINGER_MS)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client's reconnect keeps its id
        self._by_fd: dict[int, set[Hashable]] = {}  # requests at work, by connection
        self._fd_of: dict[Hashable, int] = {}
        self._gone: set[Hashable] = set()  # keys dropped because their connection closed
        self._peers_lock = threading.Lock()  # both: the socket's holder and the engine thread
        if parsed.ipv6:  # only then: IPv4 addresses would be reported v4-mapped
            self._sock.setsockopt(zmq.IPV6, 1)
        if curve is not None:
            curve.apply(self._sock)
        try:
            with self._ipc.owner_only() if self._ipc else contextlib.nullcontext():
                self._sock.bind(parsed.text)
        except zmq.ZMQError as e:
            self._sock.close(0)
            raise SetupError(f"cannot bind ZeroMQ endpoint {address!r}: {e}") from e
        self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.socket = self._sock
        self.lock = threading.Lock()  # held by whoever uses the socket
        self._give_back = False
        self._outbox: deque[tuple[list[bytes], bytes]] = deque()
        self._accepting = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_when_lent,
                                        name=f"mlipd-zmq-{self.address}", daemon=True)
        worker.attach(self)

    def start(self) -> None:
        """Start the thread that serves the socket while the engine loop cannot (call
        after the worker has started)."""
        self._thread.start()

    def stop_accepting(self) -> None:
        """New compute requests get ``busy`` from now on; queued ones are still answered,
        and ``ping``/``info``/``stats`` too."""
        self._accepting = False

    def close(self) -> None:
        """Send every reply queued so far, stop the thread, close the socket (call after
        the engine worker has finished or abandoned its requests)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        with self.lock:  # the loop has lent it for good, or is stuck in the engine
            self.flush()  # what a late done-callback queued
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._sock.close(linger=_LINGER_MS)
        if self._ipc is not None:
            self._ipc.remove()

    # ------------------------------------------------------------ who holds the socket

    def lend(self) -> None:
        """The engine loop lets go of the socket (an engine call, or its end)."""
        self.lock.release()

    def reclaim(self) -> None:
        """The engine loop takes the socket back (waits at most one short poll)."""
        self._give_back = True
        self.lock.acquire()
        self._give_back = False

    def _serve_when_lent(self) -> None:
        while not self._stop.wait(_LENT_POLL_S):
            if not self.worker.needs_help() or not self.lock.acquire(blocking=False):
                continue
            try:
                while (not self._give_back and not self._stop.is_set()
                       and self.worker.needs_help()):
                    if self._sock.poll(_GIVE_BACK_MS, zmq.POLLIN):
                        self.on_readable()
                    self.flush()
            except Exception:  # this thread's one catch-all: log, keep serving
                log.exception("ZeroMQ endpoint %s: unexpected error", self.address)
            finally:
                self.lock.release()

    # ------------------------------------------------------------ I/O (holding the lock)

    def on_readable(self) -> None:
        """Read what has arrived (a bounded burst, so replies get their turn)."""
        for _ in range(_RECV_BURST):
            # closes first: a descriptor is reused at once (the lowest free one), and its
            # new connection's ACCEPT, hence its messages, come after the old one's
            # DISCONNECTED on the monitor, which is read before each message
            self._closed_connections()
            try:
                # zero-copy frames: msgpack reads the payload in place
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue  # no routing id: cannot answer
            envelope = [f.bytes for f in frames[:-1]]
            payload = frames[-1]
            try:
                self._handle(envelope, payload.buffer, _source_fd(payload))
            except Exception as e:  # any bug in handling: an internal error reply, not silence
                log.exception("request handling failed")
                self._error(envelope, None, MlipdError(f"internal error: "
                                                       f"{type(e).__name__}: {e}"))
            finally:
                self.worker.note_freed(len(payload))  # queued: the worker counts it again

    def flush(self) -> None:
        """Drop the queued work of closed connections; send the replies of finished
        requests."""
        self._closed_connections()
        while self._outbox:
            envelope, payload = self._outbox.popleft()
            self._send(envelope, payload)

    def _send(self, envelope: list[bytes], payload: bytes) -> None:
        try:
            self._sock.send_multipart([*envelope, payload], copy=len(payload) < 65536)
        except zmq.ZMQError as e:  # peer gone: nothing to answer to
            log.debug("reply dropped: %s", e)

    def _error(self, envelope: list[bytes], rid: int | None, err: MlipdError) -> None:
        self.metrics.on_error(err.code)
        self._send(envelope, zmq_msgs.pack_error(rid, err))

    def _handle(self, envelope: list[bytes], raw: memoryview, fd: int | None = None) -> None:
        self.metrics.on_request("zmq")
        try:
            msg = zmq_msgs.load_request(raw, max_structures=self.max_structures)
        except (ProtocolError, TooLarge) as e:  # TooLarge: a list of too many structures
            self._error(envelope, None, e)
            return
        rid = zmq_msgs.request_id(msg)
        op = msg.get("op") if isinstance(msg, Mapping) else None
        key = (tuple(envelope), rid)
        fp = b""
        if rid is not None and isinstance(op, str) and op in zmq_msgs.COMPUTE_OPS:
            fp = fingerprint(raw)
            entry = self.ledger.get(key)
            if entry is not None and entry.fingerprint == fp:
                self._repeat(envelope, rid, entry)
                return
            if entry is not None and entry.reply is None:
                self._error(envelope, rid, ValidationError(
                    f"request id {rid} is in use by another request still at work on this "
                    "connection; give every request its own id"))
                return
            if entry is not None:
                self.ledger.forget(key)  # an id reused for a new request: compute that
        try:
            req = zmq_msgs.check_request(msg, max_atoms=self.max_atoms,
                                         max_structures=self.max_structures)
        except zmq_msgs.BadRequest as e:
            self._error(envelope, e.req_id, e)
            return
        self.metrics.on_request(req.op)
        if req.op == "ping":
            self._send(envelope, zmq_msgs.pack_value(req.id, {"pong": True, "time": time.time()}))
        elif req.op == "info":
            self._send(envelope, zmq_msgs.pack_value(req.id, self.info))
        elif req.op == "stats":
            self._send(envelope, zmq_msgs.pack_value(req.id, self.stats()))
        elif req.op == "cancel":
            state = self._cancel((tuple(envelope), req.target))
            self._send(envelope, zmq_msgs.pack_value(req.id, {"target": req.target,
                                                              "state": state}))
        else:
            self._compute(envelope, key, req, fp, len(raw), fd)

    def _cancel(self, key: Hashable) -> str:
        """Drop this connection's request ``key`` if it is still queued: "cancelled",
        else "computing", "finished" or "unknown"."""
        entry = self.ledger.get(key)
        if entry is None:
            return "unknown"
        if entry.reply is not None or entry.future is None:
            return "finished"
        if self.worker.drop(entry.future, Cancelled(f"request {key[1]} cancelled by its "
                                                    "client"), reason="cancelled"):
            return "cancelled"
        return "finished" if entry.future.done() else "computing"

    def _closed_connections(self) -> None:
        """Read the monitor's closed connections and drop their queued requests."""
        while True:
            try:
                event = zmq.utils.monitor.recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._connection_closed(int(event["value"]))

    def _connection_closed(self, fd: int) -> None:
        """Drop the queued requests that came over ``fd`` (not the one computing)."""
        with self._peers_lock:
            keys = list(self._by_fd.pop(fd, ()))
            for key in keys:
                self._fd_of.pop(key, None)
        for key in keys:
            entry = self.ledger.get(key)
            if entry is None or entry.future is None:
                continue
            with self._peers_lock:
                self._gone.add(key)
            if not self.worker.drop(entry.future, Cancelled("client disconnected"),
                                    reason="disconnected"):
                with self._peers_lock:
                    self._gone.discard(key)  # computing: its reply is kept for a resend
        if keys:
            log.debug("connection %d closed; %d requests of it were at work", fd, len(keys))

    def _repeat(self, envelope: list[bytes], rid: int, entry: Entry) -> None:
        self.metrics.on_request("repeat")
        if entry.reply is not None:
            self._send(envelope, entry.reply)
            return
        fut = entry.future
        state = "computing" if fut is not None and (fut.running() or fut.done()) else "queued"
        self._send(envelope, zmq_msgs.pack_pending(rid, state=state,
                                                   waited_s=self.ledger.clock() - entry.arrived))

    def _compute(self, envelope: list[bytes], key: Hashable, req: zmq_msgs.Request,
                 fp: bytes, nbytes: int, fd: int | None) -> None:
        if self.species is not None:
            for k, s in enumerate(req.structures):
                unknown = s.species() - self.species
                if unknown:
                    self._error(envelope, req.id, UnknownSpecies(
                        f"structure {k}: model does not know {_names(unknown)}"))
                    return
        if not self._accepting:
            self._error(envelope, req.id, Busy("server is shutting down"))
            return
        try:
            fut = self.worker.submit(envelope[0], req.structures, virial=req.virial,
                                     nbytes=nbytes)
        except Busy as e:
            self._error(envelope, req.id, e)
            return
        self.ledger.start(key, fut, fp)
        if fd is not None:
            with self._peers_lock:
                self._by_fd.setdefault(fd, set()).add(key)
                self._fd_of[key] = fd
        fut.add_done_callback(functools.partial(self._done, envelope, key, req.id))

    def _done(self, envelope: list[bytes], key: Hashable, rid: int, fut: Future) -> None:
        """On the thread that resolved ``fut`` (the engine's): pack, remember, queue."""
        with self._peers_lock:
            fd = self._fd_of.pop(key, None)
            keys = self._by_fd.get(fd) if fd is not None else None
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_fd[fd]
            gone = key in self._gone
            self._gone.discard(key)
        if gone:  # its client closed: nobody to answer, nothing to keep
            self.ledger.discard(key)
            return
        exc = fut.exception()
        try:
            payload = (zmq_msgs.pack_results(rid, fut.result()) if exc is None
                       else zmq_msgs.pack_error(rid, exc))
        except (TypeError, ValueError, OverflowError) as e:  # e.g. extras msgpack cannot hold
            err = MlipdError(f"cannot encode the result: {e}")
            self.metrics.on_error(err.code)
            payload = zmq_msgs.pack_error(rid, err)
        self.ledger.finish(key, payload)
        self._outbox.append((envelope, payload))


def _source_fd(frame: zmq.Frame) -> int | None:
    """The file descriptor of the connection a frame came over (ZMQ_SRCFD), or None."""
    try:
        fd = frame.get(zmq.SRCFD)
    except (zmq.ZMQError, AttributeError, ValueError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def _names(numbers: set[int]) -> str:
    from ase.data import chemical_symbols

    return ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in sorted(numbers))
