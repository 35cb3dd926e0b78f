"""Memory facts the engine and models act on: glibc heap tuning and free memory."""

import subprocess
import sys

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
