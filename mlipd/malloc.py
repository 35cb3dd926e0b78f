"""Keep freed heap memory for reuse: a per-process tuning for mlipd's long-running processes.

Every step moves arrays of N x 3 float64 (1.5 MB at 65k atoms) through several fresh
buffers (socket reads, msgpack frames, tensors). glibc serves blocks above its mmap
threshold with fresh mmap()s and hands them back on free(), so each such buffer pays
its page faults again: measured here, a 65k-atom ZeroMQ round trip spent 3.7 of its
7.6 ms of overhead in them. Raising the mmap threshold and the trim threshold keeps
those pages in the heap, at the price of holding the process's high-water mark.

``mlipd drive`` and ``mlipd serve`` call ``keep_freed_memory()`` at start-up; a Python
client that sends large structures may call it too. No-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20  # blocks up to 256 MiB come from the (reused) heap
TRIM_THRESHOLD = 1 << 30  # give memory back to the OS only above 1 GiB free at the top


def keep_freed_memory() -> bool:
    """Tune glibc malloc for this process (see module docstring); True if applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc tuning %s", "applied" if ok else "refused")
    return ok
