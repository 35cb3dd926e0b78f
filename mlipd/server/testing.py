"""Start ``mlipd serve`` as a real subprocess for tests and benchmarks.

``running_server(...)`` waits for the ``READY`` line (never a fixed sleep), yields
the process and its bound addresses, and always stops it: SIGTERM, then SIGKILL
if it does not exit in time.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlipd.errors import ServerUnavailable


@dataclass
class ServerProcess:
    """A running server: ``proc``, ``addresses`` from its READY line, ``log`` its stderr file."""

    proc: subprocess.Popen
    addresses: list[str]
    log: Path

    @property
    def address(self) -> str:
        return self.addresses[0]

    def stop(self, *, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Signal the server and wait; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def read_ready(proc: subprocess.Popen, *, timeout_s: float, log: Path) -> list[str]:
    """The addresses of a started server's ``READY`` line (its stdout, a pipe); raises
    ServerUnavailable with the end of ``log`` when it exits first or takes too long."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    line = b""
    try:
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                raise ServerUnavailable(f"no READY line within {timeout_s} s; log:\n"
                                        + log.read_text(errors="replace")[-3000:])
            chunk = os.read(proc.stdout.fileno(), 1)
            if not chunk:
                raise ServerUnavailable(f"server exited ({proc.wait()}) before READY; log:\n"
                                        + log.read_text(errors="replace")[-3000:])
            line += chunk
    finally:
        sel.close()
    words = line.decode().split()
    if not words or words[0] != "READY":
        raise ServerUnavailable(f"unexpected first line {line!r}")
    return words[1:]


@contextlib.contextmanager
def running_server(args: Sequence[str], *, log: Path, ready_timeout_s: float = 120.0,
                   env: dict[str, str] | None = None,
                   preexec_fn=None) -> Iterator[ServerProcess]:
    """``python -m mlipd -v serve *args``; stderr goes to ``log``; ``preexec_fn`` runs in
    the child before it starts (e.g. a resource limit)."""
    cmd = [sys.executable, "-m", "mlipd", "-v", "serve", *args]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env,
                                preexec_fn=preexec_fn)
    server = ServerProcess(proc=proc, addresses=[], log=log)
    try:
        server.addresses = read_ready(proc, timeout_s=ready_timeout_s, log=log)
        yield server
    finally:
        server.stop()
        proc.stdout.close()
