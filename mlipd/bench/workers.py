"""Contenders in their own processes: a peak memory that is theirs alone, and limits on
memory and time that end that process, not the suite.

    with Worker("package", device="cpu", memory_limit=4 * 2**30, call_timeout=60) as w:
        w.setup(recipe, case, 1000)      # in the child: fn = recipe(case, 1000, device=...)
        w.reset_peak()
        seconds = w(0)                   # fn(0), timed in the child: Measured
        w.peak()                         # Memory: peak and baseline bytes since reset_peak

``recipe`` must be importable by name (a module-level function); it returns the
callable a call runs. On CPU the peak is the process's resident set (``VmHWM``, reset
through ``/proc/self/clear_refs``); on CUDA, torch's peak allocation. A child over its
memory limit (resident memory of it and its children, sampled while it works), slower
than its call timeout, out of GPU memory, or dead, raises ``ContenderFailed``.

Children start from a fork server that has imported torch once (seconds saved per
child); they import their model's package themselves, so its memory is theirs.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from mlipd.bench.timing import ContenderFailed, Measured

log = logging.getLogger(__name__)
POLL_S = 0.02
PRELOAD = ["torch", "numpy", "ase", "vesin", "mlipd.bench.workers"]


@dataclass(frozen=True)
class Memory:
    """Bytes: the peak since ``reset_peak`` and what was in use at the reset."""

    peak: int
    baseline: int

    @property
    def step(self) -> int:
        return max(0, self.peak - self.baseline)


def _context():
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return mp.get_context("spawn")


class Worker:
    """One contender's process (see the module docstring).

    device: where the child computes; threads: its torch threads (None: torch's default)
    memory_limit: bytes of resident memory (CPU) for the child and its children
    call_timeout: seconds one call may take; daemon: False lets the child start
    processes of its own (a distributed engine's ranks)
    """

    def __init__(self, name: str, *, device: str = "cpu", threads: int | None = None,
                 memory_limit: float | None = None, call_timeout: float | None = None,
                 daemon: bool = True) -> None:
        self.name, self.device = name, device
        self.memory_limit, self.call_timeout = memory_limit, call_timeout
        self.failed: str | None = None
        ctx = _context()
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child, device, threads),
                                 name=f"mlipd-bench-{name}", daemon=daemon)
        t0 = time.monotonic()
        self._proc.start()
        child.close()
        log.info("%s: process started in %.1f s", name, time.monotonic() - t0)

    # --- the parent's side ----------------------------------------------------------
    def setup(self, recipe: Callable[..., Callable[[int], object]], *args: object,
              timeout: float = 600.0) -> None:
        """Build the child's callable: ``recipe(*args, device=device)``."""
        failed = setup_all({self: (recipe, *args)}, timeout=timeout)
        if failed:
            raise ContenderFailed(failed[self])

    def run(self, fn: Callable[..., object], *args: object, timeout: float = 600.0,
            **kwargs: object) -> object:
        """``fn(*args, **kwargs)`` in the child (e.g. to write a model file with the
        package the child imports anyway); its value."""
        return self._ask(("run", fn, args, kwargs), timeout=timeout)

    def __call__(self, k: int) -> Measured:
        return Measured(self._ask(("call", k), timeout=self.call_timeout))

    def inspect(self) -> object:
        """The child's callable's ``inspect()`` (what a contender reports about itself)."""
        return self._ask(("inspect",), timeout=60)

    def release(self) -> None:
        """Give cached device memory back (CUDA) so that another process may use it; the
        peak since ``reset_peak`` is kept."""
        self._ask(("release",), timeout=60)

    def reset_peak(self) -> None:
        self._ask(("reset",), timeout=60)

    def peak(self) -> Memory:
        return Memory(*self._ask(("peak",), timeout=60))

    def close(self) -> None:
        if self._proc.is_alive() and self.failed is None:
            with contextlib.suppress(ContenderFailed):
                self._ask(("stop",), timeout=30)
        self._kill()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _kill(self) -> None:
        if self._proc.is_alive():
            _kill_tree(self._proc.pid)
        self._proc.join(timeout=10)
        self._conn.close()

    def _fail(self, why: str) -> ContenderFailed:
        self.failed = why
        self._kill()
        return ContenderFailed(why)

    def _ask(self, msg: tuple, *, timeout: float | None) -> object:
        self._send(msg)
        return self._wait(timeout)

    def _send(self, msg: tuple) -> None:
        if self.failed is not None:
            raise ContenderFailed(self.failed)
        try:
            self._conn.send(msg)
        except (OSError, ValueError) as e:
            raise self._fail(f"process gone ({e})") from e

    def _wait(self, timeout: float | None) -> object:
        start = time.monotonic()
        while not self._conn.poll(POLL_S):
            if not self._proc.is_alive():
                raise self._fail(f"process died (exit code {self._proc.exitcode})")
            if timeout is not None and time.monotonic() - start > timeout:
                raise self._fail(f"over its {timeout:.0f} s time limit")
            if self.memory_limit is not None:
                rss = tree_rss_bytes(self._proc.pid)
                if rss > self.memory_limit:
                    raise self._fail(f"over the {self.memory_limit / 2**30:.1f} GiB memory "
                                     "limit")
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError) as e:
            raise self._fail(f"process died ({e})") from e
        if status == "oom":
            self.failed = "out of memory"
            raise ContenderFailed("out of memory")
        if status == "error":
            log.warning("%s failed:\n%s", self.name, value)
            raise self._fail(f"failed: {value.strip().splitlines()[-1]}")
        return value


def setup_all(recipes: dict[Worker, tuple], *, timeout: float = 600.0) -> dict[Worker, str]:
    """``Worker.setup`` of several workers at once (their imports and model loads overlap):
    ``{worker: (recipe, *args)}``; returns ``{worker: why}`` for those that failed."""
    failed, sent = {}, []
    t0 = time.monotonic()
    for w, (recipe, *args) in recipes.items():
        try:
            w._send(("setup", recipe, tuple(args)))
            sent.append(w)
        except ContenderFailed as e:
            failed[w] = str(e)
    for w in sent:
        try:
            w._wait(max(1.0, timeout - (time.monotonic() - t0)))
            log.info("%s: set up in %.1f s", w.name, time.monotonic() - t0)
        except ContenderFailed as e:
            failed[w] = str(e)
    return failed


# --- the child's side ---------------------------------------------------------------
def _child_main(conn, device: str, threads: int | None) -> None:
    import torch

    from mlipd.quiet import quiet_third_party

    quiet_third_party()  # as the parent command (``mlipd.quiet``)

    if threads:
        torch.set_num_threads(threads)
    fn: Callable[[int], object] | None = None
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        op = msg[0]
        try:
            if op == "setup":
                fn = None
                gc.collect()
                fn = msg[1](*msg[2], device=device)
                conn.send(("ok", None))
            elif op == "run":
                conn.send(("ok", msg[1](*msg[2], **msg[3])))
            elif op == "call":
                t0 = time.perf_counter()
                fn(msg[1])
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                conn.send(("ok", time.perf_counter() - t0))
            elif op == "inspect":
                conn.send(("ok", fn.inspect()))
            elif op == "release":
                _release(device)
                conn.send(("ok", None))
            elif op == "reset":
                conn.send(("ok", _reset_peak(device)))
            elif op == "peak":
                conn.send(("ok", _peak(device)))
            elif op == "stop":
                conn.send(("ok", None))
                return
        except Exception as e:  # noqa: BLE001 - the child's top level: report to the parent
            if is_oom(e):
                fn = None
                _release(device)
                conn.send(("oom", str(e)[:300]))
            else:
                conn.send(("error", traceback.format_exc()))


def is_oom(e: BaseException | None) -> bool:
    """Whether ``e`` (or an exception it was raised from) is an out-of-memory error."""
    import torch

    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
            return True
        text = str(e).lower()
        if "out of memory" in text or "can't allocate memory" in text:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _release(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


_baseline = 0  # the child's memory in use at its last reset_peak


def _reset_peak(device: str) -> None:
    import torch

    global _baseline
    _release(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        _baseline = int(torch.cuda.memory_allocated())
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
    except OSError:
        log.debug("cannot reset the peak resident set: peaks include earlier work")
    _baseline = rss_bytes(os.getpid())


def _peak(device: str) -> tuple[int, int]:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated()), _baseline
    return peak_rss_bytes(os.getpid()), _baseline


# --- /proc ----------------------------------------------------------------------------
def _status_bytes(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` memory field in bytes; 0 where unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux; empty elsewhere)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(c) for c in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def rss_bytes(pid: int) -> int:
    return _status_bytes(pid, "VmRSS")


def peak_rss_bytes(pid: int) -> int:
    return _status_bytes(pid, "VmHWM")


def tree_rss_bytes(pid: int) -> int:
    return sum(rss_bytes(p) for p in [pid, *children(pid)])


def _kill_tree(pid: int) -> None:
    import signal

    for p in [*children(pid), pid]:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
