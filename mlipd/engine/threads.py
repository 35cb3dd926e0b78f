"""How many intra-op (torch) threads each rank uses.

The ranks of one host share its cores: by default each takes ``cores // local ranks``,
where ``cores`` is ``OMP_NUM_THREADS`` when set, else the CPUs this process may run on
(its affinity mask, which Slurm and taskset narrow). More threads than cores per host
makes the ranks, which meet at every collective, wait for each other's threads.
"""

from __future__ import annotations

import os

from mlipd.errors import SetupError


def host_cores() -> int:
    """CPU threads this host gives mlipd: ``OMP_NUM_THREADS``, else the affinity mask."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(threads: int | None, local_ranks: int) -> int:
    """``threads`` when given (checked), else this host's share per local rank."""
    if threads is not None:
        if threads < 1:
            raise SetupError(f"--threads must be >= 1, got {threads}")
        return int(threads)
    return max(1, host_cores() // max(local_ranks, 1))
