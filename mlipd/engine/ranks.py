"""Ranks: the per-step protocol every rank follows, spawning, and the torchrun entry.

Rank 0 (the front end, which owns all I/O) drives; the other ranks run ``follow``:

    rank 0:  broadcast StepHeader -> share frame -> RankStep.run -> gather -> Results
    others:  receive StepHeader   -> share frame -> RankStep.run -> gather
    a StepHeader with cmd="stop" ends ``follow``.

The frame travels as broadcasts: positions (N, 3) and cells every step; atomic numbers
and the owner of every atom only when the partition is rebuilt. The owner array is
computed on rank 0 alone so all ranks agree on it bit for bit, also across nodes.

Launch with torchrun (multi-node is torchrun's job): every rank runs
``python -m mlipd.engine.ranks <mlipd arguments>``, e.g.
``torchrun --nnodes 2 --nproc-per-node 4 --master-addr HOST --master-port 29500
-m mlipd.engine.ranks serve --model mace:m.pt --device cuda --zmq tcp://127.0.0.1:5555``:
rank 0 runs that ``mlipd`` command, whose engine joins the torchrun group (``--ranks``
is then ignored: the group size is torchrun's); the other ranks follow it. The
master port must be a real port (torchrun's static rendezvous hangs on 0).
``MLIPD_BACKEND`` overrides the backend, ``MLIPD_TIMEOUT_S`` the collective timeout of
the following ranks.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from mlipd.engine.comm import Comm
from mlipd.engine.local import for_inference
from mlipd.engine.step import Frame, RankOutput, RankStep
from mlipd.malloc import keep_freed_memory

log = logging.getLogger(__name__)

STEP, STOP = "step", "stop"
TORCHRUN_FLAG = "MLIPD_TORCHRUN"  # set by ``main`` on rank 0 for make_engine


@dataclass(frozen=True)
class RankConfig:
    """Sent once from rank 0 to all ranks after the process group is up."""

    model: str | Callable
    device_type: str
    dtype: torch.dtype
    skin: float


@dataclass(frozen=True)
class StepHeader:
    cmd: str
    counts: tuple[int, ...] = ()
    pbc: tuple[tuple[bool, bool, bool], ...] = ()
    virial: bool = True
    rebuild: bool = False


def rank_device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cuda":
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device(device_type)


def load_local_model(config: RankConfig, device: torch.device):
    """The model on this rank's device and dtype (no communication)."""
    from mlipd.models.registry import load_model

    model = load_model(config.model) if isinstance(config.model, str) else config.model()
    return for_inference(model, device, config.dtype)


def sync_weights(model) -> None:
    """Rank 0's weights on every rank, whatever each model's init did (collective)."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if isinstance(t, torch.Tensor) and t.numel():
                dist.broadcast(t, src=0)


def build_model(config: RankConfig, device: torch.device):
    """The model on this rank, with rank 0's weights (collective)."""
    model = load_local_model(config, device)
    sync_weights(model)
    return model


class RankLoop:
    """One rank's state across steps (the last frame's numbers and owners)."""

    def __init__(self, comm: Comm, step: RankStep) -> None:
        self.comm = comm
        self.step = step
        self._numbers: np.ndarray | None = None
        self.owner: np.ndarray | None = None  # (N,) owner rank of every atom, last partition

    def share(self, header: StepHeader, frame: Frame | None) -> Frame:
        """Rank 0 passes its frame; every rank returns the same frame."""
        c = self.comm
        n, b = sum(header.counts), len(header.counts)
        if header.rebuild:
            self._numbers = c.broadcast_array(frame and frame.numbers, shape=(n,),
                                              dtype=torch.long).numpy()
            self.owner = c.broadcast_array(frame and frame.owner, shape=(n,),
                                           dtype=torch.long).numpy()
        if self._numbers is None or self.owner is None:
            raise RuntimeError("first step must rebuild the partition")
        positions = c.broadcast_array(frame and frame.positions, shape=(n, 3),
                                      dtype=torch.float64).numpy()
        cells = c.broadcast_array(frame and frame.cells, shape=(b, 3, 3),
                                  dtype=torch.float64).numpy()
        offsets = np.concatenate([[0], np.cumsum(header.counts)]).astype(np.int64)
        return Frame(numbers=self._numbers, positions=positions, cells=cells,
                     pbc=np.array(header.pbc, dtype=bool).reshape(b, 3), offsets=offsets,
                     owner=self.owner)

    def execute(self, header: StepHeader,
                frame: Frame | None = None) -> tuple[RankOutput, list[torch.Tensor] | None]:
        """One step on this rank; on rank 0 also every rank's packed output."""
        frame = self.share(header, frame)
        if header.rebuild:
            self.step.rebuild(frame)
        out = self.step.run(frame, virial=header.virial)
        n_max = int(np.bincount(frame.owner, minlength=self.comm.world_size).max())
        packed = pack(out, n_max)
        return out, self.comm.gather_rows(packed.view(-1, 1), n_max=packed.shape[0])

    def follow(self) -> None:
        """Non-zero ranks: run steps until rank 0 says stop."""
        while True:
            header = self.comm.broadcast_object()
            if header.cmd == STOP:
                return
            self.execute(header)


def pack(out: RankOutput, n_max: int) -> torch.Tensor:
    """Flat float64: energies (B), virials (9B), stats (3), rows padded to n_max rows."""
    rows = out.rows.detach().double().cpu()
    padded = rows.new_zeros((n_max, rows.shape[1]))
    padded[: rows.shape[0]] = rows
    return torch.cat([out.energies.double().cpu(), out.virials.double().cpu().reshape(-1),
                      torch.tensor(out.stats, dtype=torch.float64), padded.reshape(-1)])


def init_process_group(*, backend: str, rank: int, world_size: int, timeout_s: float,
                       host: str | None = None, port: int | None = None) -> None:
    """Join the group through rank 0's TCPStore (host/port) or torchrun's env://."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if host is None:
        dist.init_process_group(backend, init_method="env://", rank=rank,
                                world_size=world_size, timeout=timeout)
        return
    store = dist.TCPStore(host, port, None, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)


def follower_main(rank: int, world_size: int, *, backend: str, timeout_s: float,
                  host: str | None = None, port: int | None = None,
                  threads: int | None = None, errors=None, local_rank: int | None = None) -> int:
    """A non-zero rank from start to stop; returns its exit code."""
    keep_freed_memory()  # as rank 0's mlipd serve/drive process (see mlipd.malloc)
    if threads:
        torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank_device("cuda", rank if local_rank is None else local_rank))
    try:
        init_process_group(backend=backend, rank=rank, world_size=world_size,
                           timeout_s=timeout_s, host=host, port=port)
        comm0 = Comm()
        config = comm0.broadcast_object()
        device = rank_device(config.device_type, rank if local_rank is None else local_rank)
        comm = Comm(device=device if backend == "nccl" else "cpu")
        model = build_model(config, device)
        RankLoop(comm, RankStep(model, comm, device=device, dtype=config.dtype,
                                skin=config.skin)).follow()
    except Exception as e:  # this rank's one top-level handler: report, then exit 1
        log.exception("rank %d failed", rank)
        if errors is not None:
            errors.put(f"rank {rank}: {type(e).__name__}: {e}")
            errors.close()
            errors.join_thread()
        # exit at once: closing our sockets is what unblocks the peers' collectives
        os._exit(1)
    dist.destroy_process_group()
    return 0


def spawned_follower(rank: int, world_size: int, backend: str, host: str, port: int,
                     timeout_s: float, threads: int | None, errors) -> None:
    """Target of a spawned rank process (multiprocessing needs a module-level function)."""
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s: %(message)s")
    follower_main(rank, world_size, backend=backend, timeout_s=timeout_s, host=host, port=port,
                  threads=threads, errors=errors)


def torchrun_world() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by torchrun with several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return None
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def torchrun_backend(argv_or_device) -> str:
    """``MLIPD_BACKEND`` if set, else nccl when the run uses CUDA, else gloo."""
    if os.environ.get("MLIPD_BACKEND"):
        return os.environ["MLIPD_BACKEND"]
    words = [argv_or_device] if isinstance(argv_or_device, str) else list(argv_or_device)
    uses_cuda = any(str(w).startswith("cuda") for w in words)
    return "nccl" if uses_cuda and torch.cuda.is_available() else "gloo"


def main(argv: list[str] | None = None) -> int:
    """``python -m mlipd.engine.ranks <mlipd args>`` on every torchrun rank."""
    world = torchrun_world()
    argv = sys.argv[1:] if argv is None else argv
    if world is None or world[0] == 0:
        from mlipd.cli import main as cli_main

        if world is not None:
            os.environ[TORCHRUN_FLAG] = "1"
        return cli_main(argv)
    rank, size, local_rank = world
    logging.basicConfig(level=logging.WARNING)
    return follower_main(rank, size, backend=torchrun_backend(argv), timeout_s=float(
        os.environ.get("MLIPD_TIMEOUT_S", "120")), local_rank=local_rank)


if __name__ == "__main__":
    sys.exit(main())
