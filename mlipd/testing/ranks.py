"""Run a function on P real processes joined in a gloo process group.

    results = run_on_ranks(fn, 4, arg1, arg2, timeout_s=120)

``fn(rank, world_size, *args)`` runs in each of 4 spawned processes after
``torch.distributed`` (gloo, default group) is initialised; ``results[r]`` is what
rank r returned (it must be picklable). ``fn`` must be importable by name (a
module-level function; pytest test modules qualify). Any rank that raises makes
``run_on_ranks`` raise ``RanksFailed`` with that rank's traceback; processes still
running at the end or after ``timeout_s`` are killed.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class RanksFailed(RuntimeError):
    """A rank raised, died, or the ranks ran past their time limit."""


def _rank_main(rank: int, world_size: int, port: int, timeout_s: float, threads: int,
               fn: Callable, args: tuple, results) -> None:
    torch.set_num_threads(threads)
    try:
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", port, None, False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timeout)
        value = fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
        # plain pickle: a queue would pass tensors as shared-memory handles that die
        # with this process
        results.put((rank, True, pickle.dumps(value)))
    except Exception:  # noqa: BLE001 - the rank's top-level handler: report to the parent
        results.put((rank, False, traceback.format_exc()))


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300.0,
                 threads: int = 1) -> list[Any]:
    """``[fn(r, world_size, *args) for r in ranks]``, each in its own process."""
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, None, True,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, daemon=True, name=f"test-rank{r}",
                         args=(r, world_size, store.port, timeout_s, threads, fn, args, results))
             for r in range(world_size)]
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.start()
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise RanksFailed(f"ranks ran past {timeout_s} s") from None
                dead = [p.name for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RanksFailed(f"ranks died without a result: {dead}") from None
                continue
            if not ok:
                raise RanksFailed(f"rank {rank} raised:\n{value}")
            out[rank] = pickle.loads(value)  # bytes from our own child process
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [out[r] for r in range(world_size)]
