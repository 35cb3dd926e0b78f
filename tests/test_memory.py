"""Memory facts the engine and models act on: glibc heap tuning and free memory."""

import subprocess
import sys
import time

import numpy as np
import torch

from mlipd.memory import available_bytes

CHILD = """
import numpy as np
from mlipd.malloc import heap_free_bytes, keep_freed_memory
tuned = keep_freed_memory()
a = np.ones(50_000_000)  # 400 MB: above glibc's default mmap threshold
del a
print(tuned, heap_free_bytes())
"""


def _child(env_value: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         check=True, env={"MLIPD_KEEP_FREED_MEMORY": env_value, "PATH": ""})
    tuned, free = out.stdout.split()
    return tuned == "True", int(free)


def test_keep_freed_memory_keeps_a_freed_block_in_the_heap():
    tuned, free = _child("1")
    assert tuned
    assert free >= 400_000_000  # the freed array is reusable without the OS
    tuned, free = _child("0")  # the opt-out: glibc's default, the block went back
    assert not tuned
    assert free < 400_000_000


def test_available_bytes():
    cpu = available_bytes(torch.device("cpu"))
    assert cpu is not None
    assert 0 < cpu < 2**50
    assert available_bytes(torch.device("meta")) is None


# ---------------------------------------------------------------- when the worker trims


class _HeapModel:
    """An engine whose steps leave ``per_atom`` bytes of heap per atom resident until the
    heap is given back: the worker's trim decisions without gigabytes."""

    base = 300 << 20
    per_atom = 30_000  # bytes: a 48k-atom LJ step leaves ~1.5 GB

    def __init__(self) -> None:
        self.resident = self.base
        self.trims = 0

    def compute(self, structures, *, virial=True):
        from mlipd.types import Result

        n = sum(s.n_atoms for s in structures)
        self.resident = max(self.resident, self.base + n * self.per_atom)
        return [Result(energy=0.0, forces=np.zeros((s.n_atoms, 3))) for s in structures]

    def give_back(self) -> bool:
        self.trims += 1
        self.resident = self.base
        return True


def _blob(n_atoms: int):
    from mlipd.types import Structure

    return Structure(numbers=np.full(n_atoms, 18), positions=np.zeros((n_atoms, 3)),
                     cell=np.eye(3) * 100.0, pbc=np.ones(3, bool))


def test_the_worker_gives_the_heap_back_after_a_much_smaller_batch_or_when_idle(monkeypatch):
    """MD of one large system (the same size every step) keeps its heap: no trim in 30
    steps. A batch of under a quarter of its atoms triggers one trim, after which the
    heap is back at its base; so does an idle loop after a large step; small steps never
    leave enough behind (TRIM_MIN_BYTES) to trim."""
    import mlipd.server.worker as worker_module
    from mlipd.server.scheduler import Scheduler
    from mlipd.server.worker import EngineWorker

    heap = _HeapModel()
    monkeypatch.setattr(worker_module, "resident_bytes", lambda: heap.resident)
    monkeypatch.setattr(worker_module, "give_back_heap", heap.give_back)
    monkeypatch.setattr(worker_module, "IDLE_TRIM_S", 3600.0)  # not idle until said so
    workers = [EngineWorker(heap, scheduler=Scheduler(max_wait_s=0))]
    workers[0].start()

    def run(n_atoms: int, times: int = 1) -> None:
        for _ in range(times):
            workers[-1].submit("md", [_blob(n_atoms)]).result(timeout=30)

    def trims_reach(n: int) -> bool:  # a trim runs after the answer is out
        deadline = time.monotonic() + 30
        while heap.trims < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return heap.trims == n

    try:
        run(48_000, times=30)
        run(13_000, times=2)  # over a quarter of 48k: could reuse much of the heap
        assert heap.trims == 0  # the steps reuse it (each trim check ran before the next)
        run(100)
        assert trims_reach(1)
        assert heap.resident == heap.base
        run(100, times=20)  # small steps: nothing worth a trim
        run(5_000)  # 150 MB: under TRIM_MIN_BYTES
        run(100)
        run(48_000, times=2)
        assert heap.trims == 1
        assert workers[0].metrics.snapshot()["heap_trims"] == 1
        workers[0].close()
        monkeypatch.setattr(worker_module, "IDLE_TRIM_S", 0.2)
        heap.resident = heap.base  # a fresh process: its baseline
        workers.append(EngineWorker(heap, scheduler=Scheduler(max_wait_s=0)))
        workers[1].start()
        run(48_000)  # then idle
        assert trims_reach(2)
        assert heap.resident == heap.base
    finally:
        for w in workers:
            w.close()
