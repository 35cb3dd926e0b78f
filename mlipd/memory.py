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
