"""One fake i-PI server on a UNIX socket, for ``mlipd drive`` and ``mlipd serve --ipi``.

It speaks real bytes through ``mlipd.protocols.ipi`` and can misbehave on purpose (the
real i-PI never sends bad bytes); the acceptance tests use the real i-PI
(``helpers.ipi_run``).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from mlipd.protocols import ipi
from mlipd.protocols.convert import posdata_from_structures, results_from_forceready
from mlipd.types import Result, Structure


class FakeIpi:
    """Listens on ``path``; ``accept`` takes one client connection at a time."""

    def __init__(self, path: Path | str, *, backlog: int = 4) -> None:
        self.path = str(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(backlog)
        self.conn: socket.socket | None = None

    def accept(self, proc: subprocess.Popen | None = None, *, timeout_s: float = 30.0) -> None:
        """Wait for a client; with ``proc``, fail at once when that process has exited
        (no hang on a client that died)."""
        deadline = time.monotonic() + timeout_s
        self.listener.settimeout(0.2)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout is not None else ""
                raise AssertionError(f"client exited early ({proc.returncode}):\n{out}")
            try:
                self.conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.conn.settimeout(timeout_s)
            return
        raise AssertionError("no client connected")

    def read_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.conn.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the client closed the connection")
            out += chunk
        return out

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def status(self) -> ipi.Header:
        self.conn.sendall(ipi.Header.STATUS.value)
        return ipi.read_header(self.read_exact)

    @staticmethod
    def posdata_frame(structures: list[Structure]) -> bytes:
        return ipi.encode_posdata(posdata_from_structures(structures))

    def init(self, *, text: bytes = b"") -> None:
        """INIT if the client asks for it."""
        if self.status() is ipi.Header.NEEDINIT:
            self.conn.sendall(ipi.encode_init(ipi.Init(bead=0, text=text)))

    def step(self, structures: list[Structure], *, init: bytes = b"",
             frame: bytes | None = None) -> list[Result]:
        """One exchange (INIT when needed, POSDATA, GETFORCE); the client's results."""
        self.post(structures, init=init, frame=frame)
        return self.collect(len(structures))

    def post(self, structures: list[Structure], *, init: bytes = b"",
             frame: bytes | None = None) -> None:
        """The first half of ``step``: INIT when needed, then POSDATA (or ``frame``)."""
        self.init(text=init)
        if self.status() is not ipi.Header.READY:
            raise AssertionError("client not READY")
        self.conn.sendall(frame if frame is not None else self.posdata_frame(structures))

    def collect(self, n_structures: int) -> list[Result]:
        """The second half of ``step``: wait for the results, GETFORCE, read them."""
        if self.status() is not ipi.Header.HAVEDATA:
            raise AssertionError("client has no data")
        self.conn.sendall(ipi.Header.GETFORCE.value)
        if ipi.read_header(self.read_exact) is not ipi.Header.FORCEREADY:
            raise AssertionError("no FORCEREADY")
        reply = ipi.read_forceready(self.read_exact, batch_size=n_structures)
        return results_from_forceready(reply)

    def exit(self) -> None:
        self.conn.sendall(ipi.Header.EXIT.value)

    def closed_by_peer(self, timeout_s: float = 30.0) -> bool:
        """Whether the client closes this connection (reads until EOF, within the time)."""
        self.conn.settimeout(timeout_s)
        try:
            while self.conn.recv(4096):
                pass
        except ConnectionError:  # a reset: closed with our bytes unread
            return True
        except TimeoutError:
            return False
        return True

    def drop(self) -> None:
        """Close the current connection (the listener stays)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def close(self) -> None:
        self.drop()
        self.listener.close()
