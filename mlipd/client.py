"""Python client of ``mlipd serve`` over ZeroMQ (protocol: ``mlipd.protocols.zmq_msgs``).

Constructing a ``Client`` checks the endpoint's form and asks the server for ``info``
within ``connect_timeout_s``: nothing answering is an error at once, naming the
endpoint, and ``info`` gives the server's limits, so a request over them raises
``TooLarge`` before it is sent.

While it waits for a reply the client resends the same request (same id, same
socket: the server never computes an id twice) every ``heartbeat_s / 4``; the server
answers a repeat with ``pending`` while the request is queued or computing. So the
client tells a server that is alive and still computing (it keeps waiting, up to
``timeout_s`` in all) from one that is gone (nothing heard for ``heartbeat_s``:
``ServerUnavailable``). A reply with another id (a late answer to an earlier
request) is skipped. Error replies raise the typed error of ``mlipd.errors``
(``Busy``, ``UnknownSpecies``, ``DeadlineExceeded``, ...).

One ``Client`` per thread: a zmq socket must not be shared between threads.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from mlipd.errors import (
    DeadlineExceeded,
    ServerUnavailable,
    TooLarge,
    ValidationError,
)
from mlipd.protocols import zmq_msgs
from mlipd.protocols.zmq_address import parse_zmq_address
from mlipd.types import Result, Structure

if TYPE_CHECKING:
    from ase import Atoms

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 3600.0  # a whole request, while the server says it is still at work
DEFAULT_HEARTBEAT_S = 10.0  # nothing heard for this long: the server is gone
DEFAULT_CONNECT_TIMEOUT_S = 10.0  # the first answer (info) at construction


class Client:
    """A connection to one mlipd server; a context manager that owns its zmq.Context.

    endpoint:          ``tcp://host:port`` or ``ipc://path``, as printed in ``READY``
    timeout_s:         the longest wait for one request's result
    heartbeat_s:       the longest silence from the server before it counts as gone
    connect_timeout_s: how long the constructor waits for the server's first answer
    curve:             a key directory (``mlipd keygen``) for a server run with ``--curve``
    """

    def __init__(self, endpoint: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 heartbeat_s: float = DEFAULT_HEARTBEAT_S,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 curve: str | os.PathLike | None = None) -> None:
        address = parse_zmq_address(endpoint, bind=False)  # SetupError with the expected form
        if not (timeout_s > 0 and heartbeat_s > 0 and connect_timeout_s > 0):
            raise ValidationError("timeout_s, heartbeat_s and connect_timeout_s must be > 0")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self._ids = itertools.count(1)
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = self._ctx.socket(zmq.DEALER)
        try:
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.IPV6, 1)
            # our own routing id: a reconnect (same socket) keeps it, so the server still
            # knows our requests by (connection, id)
            self._sock.setsockopt(zmq.ROUTING_ID, b"mlipd-" + os.urandom(12))
            if curve is not None:
                from mlipd.curve import apply_client_curve

                apply_client_curve(self._sock, curve)
            self._sock.connect(address.text)
            self.server_info: Mapping[str, Any] = self._first_info(
                connect_timeout_s, curve=curve is not None)
        except BaseException:
            self.close()
            raise

    def _first_info(self, connect_timeout_s: float, *, curve: bool) -> Mapping[str, Any]:
        try:
            return self._request("info", timeout_s=connect_timeout_s,
                                 heartbeat_s=connect_timeout_s).value
        except (ServerUnavailable, DeadlineExceeded):  # info is never 'pending': silence
            why = " or it refused our CURVE key" if curve else ""
            raise ServerUnavailable(
                f"{self.endpoint}: no mlipd server answered within {connect_timeout_s:g} s "
                f"(is `mlipd serve --zmq {self.endpoint}` running?{why})") from None

    # ------------------------------------------------------------ lifetime

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

    def compute(self, structure: Structure | Atoms, *, virial: bool = True) -> Result:
        """Energy (eV), forces (N, 3) eV/Å and virial (3, 3) eV of one structure (a
        ``Structure`` or an ``ase.Atoms``)."""
        (result,) = self._request("compute", [as_structure(structure)],
                                  virial=virial).results
        return result

    def batch(self, structures: Sequence[Structure | Atoms], *,
              virial: bool = True) -> list[Result]:
        """Results of several structures (``Structure`` or ``ase.Atoms``), in order,
        from one request."""
        return list(self._request("batch", [as_structure(s) for s in structures],
                                  virial=virial).results)

    def info(self) -> Mapping[str, Any]:
        """Model name, cutoff (Å), species, units, ranks, versions, limits."""
        return self._request("info").value

    def ping(self) -> Mapping[str, Any]:
        return self._request("ping").value

    def stats(self) -> Mapping[str, Any]:
        """The server's counters (``mlipd.server.metrics``)."""
        return self._request("stats").value

    # ------------------------------------------------------------ transport

    def _check_size(self, structures: Sequence[Structure]) -> None:
        info = getattr(self, "server_info", None) or {}
        atoms = sum(s.n_atoms for s in structures)
        limit = info.get("max_request_atoms")
        if isinstance(limit, int) and atoms > limit:
            raise TooLarge(f"{atoms} atoms exceed the server's limit of {limit} per request "
                           "(--max-request-atoms)")
        limit = info.get("max_structures")
        if isinstance(limit, int) and len(structures) > limit:
            raise TooLarge(f"{len(structures)} structures exceed the server's limit of {limit}")

    def _request(self, op: str, structures: Sequence[Structure] = (), *, virial: bool = True,
                 timeout_s: float | None = None,
                 heartbeat_s: float | None = None) -> zmq_msgs.Reply:
        if self._sock is None:
            raise ServerUnavailable("client is closed")
        if structures:
            self._check_size(structures)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        heartbeat_s = self.heartbeat_s if heartbeat_s is None else heartbeat_s
        rid = next(self._ids)
        raw = zmq_msgs.pack_request(rid, op, structures, virial=virial)
        copy = len(raw) < 65536  # large: zero-copy
        self._send(raw, copy=copy)
        start = heard = time.monotonic()
        resend_every = heartbeat_s / 4
        next_send = start + resend_every
        pending: Mapping[str, Any] = {}
        while True:
            now = time.monotonic()
            if now - start > timeout_s:
                raise DeadlineExceeded(
                    f"{self.endpoint}: no result for {op} #{rid} within {timeout_s:g} s"
                    + (f" (the server is alive: {dict(pending)})" if pending else ""))
            if now - heard > heartbeat_s:
                raise ServerUnavailable(f"{self.endpoint}: nothing heard for {heartbeat_s:g} s "
                                        f"while waiting for {op} #{rid}: the server is gone")
            wait = min(next_send, start + timeout_s, heard + heartbeat_s) - now
            if self._sock.poll(max(int(wait * 1000), 1), zmq.POLLIN):
                msg = zmq_msgs.loads(self._sock.recv(copy=False).buffer)
                got = zmq_msgs.reply_id(msg)
                if got is not None and got != rid:
                    log.debug("skipping a stale reply to request #%s", got)
                    continue
                reply = zmq_msgs.unpack_reply(msg, expect_id=rid)  # error replies raise
                if not reply.pending:
                    return reply
                heard, pending = time.monotonic(), reply.value
            elif time.monotonic() >= next_send:
                self._send(raw, copy=copy)  # heartbeat: same id, same socket
                next_send = time.monotonic() + resend_every

    def _send(self, raw: bytes, *, copy: bool) -> None:
        """Never block: with no connected peer (server down, a refused CURVE handshake)
        a DEALER would wait forever; the next heartbeat sends again instead."""
        try:
            self._sock.send(raw, zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            log.debug("%s: not connected; will try again", self.endpoint)


def as_structure(item: Structure | Atoms) -> Structure:
    """A ``Structure`` as it is; an ``ase.Atoms`` (anything with numbers, positions, cell
    and pbc like it) converted; anything else refused, naming its type."""
    if isinstance(item, Structure):
        return item
    if all(hasattr(item, a) for a in ("numbers", "positions", "cell", "pbc")):
        return Structure.from_atoms(item)
    raise ValidationError(f"expected a mlipd Structure or an ase.Atoms, got "
                          f"{type(item).__name__}")


def connect(endpoint: str, **options: Any) -> Client:
    """``Client(endpoint, **options)``."""
    return Client(endpoint, **options)
