"""Shared fixtures: short temp dirs (UNIX socket paths are limited to ~107 bytes),
free TCP ports, and subprocesses that are always killed at teardown."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def short_tmp():
    """A fresh directory with a short path under /tmp, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="mlipd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def free_tcp_port() -> int:
    """A port that was free a moment ago (bind port 0, read it, release it).

    For programs that cannot bind port 0 themselves (i-PI); callers retry on collision.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    return free_tcp_port()


MLIPD = [sys.executable, "-m", "mlipd"]


class Processes:
    """Start subprocesses that are killed (whole process group) at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv, **kw) -> subprocess.Popen:
        kw.setdefault("start_new_session", True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        env.update(kw.pop("env", {}))
        proc = subprocess.Popen([str(a) for a in argv], env=env, **kw)
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def processes():
    procs = Processes()
    try:
        yield procs
    finally:
        procs.kill_all()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module: two threads per process on this 2-core
    machine, beside gloo ranks or other work, measured 6x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
