"""Helpers for tests of `mlipd serve` as a real process: a gated model registered as a
plug-in (a dist-info on PYTHONPATH, the way third-party models arrive), raw ZeroMQ
frames, and the peak memory of a process."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgpack
import zmq


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
    tests = str(Path(__file__).resolve().parent.parent)
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


def rank_pids(server_pid: int) -> list[int]:
    """The server's rank processes (``python -m mlipd.engine.rank_main``), started by
    any of its threads (each thread's children are listed under its own task)."""
    kids = []
    for task in Path(f"/proc/{server_pid}/task").glob("*"):
        try:
            kids += (task / "children").read_text().split()
        except OSError:
            continue
    out = []
    for kid in kids:
        try:
            if b"mlipd.engine.rank_main" in Path(f"/proc/{kid}/cmdline").read_bytes():
                out.append(int(kid))
        except OSError:
            continue  # exited meanwhile
    return out
