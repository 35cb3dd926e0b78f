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

# The e3nn>=0.5 family (sevenn, fairchem-core) cannot share an environment with mace-torch
# (e3nn==0.4.4): scripts/test.sh runs `--family main` in .venv and `--family e3nn` in
# .venv-e3nn. These modules import that family's packages at the top, so the main run does
# not collect them; test_bench.py is collected by both, its cases marked `e3nn` or not, and
# test_catalog.py runs in both.
E3NN_MODULES = frozenset({"test_sevennet.py", "test_esen.py", "test_pretrained_e3nn.py"})
SHARED_MODULES = frozenset({"test_bench.py", "test_catalog.py", "test_memory_estimate.py"})
BOTH_FAMILIES = frozenset({"test_catalog.py"})  # its cases run in both environments


def pytest_addoption(parser):
    parser.addoption("--family", choices=("main", "e3nn", "all"), default="all",
                     help="main: tests of .venv (CHGNet, MACE, TensorNet, ...); e3nn: tests "
                          "of .venv-e3nn (SevenNet, eSEN); all: both (one environment "
                          "cannot hold both families)")


def pytest_ignore_collect(collection_path, config):
    family = config.getoption("--family")
    name = collection_path.name
    if family == "all" or not name.startswith("test_") or name in SHARED_MODULES:
        return None
    return True if (name in E3NN_MODULES) != (family == "e3nn") else None


def pytest_collection_modifyitems(config, items):
    family = config.getoption("--family")
    if family == "all":
        return
    keep, drop = [], []
    for item in items:
        if item.path.name in BOTH_FAMILIES:
            keep.append(item)
            continue
        e3nn = item.path.name in E3NN_MODULES or item.get_closest_marker("e3nn") is not None
        (keep if e3nn == (family == "e3nn") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


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
