"""Rank 0's handles on the rank processes it spawned: start, watch, stop.

    procs = RankProcesses(world_size=3, backend="gloo", host="127.0.0.1", port=store.port,
                          timeout_s=120, threads=1)
    procs.lost()      # "rank 2 (pid 4711) was killed by SIGKILL", or None: at once, from
                      # the process handle (waitpid), whatever ended it
    procs.silent(10)  # a rank whose heartbeat is older than 10 s, or None
    procs.errors()    # what failing ranks reported before they exited
    procs.stop()      # SIGTERM, then SIGKILL; the handles are reaped

Each rank is ``python -m mlipd.engine.rank_main`` (see there why not multiprocessing).
The ranks also leave by themselves when rank 0's process is gone, and a finalizer
kills them when the interpreter exits without ``stop``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

from mlipd.engine.rank_main import SLOT

STARTUP_GRACE_S = 60.0  # a rank imports torch before its first beat
MLIPD_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding this mlipd


def describe_exit(code: int) -> str:
    """``exited with code 1`` / ``was killed by SIGKILL`` (Popen's returncode)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)


class RankProcesses:
    """Ranks 1..world_size-1 of a job whose rank 0 is this process (module docstring)."""

    def __init__(self, *, world_size: int, backend: str, host: str, port: int,
                 timeout_s: float, threads: int | None) -> None:
        n = max(world_size - 1, 1)  # (an empty file cannot be mapped)
        self._beats_file = tempfile.TemporaryFile(prefix="mlipd-beats-")  # noqa: SIM115 - open while the ranks live
        self._beats_file.truncate(SLOT.size * n)
        self._beats = mmap.mmap(self._beats_file.fileno(), SLOT.size * n)
        for r in range(1, world_size):  # not silent before it could beat
            self._beat_set(r, time.monotonic() + STARTUP_GRACE_S)
        self._closed = False
        self._errors_r, errors_w = os.pipe()
        fcntl.fcntl(self._errors_r, fcntl.F_SETFL, os.O_NONBLOCK)
        env = dict(os.environ)
        if Path(MLIPD_ROOT).name not in ("site-packages", "dist-packages"):
            # a checkout (or a path the script added): the ranks import this same mlipd
            env["PYTHONPATH"] = os.pathsep.join(
                [MLIPD_ROOT, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
        fds = (self._beats_file.fileno(), errors_w)
        self.procs: list[subprocess.Popen] = []
        try:
            for r in range(1, world_size):
                spec = {"rank": r, "world_size": world_size, "backend": backend, "host": host,
                        "port": port, "timeout_s": timeout_s, "threads": threads,
                        "parent": os.getpid(), "path": [p or os.getcwd() for p in sys.path],
                        "beats_fd": fds[0], "errors_fd": fds[1]}
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "mlipd.engine.rank_main", json.dumps(spec)],
                    env=env, stdin=subprocess.DEVNULL, pass_fds=fds, close_fds=True))
        except BaseException:
            _kill_all(self.procs)
            raise
        finally:
            os.close(errors_w)  # the ranks hold their own copies
        self._finalizer = weakref.finalize(self, _kill_all, list(self.procs))

    def _beat_set(self, rank: int, value: float) -> None:
        SLOT.pack_into(self._beats, SLOT.size * (rank - 1), value)

    def pid(self, rank: int) -> int:
        return self.procs[rank - 1].pid

    def lost(self) -> str | None:
        """The first rank that has exited (any code, any signal), described; None while
        every rank runs. Reaps the exited processes (non-blocking)."""
        for r, p in enumerate(self.procs, start=1):
            code = p.poll()
            if code is not None:
                return f"rank {r} (pid {p.pid}) {describe_exit(code)}"
        return None

    def exited(self) -> list[tuple[int, int]]:
        """(rank, exit code) of every rank that has exited."""
        return [(r, p.returncode) for r, p in enumerate(self.procs, start=1)
                if p.poll() is not None]

    def silent(self, limit_s: float) -> tuple[int, float] | None:
        """(rank, seconds) of a running rank whose last heartbeat is older than limit_s."""
        now = time.monotonic()
        for r, p in enumerate(self.procs, start=1):
            age = now - SLOT.unpack_from(self._beats, SLOT.size * (r - 1))[0]
            if age > limit_s and p.poll() is None:
                return r, age
        return None

    def kill(self, rank: int | None = None) -> None:
        """SIGKILL one rank, or all (no wait): their sockets close, so a collective that
        waits on them fails now."""
        for r, p in enumerate(self.procs, start=1):
            if (rank is None or r == rank) and p.poll() is None:
                with contextlib.suppress(OSError):
                    p.kill()

    def errors(self) -> list[str]:
        """The lines failing ranks wrote before exiting (``rank R: Type: message``)."""
        chunks = []
        while not self._closed:
            try:
                chunk = os.read(self._errors_r, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        text = b"".join(chunks).decode(errors="replace")
        return [line for line in text.splitlines() if line.strip()]

    def wait(self, timeout_s: float) -> bool:
        """Whether every rank exited within timeout_s (after a stop command)."""
        end = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop(self) -> None:
        """End every rank without talking to it (it may sit in a collective): SIGTERM,
        SIGKILL after 10 s; then release the heartbeat slots and the pipe."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.terminate()
        if not self.wait(10.0):
            _kill_all(self.procs)
        self._finalizer.detach()
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, ValueError):
            self._beats.close()
            self._beats_file.close()
        with contextlib.suppress(OSError):
            os.close(self._errors_r)
