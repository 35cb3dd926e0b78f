"""The ZeroMQ front end: a ROUTER socket polled by the engine loop (``mlipd.server.worker``).

Frames in: ``[routing id(s)..., payload]`` (a DEALER client sends one payload
frame, a REQ client an empty delimiter before it; both work, the envelope goes
back unchanged). The payload is a ``mlipd.protocols.zmq_msgs`` request.
``info``/``ping``/``stats`` are answered at once; compute requests go to the
scheduler, and their replies are sent by ``flush`` after the engine call. Every
failure is an error reply; a frame larger than ``max_message_bytes`` makes zmq
drop that peer's connection (ZMQ_MAXMSGSIZE). All methods run on the loop thread.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import zmq

from mlipd.errors import Busy, MlipdError, ProtocolError, UnknownSpecies
from mlipd.protocols import zmq_msgs
from mlipd.server.metrics import Metrics
from mlipd.server.worker import EngineWorker

log = logging.getLogger(__name__)

_RECV_BURST = 64  # messages read per wake-up before replies get a turn


def max_message_bytes(max_atoms: int, max_structures: int) -> int:
    """A frame limit that fits the largest allowed request (int32 numbers, f8 positions)."""
    return 32 * max_atoms + 512 * max_structures + 65536


class ZmqEndpoint:
    """Serve ``address`` (``tcp://host:port``, port ``*`` or 0 picks one; ``ipc://path``).

    info:  the ``info`` op's value
    stats: returns the ``stats`` op's value
    species: atomic numbers the model knows (None: any); others get ``unknown_species``
    """

    def __init__(self, address: str, *, worker: EngineWorker, info: Mapping[str, Any],
                 stats: Callable[[], Mapping[str, Any]], metrics: Metrics,
                 species: frozenset[int] | None = None,
                 max_atoms: int = zmq_msgs.DEFAULT_MAX_ATOMS,
                 max_structures: int = zmq_msgs.DEFAULT_MAX_STRUCTURES) -> None:
        self.worker = worker
        self.info = dict(info)
        self.stats = stats
        self.metrics = metrics
        self.species = species
        self.max_atoms = max_atoms
        self.max_structures = max_structures
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes(max_atoms, max_structures))
        self._sock.setsockopt(zmq.LINGER, 1000)
        if address.startswith("tcp://") and address.endswith(":0"):
            address = address[:-2] + ":*"  # zmq spells "any free port" as *
        try:
            self._sock.bind(address)
        except zmq.ZMQError as e:
            self._sock.close(0)
            self._ctx.term()
            from mlipd.errors import SetupError

            raise SetupError(f"cannot bind ZeroMQ endpoint {address!r}: {e}") from e
        self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.socket = self._sock
        self._replies: deque[tuple[list[bytes], int, Future]] = deque()
        self._accepting = True

    def stop_accepting(self) -> None:
        """New compute requests get ``busy`` from now on; queued ones are still answered."""
        self._accepting = False

    def close(self) -> None:
        """Close the socket (after the loop thread has stopped)."""
        self._sock.close(linger=1000)
        self._ctx.term()

    def on_readable(self) -> None:
        """Read what has arrived (a bounded burst, so replies get their turn)."""
        for _ in range(_RECV_BURST):
            try:
                # zero-copy frames: msgpack reads the payload in place
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(frames)

    def flush(self) -> None:
        """Send the replies of finished requests."""
        while self._replies:
            envelope, rid, fut = self._replies.popleft()
            exc = fut.exception()
            try:
                payload = (zmq_msgs.pack_results(rid, fut.result()) if exc is None
                           else zmq_msgs.pack_error(rid, exc))
            except (TypeError, ValueError, OverflowError) as e:  # e.g. extras msgpack cannot hold
                err = MlipdError(f"cannot encode the result: {e}")
                self.metrics.on_error(err.code)
                payload = zmq_msgs.pack_error(rid, err)
            self._send(envelope, payload)

    def _send(self, envelope: list[bytes], payload: bytes) -> None:
        try:
            self._sock.send_multipart([*envelope, payload], copy=len(payload) < 65536)
        except zmq.ZMQError as e:  # peer gone: nothing to answer to
            log.debug("reply dropped: %s", e)

    def _error(self, envelope: list[bytes], rid: int | None, err: MlipdError) -> None:
        self.metrics.on_error(err.code)
        self._send(envelope, zmq_msgs.pack_error(rid, err))

    def _handle(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            return  # no routing id: cannot answer
        envelope, raw = [f.bytes for f in frames[:-1]], frames[-1].buffer
        self.metrics.on_request("zmq")
        try:
            req = zmq_msgs.unpack_request(raw, max_atoms=self.max_atoms,
                                          max_structures=self.max_structures)
        except zmq_msgs.BadRequest as e:
            self._error(envelope, e.req_id, e)
            return
        except ProtocolError as e:
            self._error(envelope, None, e)
            return
        self.metrics.on_request(req.op)
        if req.op == "ping":
            self._send(envelope, zmq_msgs.pack_value(req.id, {"pong": True, "time": time.time()}))
        elif req.op == "info":
            self._send(envelope, zmq_msgs.pack_value(req.id, self.info))
        elif req.op == "stats":
            self._send(envelope, zmq_msgs.pack_value(req.id, self.stats()))
        else:
            self._compute(envelope, req)

    def _compute(self, envelope: list[bytes], req: zmq_msgs.Request) -> None:
        if self.species is not None:
            for k, s in enumerate(req.structures):
                unknown = s.species() - self.species
                if unknown:
                    self._error(envelope, req.id, UnknownSpecies(
                        f"structure {k}: model does not know atomic numbers {sorted(unknown)}"))
                    return
        if not self._accepting:
            self._error(envelope, req.id, Busy("server is shutting down"))
            return
        try:
            fut = self.worker.submit(envelope[0], req.structures, virial=req.virial)
        except Busy as e:
            self._error(envelope, req.id, e)
            return

        # the future resolves on the loop thread, which then calls flush
        fut.add_done_callback(lambda f: self._replies.append((envelope, req.id, f)))
