"""Keep freed heap memory for reuse: a per-process tuning for mlipd's long-running processes.

Every step moves arrays of N x 3 float64 (1.5 MB at 65k atoms) through several fresh
buffers (socket reads, msgpack frames, tensors), and a model's activations are
tensors of up to gigabytes. glibc serves blocks above its mmap threshold with fresh
mmap()s and hands them back on free(), so each such buffer pays its page faults
again, at every step. Raising the mmap threshold and the trim threshold keeps those
pages in the heap.

The price is memory: freed blocks stay in the heap, where fragmentation raises the
peak (`mlipd bench mace` runs its contenders with glibc's default malloc and says so).
Set ``MLIPD_KEEP_FREED_MEMORY=0`` for runs whose
limit is memory, not time (large systems on CPU); GPU runs keep their activations in
CUDA's own caching allocator either way.

``mlipd drive``, ``mlipd serve`` and every rank process call ``keep_freed_memory()``
at start-up; a Python program that runs an engine itself, or a client that sends
large structures, may call it too. No-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# blocks up to 2 GiB (mallopt's int maximum) come from the reused heap: a large step's
# activation tensors are of that order
MMAP_THRESHOLD = 2**31 - 1
TRIM_THRESHOLD = 1 << 30  # give memory back to the OS only above 1 GiB free at the top


def keep_freed_memory() -> bool:
    """Tune glibc malloc for this process (see module docstring); True if applied,
    False without glibc or with ``MLIPD_KEEP_FREED_MEMORY=0``."""
    if os.environ.get("MLIPD_KEEP_FREED_MEMORY", "1") == "0":
        return False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc tuning %s", "applied" if ok else "refused")
    return ok


# arenas of a server process: glibc gives each thread that allocates an arena of its own
# (up to 8 per core), each keeping its own free blocks and partly used pages; a server's
# threads (engine loop, socket threads, ZeroMQ's I/O) allocate and free one another's
# frames. After 17 frames of 8.4 MB and a give-back (tests/test_server_memory.py), RSS
# stayed +93 MB above its start with glibc's default, +14 MB with 2 arenas, +0 with 1;
# 2 leaves the engine's thread an arena the socket threads rarely contend for.
SERVER_ARENAS = 2


def limit_arenas(n: int = SERVER_ARENAS) -> bool:
    """At most ``n`` malloc arenas in this process (``mlipd serve`` calls it at start-up,
    before its threads exist); True if glibc took it. ``MLIPD_KEEP_FREED_MEMORY=0``
    leaves glibc's default here too."""
    if os.environ.get("MLIPD_KEEP_FREED_MEMORY", "1") == "0":
        return False
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_ARENA_MAX, int(n)))


def give_back_heap() -> bool:
    """Return free heap memory to the system after a large request: glibc's
    ``malloc_trim(0)`` (every arena; free pages inside the heap too, not only at its
    top) and, where CUDA is in use, torch's ``empty_cache``. The tuning above keeps freed
    blocks for reuse, which is right between steps of one size but keeps a 1e6-atom
    request's gigabytes after it was answered. A collection runs first: a refused
    request's error holds its traceback, whose frames hold the request's arrays, in a
    reference cycle with its future, which only the cyclic collector frees. True if glibc
    trimmed something."""
    import gc
    import sys

    gc.collect()

    torch = sys.modules.get("torch")  # never import torch just for this
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    libc = _glibc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    return bool(trim(0)) if trim is not None else False


def resident_bytes() -> int:
    """This process's resident memory now (``/proc/self/statm``; ~10 µs), plus, where
    CUDA is in use, what torch's caching allocator holds unused (``empty_cache`` gives
    that back); 0 where ``/proc`` is absent."""
    import sys

    try:
        with open("/proc/self/statm", "rb") as f:
            rss = int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        rss = 0
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        rss += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    return rss


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap_free_bytes() -> int:
    """Bytes free inside this process's malloc heap (reusable without the OS): glibc's
    ``mallinfo2().fordblks``; 0 where unknown (glibc < 2.33 or not glibc)."""
    libc = _glibc()
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None
    if fn is None:
        return 0
    fn.restype = _Mallinfo2
    return int(fn().fordblks)


@functools.cache  # find_library runs ldconfig: once per process, not per call
def _glibc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018  (glibc only: musl and macOS lack it)
    except (OSError, AttributeError):
        return None
    return libc
