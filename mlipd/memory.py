"""How much memory a device has free: for models that choose between storing and
recomputing activations (CHGNet's ``recompute=auto``)."""

from __future__ import annotations

import torch

from mlipd.malloc import heap_free_bytes


def available_bytes(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: CUDA's free memory plus what torch's
    caching allocator holds unused (a previous step's, reusable), or on a Linux CPU
    the kernel's MemAvailable plus what this process's malloc heap holds free (see
    ``mlipd.malloc``); None where unknown."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + int(cached)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 + heap_free_bytes()
    except OSError:
        return None
    return None


_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory",
             "defaultcpuallocator", "std::bad_alloc")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` (or an error it was raised from) is an allocation failure: Python's
    ``MemoryError``, torch's ``OutOfMemoryError`` (CUDA), or the CPU allocator's
    ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory"), also when an engine
    wrapped it (``CalculationFailed`` from a rank carries the text)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            return True
        if any(t in str(e).lower() for t in _OOM_TEXT):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def resident_bytes() -> int:
    """This process's resident set size now (Linux ``/proc/self/statm``), else its peak
    (``getrusage``)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
