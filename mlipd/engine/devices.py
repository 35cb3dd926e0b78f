"""Which device each rank computes on, and which backend the ranks talk over.

``--device auto`` (the default) is CUDA when torch sees a GPU, else the CPU. A node's
ranks take its devices in turn: local rank r computes on ``devices[r % len(devices)]``,
where ``devices`` is an explicit list (``--devices cuda:0,cuda:2``) or every GPU torch
sees for ``--device cuda``. NCCL needs one GPU per rank; when ranks share a device the
backend is gloo (rows staged through host memory).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from mlipd.errors import SetupError

BACKENDS = ("auto", "nccl", "gloo")
_DEVICE = re.compile(r"^(cpu|cuda)(:(\d+))?$")


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> a device this process can use; a
    one-line ``SetupError`` otherwise."""
    name = str(name).strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = _DEVICE.match(name)
    if m is None:
        raise SetupError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    if m.group(1) == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            raise SetupError(f"device {name!r}: torch {torch.__version__} has {build}; "
                             "use --device cpu (or auto), or install a CUDA build of torch")
        if m.group(3) is not None and int(m.group(3)) >= torch.cuda.device_count():
            raise SetupError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) "
                             "visible (cuda:0..)")
    return torch.device(name)


def node_devices(device: str, devices: Sequence[str] | None = None) -> tuple[str, ...]:
    """The devices a node's ranks take in turn (each checked)."""
    if devices:
        return tuple(str(resolve_device(d)) for d in devices)
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        return tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    return (str(dev),)


def local_device(devices: Sequence[str], local_rank: int) -> torch.device:
    return torch.device(devices[local_rank % len(devices)])


def pick_backend(requested: str, devices: Sequence[str], local_world_size: int) -> str:
    """nccl when every rank of a node has a GPU of its own (and nccl or auto is asked
    for), else gloo."""
    if requested not in BACKENDS:
        raise SetupError(f"backend {requested!r}: expected one of {', '.join(BACKENDS)}")
    used = [devices[r % len(devices)] for r in range(local_world_size)]
    own_gpu = all(d.startswith("cuda") for d in used) and len(set(used)) == len(used)
    if requested == "nccl" and not own_gpu:
        raise SetupError(f"backend nccl needs one GPU per rank: {local_world_size} ranks "
                         f"on {sorted(set(used))}; use --backend gloo (or auto)")
    if requested == "gloo" or not own_gpu:
        return "gloo"
    return "nccl"
