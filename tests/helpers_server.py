"""Helpers for tests of `mlipd serve` as a real process: a gated model registered as a
plug-in (a dist-info on PYTHONPATH, the way third-party models arrive), raw ZeroMQ
frames, and a fake i-PI server for the `--ipi` links."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq
from ase.build import bulk

from mlipd.protocols import ipi
from mlipd.protocols.convert import posdata_from_structures, results_from_forceready
from mlipd.types import Structure


def argon(n_rep: int = 1, *, seed: int = 0, a: float = 5.26) -> Structure:
    atoms = bulk("Ar", "fcc", a=a, cubic=True).repeat(n_rep)
    atoms.rattle(0.05, seed=seed)
    return Structure.from_atoms(atoms)


def plugin_env(tmp: Path) -> dict[str, str]:
    """An environment in which ``--model gated:dir=...`` loads ``fault_models.GatedLJ``
    (tests/) through the ``mlipd.models`` entry-point group (a dist-info directory and
    tests/ on PYTHONPATH)."""
    info = tmp / "plugins" / "mlipd_test_models-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mlipd-test-models\n"
                                   "Version: 0.0\n")
    (info / "entry_points.txt").write_text(
        "[mlipd.models]\ngated = fault_models:GatedLJ\n")
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (str(tmp / "plugins"), tests,
                                       os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


class Gate:
    """The hold file and forward counter of a ``gated`` model (``GatedLJ``)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def model(self) -> str:
        return f"gated:dir={self.dir}"

    def hold(self) -> None:
        (self.dir / "hold").touch()

    def release(self) -> None:
        (self.dir / "hold").unlink(missing_ok=True)

    def started(self) -> int:
        f = self.dir / "started"
        return int(f.read_text()) if f.exists() else 0

    def wait_started(self, n: int, *, timeout_s: float = 60.0) -> None:
        """Until ``n`` forwards have begun (an event the model writes, not a sleep)."""
        deadline = time.monotonic() + timeout_s
        while self.started() < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.started()} forwards began, not {n}")
            time.sleep(0.01)


class Dealer:
    """A raw DEALER socket: frames out, loaded msgpack replies in."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.connect(address)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout_s: float = 30.0):
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return msgpack.unpackb(self.sock.recv(), strict_map_key=False)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> Dealer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def raw(address: str, *frames: bytes, timeout_s: float = 30.0):
    with Dealer(address) as d:
        d.send(*frames)
        return d.recv(timeout_s)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


class FakeIpi:
    """An i-PI-like server on a UNIX socket, for `mlipd serve --ipi` (which connects and
    reconnects to it). Speaks real bytes through ``mlipd.protocols.ipi``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.conn: socket.socket | None = None

    def accept(self, timeout_s: float = 30.0) -> None:
        self.listener.settimeout(timeout_s)
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(timeout_s)

    def read_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.conn.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the link closed the connection")
            out += chunk
        return out

    def status(self) -> ipi.Header:
        self.conn.sendall(ipi.Header.STATUS.value)
        return ipi.read_header(self.read_exact)

    def posdata_frame(self, structures: list[Structure]) -> bytes:
        return ipi.encode_posdata(posdata_from_structures(structures))

    def step(self, structures: list[Structure], *, frame: bytes | None = None):
        """One exchange; returns the forces (eV/Å, one array per structure)."""
        if self.status() is ipi.Header.NEEDINIT:
            self.conn.sendall(ipi.encode_init(ipi.Init(bead=0, text=b"")))
        if self.status() is not ipi.Header.READY:
            raise AssertionError("link not READY")
        self.conn.sendall(frame if frame is not None else self.posdata_frame(structures))
        if self.status() is not ipi.Header.HAVEDATA:
            raise AssertionError("link has no data")
        self.conn.sendall(ipi.Header.GETFORCE.value)
        if ipi.read_header(self.read_exact) is not ipi.Header.FORCEREADY:
            raise AssertionError("no FORCEREADY")
        reply = ipi.read_forceready(self.read_exact, batch_size=len(structures))
        return [r.forces for r in results_from_forceready(reply)]

    def closed_by_peer(self, timeout_s: float = 30.0) -> bool:
        """Whether the link closes this connection (reads until EOF, within the time)."""
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
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def close(self) -> None:
        self.drop()
        self.listener.close()


def forces_close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=1e-6, atol=1e-8))
