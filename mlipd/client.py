"""Python client of ``mlipd serve`` over ZeroMQ (protocol: ``mlipd.protocols.zmq_msgs``).

Reliability the Lazy Pirate way (ZeroMQ guide, ``lpclient.py``): send, wait at most
``timeout_s`` for the reply with our request id, and on silence close the socket
(``LINGER=0``), reconnect and send again, ``retries`` times in all, then raise
``ServerUnavailable``. Every op is idempotent, so resending is safe. A reply
with another id (a late answer to an earlier try) is skipped. Error replies
raise the typed error of ``mlipd.errors`` (``Busy``, ``UnknownSpecies``, ...).

One ``Client`` per thread: a zmq socket must not be shared between threads.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import zmq

from mlipd.errors import ServerUnavailable, ValidationError
from mlipd.protocols import zmq_msgs
from mlipd.types import Result, Structure

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0  # per try: covers a large structure's engine time
DEFAULT_RETRIES = 3


class Client:
    """A connection to one mlipd server; a context manager that owns its zmq.Context.

    endpoint:  ``tcp://host:port`` or ``ipc://path``, as printed in ``READY``
    timeout_s: seconds to wait for each reply before trying again
    retries:   tries per request before ``ServerUnavailable``
    """

    def __init__(self, endpoint: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES) -> None:
        if timeout_s <= 0 or retries < 1:
            raise ValidationError("timeout_s must be > 0 and retries >= 1")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self._ids = itertools.count(1)
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._open()

    # ------------------------------------------------------------ lifetime

    def _open(self) -> None:
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)

    def _reopen(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)  # drop what a dead server never took
        self._open()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ ops

    def compute(self, structure: Structure, *, virial: bool = True) -> Result:
        """Energy (eV), forces (N, 3) eV/Å and virial (3, 3) eV of one structure."""
        (result,) = self._request("compute", [structure], virial=virial).results
        return result

    def batch(self, structures: Sequence[Structure], *, virial: bool = True) -> list[Result]:
        """Results of several structures, in order, from one request."""
        return list(self._request("batch", list(structures), virial=virial).results)

    def info(self) -> Mapping[str, Any]:
        """Model name, cutoff (Å), species, units, ranks, versions."""
        return self._request("info").value

    def ping(self) -> Mapping[str, Any]:
        return self._request("ping").value

    def stats(self) -> Mapping[str, Any]:
        """The server's counters (``mlipd.server.metrics``)."""
        return self._request("stats").value

    # ------------------------------------------------------------ transport

    def _request(self, op: str, structures: Sequence[Structure] = (), *,
                 virial: bool = True) -> zmq_msgs.Reply:
        if self._sock is None:
            raise ServerUnavailable("client is closed")
        rid = next(self._ids)
        raw = zmq_msgs.pack_request(rid, op, structures, virial=virial)
        for attempt in range(1, self.retries + 1):
            self._sock.send(raw, copy=len(raw) < 65536)  # large: zero-copy
            reply = self._await(rid)
            if reply is not None:
                return zmq_msgs.unpack_reply(reply, expect_id=rid)
            log.warning("%s: no reply to %s #%d within %.3g s (try %d of %d)", self.endpoint,
                        op, rid, self.timeout_s, attempt, self.retries)
            self._reopen()
        raise ServerUnavailable(
            f"{self.endpoint}: no reply after {self.retries} tries of {self.timeout_s:g} s")

    def _await(self, rid: int) -> Any:
        """The loaded reply for ``rid``, or None on timeout; stale replies are skipped."""
        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self._sock.poll(max(int(left * 1000), 1), zmq.POLLIN):
                return None
            msg = zmq_msgs.loads(self._sock.recv(copy=False).buffer)
            got = zmq_msgs.reply_id(msg)
            if got == rid or got is None:
                return msg  # ours, or an error without an id: unpack_reply decides
            log.debug("skipping a stale reply to request #%s", got)
        return None


def connect(endpoint: str, **options: Any) -> Client:
    """``Client(endpoint, **options)``."""
    return Client(endpoint, **options)
