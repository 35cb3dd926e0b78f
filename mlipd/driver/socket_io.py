"""Addresses, connecting with retries, and a framed socket that reads exact byte counts.

Address forms (``--address``):
    unix:NAME       i-PI's and ASE's convention: the socket file ``/tmp/ipi_NAME``
                    (the prefix is i-PI's ``<simulation sockets_prefix>``)
    unix:/abs/path  any other socket file (a NAME containing "/" is a path)
    shm:NAME        i-PI's ``shm`` mode: control messages on the UNIX socket NAME (as
    shm:/abs/path   ``unix:``), positions and forces in i-PI's shared memory
    HOST:PORT       TCP (``tcp:HOST:PORT`` also accepted; ``[::1]:PORT`` for IPv6)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from mlipd.errors import ConnectionClosed, ProtocolError, ServerUnavailable, SetupError

log = logging.getLogger(__name__)

DEFAULT_SOCKETS_PREFIX = "/tmp/ipi_"
_RETRY_S = 0.05  # first pause between connection attempts; doubles up to _RETRY_MAX_S
_RETRY_MAX_S = 1.0
_CONNECT_TRY_S = 10.0  # one connect() call (a TCP handshake; UNIX sockets answer at once)
WAIT_LOG_EVERY_S = 10.0  # "still waiting for ..." while a server is not up
DEFAULT_FRAME_TIMEOUT_S = 30.0  # a message begun must be complete within this


EXPECTED_FORMS = ("unix:NAME, unix:/path/to/socket, shm:NAME (i-PI's shm mode) or HOST:PORT "
                  "(e.g. localhost:31415)")
_HOST = re.compile(r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.%A-Za-z]+\])$")


@dataclass(frozen=True)
class Address:
    """A parsed address: ``path`` for UNIX sockets, else ``host`` and ``port``;
    ``shm``: i-PI's shared-memory mode on that UNIX socket."""

    text: str
    path: str | None = None
    host: str | None = None
    port: int | None = None
    shm: bool = False

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def describe(self) -> str:
        """The address as given, with the socket file it means when that differs
        (``unix:md (/tmp/ipi_md)``)."""
        if self.is_unix and self.text != f"unix:{self.path}":
            return f"{self.text} ({self.path})"
        return self.text


def parse_address(text: str, *, sockets_prefix: str = DEFAULT_SOCKETS_PREFIX) -> Address:
    """Parse ``unix:NAME``, ``unix:/path``, ``HOST:PORT`` or ``tcp:HOST:PORT``; anything
    else is a SetupError that names the expected forms."""
    for scheme in ("unix:", "shm:"):
        if text.startswith(scheme):
            name = text[len(scheme):]
            if not name:
                raise SetupError(f"address {text!r}: empty socket name; expected "
                                 f"{EXPECTED_FORMS}")
            return Address(text, path=name if "/" in name else sockets_prefix + name,
                           shm=scheme == "shm:")
    rest = text[len("tcp:"):] if text.startswith("tcp:") else text
    if "://" in text:  # a URL, e.g. the tcp://HOST:PORT that mlipd serve --zmq takes
        hint = f" (here: {rest.lstrip('/')})" if text.startswith("tcp://") else ""
        raise SetupError(f"address {text!r}: not a URL (tcp://... is for mlipd serve "
                         f"--zmq); expected {EXPECTED_FORMS}{hint}")
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise SetupError(f"address {text!r}: expected {EXPECTED_FORMS}")
    if not _HOST.match(host):
        hint = " (an IPv6 address goes in brackets: [::1]:PORT)" if ":" in host else ""
        raise SetupError(f"address {text!r}: {host!r} is not a host name or IP address"
                         f"{hint}; expected {EXPECTED_FORMS}")
    try:
        number = int(port)
    except ValueError:
        raise SetupError(f"address {text!r}: port {port!r} is not a number; "
                         f"expected {EXPECTED_FORMS}") from None
    if not 0 < number < 65536:
        raise SetupError(f"address {text!r}: port {number} outside 1..65535")
    return Address(text, host=host.strip("[]"), port=number)


def with_shm(address: Address) -> Address:
    """``address`` in i-PI's shm mode (``--mode shm``); SetupError unless it is UNIX."""
    if not address.is_unix:
        raise SetupError(f"{address.text}: i-PI's shm mode needs a unix: address "
                         "(it is same-node)")
    return replace(address, shm=True)


def resolve(address: Address) -> None:
    """Check that a TCP address's host name resolves (SetupError at once, not a retry
    loop: a name that does not resolve now will not resolve in a second either)."""
    if address.is_unix:
        return
    try:
        socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SetupError(f"address {address.text!r}: host {address.host!r} does not resolve "
                         f"({e.strerror})") from None


def connect(address: Address, *, timeout: float, stop: threading.Event | None = None,
            say: Callable[[str], None] | None = None) -> socket.socket:
    """Connect, retrying while the server is not up yet, for at most ``timeout`` s
    (``stop``: give up early when set).

    ``say`` gets one line at the first failed try and every ``WAIT_LOG_EVERY_S`` after
    ("waiting for ..., the socket file ... is not there yet"). A host name that does not
    resolve fails at once. Raises ServerUnavailable naming the address (and the socket
    file it means) and why the last try failed.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    next_say = t0
    pause = _RETRY_S
    while True:
        if stop is not None and stop.is_set():
            raise ServerUnavailable(f"{address.describe()}: stopped while connecting")
        try:
            return _connect_once(address, timeout=min(max(deadline - time.monotonic(), 0.1),
                                                      _CONNECT_TRY_S))
        except socket.gaierror as e:
            raise ServerUnavailable(f"cannot connect to {address.text}: host "
                                    f"{address.host!r} does not resolve ({e.strerror})") from e
        except OSError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerUnavailable(f"cannot connect to {address.describe()} within "
                                        f"{timeout:g} s: {_why(address, e)}") from e
            log.debug("connect %s: %s; retrying", address.describe(), e)
            now = time.monotonic()
            if say is not None and now >= next_say:
                waited = f" for {now - t0:.0f} s" if now > t0 + 1 else ""
                until = ("until it is up" if math.isinf(timeout)
                         else f"for up to {timeout:g} s")
                say(f"{address.describe()}: waiting{waited} ({_why(address, e)}); "
                    f"retrying {until}")
                next_say = now + WAIT_LOG_EVERY_S
            if stop is not None:
                stop.wait(min(pause, left))
            else:
                time.sleep(min(pause, left))
            pause = min(2 * pause, _RETRY_MAX_S)


def _why(address: Address, e: OSError) -> str:
    """The last connection error, with what it usually means."""
    if address.is_unix and isinstance(e, FileNotFoundError):
        return (f"no socket file {address.path} (is the server running, with the same "
                "socket name and sockets prefix?)")
    if isinstance(e, ConnectionRefusedError):
        where = "on this socket file (a stale one?)" if address.is_unix else "on this port"
        return f"connection refused: nothing listens {where}"
    return str(e)


def _connect_once(address: Address, *, timeout: float) -> socket.socket:
    if address.is_unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = address.path
    else:
        info = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        target = info[4]
    try:
        sock.settimeout(timeout)
        sock.connect(target)
        if not address.is_unix:
            # the protocol is many small request/reply messages: Nagle would add ~40 ms each
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        sock.close()
        raise
    return sock


class FramedSocket:
    """A connected socket read in exact byte counts through one reused buffer.

    Reads are buffered: one ``recv`` takes whatever has arrived (i-PI sends POSDATA and
    GETFORCE in one write), so a step costs one wake-up and one system call, not one
    per field. ``recv_exact`` returns a view that is valid until the next call (the
    codec copies what it keeps). Two limits: ``timeout`` (s) is the idle time allowed
    between messages (``recv_exact_or_eof``, which starts a message); once a message
    has begun, all of it must arrive within ``frame_timeout`` (s), so a peer that
    trickles a frame byte by byte cannot hold the connection.

    ``busy_poll`` (s): wait for a next message by polling the socket without sleeping
    for up to this long before blocking. A thread that sleeps through the MD code's
    step wakes up late and with cold caches (measured: an 8-atom compiled step costs
    ~0.29 ms of CPU back to back, ~0.62 ms after each 1.5 ms sleep); polling keeps one
    core busy instead.
    """

    def __init__(self, sock: socket.socket, *, timeout: float,
                 frame_timeout: float = DEFAULT_FRAME_TIMEOUT_S, busy_poll: float = 0.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self.frame_timeout = frame_timeout
        self.busy_poll = busy_poll
        self.sock.settimeout(timeout)
        self._buf = bytearray(1 << 16)
        self._start = self._end = 0  # the bytes received and not yet read
        self._frame_deadline = float("inf")  # the message being read must end by then

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read (the start of a next message)."""
        return self._end - self._start

    def recv_exact(self, n: int) -> memoryview:
        """Exactly ``n`` bytes of the message begun. A closed peer raises
        ConnectionClosed; the message not complete by its deadline raises ProtocolError."""
        if self._frame_deadline == float("inf"):  # a read outside recv_exact_or_eof
            self._frame_deadline = time.monotonic() + self.frame_timeout
        self._fill(n)
        return self._take(n)

    def recv_exact_or_eof(self, n: int) -> memoryview | None:
        """The first ``n`` bytes of the next message (waiting up to ``timeout``), or None
        when the peer closed before the first byte (a clean end between messages:
        ASE's server closes without EXIT)."""
        if self._end == self._start:
            self._make_room(n)
            try:
                got = self._recv_next(memoryview(self._buf)[self._end:])
            except ConnectionResetError:
                return None
            if got == 0:
                return None
            self._end += got
        self._frame_deadline = time.monotonic() + self.frame_timeout
        self._fill(n)
        return self._take(n)

    def _recv_next(self, view: memoryview) -> int:
        """The first bytes of a next message into ``view`` (0: the peer closed): polled
        for up to ``busy_poll``, then waited for up to ``timeout``."""
        try:
            if self.busy_poll > 0:
                self.sock.settimeout(0.0)  # non-blocking
                until = time.perf_counter() + self.busy_poll
                while True:
                    try:
                        return self.sock.recv_into(view)
                    except (BlockingIOError, InterruptedError):
                        if time.perf_counter() >= until:
                            break
                        os.sched_yield()  # a runnable thread here (the MD code's) goes first
        finally:  # blocking again: a large reply's sendall must not stop at a full buffer
            self.sock.settimeout(self.timeout)
        try:
            return self.sock.recv_into(view)
        except TimeoutError:
            raise ProtocolError(f"no message for {self.timeout:g} s") from None

    def peer_closed(self) -> bool:
        """Whether the peer has closed (end of stream pending, nothing before it);
        does not block and consumes nothing."""
        if self._end > self._start:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def _take(self, n: int) -> memoryview:
        view = memoryview(self._buf)[self._start:self._start + n]
        self._start += n
        return view

    def _make_room(self, n: int) -> None:
        """At least ``n`` bytes of space from the first unread byte on (the unread bytes
        moved to the front; a larger buffer is a new one: views of the old stay valid)."""
        pending = self._end - self._start
        if pending and len(self._buf) - self._start >= n:
            return
        if len(self._buf) < n:
            grown = bytearray(n)
            grown[:pending] = self._buf[self._start:self._end]
            self._buf = grown
        elif pending:
            self._buf[:pending] = self._buf[self._start:self._end]
        self._start, self._end = 0, pending

    def _fill(self, n: int) -> None:
        """Receive until ``n`` bytes are buffered (more when more has arrived)."""
        if self._end - self._start >= n:
            return
        self._make_room(n)
        view = memoryview(self._buf)
        while self._end - self._start < n:
            left = self._frame_deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
                k = self.sock.recv_into(view[self._end:])
            except TimeoutError:
                raise ProtocolError(
                    f"message incomplete after {self.frame_timeout:g} s (had "
                    f"{self._end - self._start} of {n} bytes of a read; --frame-timeout)"
                ) from None
            if k == 0:
                raise ConnectionClosed(f"peer closed the connection after "
                                       f"{self._end - self._start} of {n} bytes")
            self._end += k

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # already closed by the peer
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
