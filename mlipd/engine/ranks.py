"""Rank processes: devices and backend, the process group, and a follower's life.

Every rank computes on one device; several ranks may share a GPU. With one GPU per
rank the ranks talk over NCCL; when ranks share a device (more ranks than GPUs, CPU
ranks, or ``backend="gloo"`` asked for) they use gloo, staging GPU rows through host
memory (``mlipd.engine.comm``). Rank 0 (the caller's process) drives;
the others run ``follower_main`` until rank 0 stops them (spawned ranks start in
``mlipd.engine.rank_main``). Launch across nodes with
torchrun or srun (``mlipd.launch``).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from mlipd.engine.comm import Comm
from mlipd.engine.devices import local_device, pick_backend
from mlipd.engine.rank_loop import RankLoop
from mlipd.engine.single_rank import for_inference
from mlipd.engine.step import Step
from mlipd.malloc import keep_freed_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """Where a process sits in a job started by torchrun or srun (``mlipd.launch``).

    host, port: the rendezvous (rank 0's TCPStore)
    """

    rank: int
    size: int
    local_rank: int
    local_size: int
    host: str
    port: int


@dataclass(frozen=True)
class RankConfig:
    """Sent once from rank 0 to all ranks after the process group is up.

    devices: the devices of a node's ranks; local rank r computes on devices[r % len]
    backend: "nccl" or "gloo"
    """

    model: str | Callable
    dtype: torch.dtype
    skin: float
    devices: tuple[str, ...]
    backend: str

    def device(self, local_rank: int) -> torch.device:
        return local_device(self.devices, local_rank)

    def comm(self, local_rank: int, group=None) -> Comm:
        device = self.device(local_rank)
        return Comm(group=group, device=device,
                    wire=device if self.backend == "nccl" else "cpu")


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


JOINED_KEY = "mlipd/joined/"  # + rank: set in rank 0's store just before a rank joins


def init_process_group(*, backend: str, rank: int, world_size: int, timeout_s: float,
                       host: str | None = None, port: int | None = None,
                       store: dist.Store | None = None,
                       connect_timeout_s: float | None = None) -> None:
    """Join the group through rank 0's TCPStore at host:port (hosted by rank 0, unless
    rank 0 passes the ``store`` it already hosts). A rank other than 0 first sets
    ``JOINED_KEY + rank``, so a rank 0 that watches its ranks knows when to join.
    ``connect_timeout_s``: a shorter bound on the connection itself (collectives then
    get ``timeout_s``)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout,
                              wait_for_workers=False)
    if rank != 0:
        store.set(f"{JOINED_KEY}{rank}", str(os.getpid()))
    short = connect_timeout_s is not None and hasattr(c10d, "_set_pg_timeout")
    try:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=connect_timeout_s)
                                if short else timeout)
    except BaseException:
        forget_failed_group()
        raise
    if short:
        c10d._set_pg_timeout(timeout)


def forget_failed_group() -> None:
    """A failed ``init_process_group`` has already counted its group, and torch names a
    group by that count: the next join of this process would wait on keys named "1/..."
    while fresh ranks write "0/...", and every restart after one failed join would time
    out. ``destroy_process_group`` resets the count; a group that never formed has
    nothing to destroy, so reset it here."""
    if not dist.is_initialized() and hasattr(c10d, "_world"):
        c10d._world.group_count = 0


def rank_step(config: RankConfig, local_rank: int) -> Step:
    """This rank's step: its model (rank 0's weights, collective) on its device."""
    comm = config.comm(local_rank)
    model = load_local_model(config, comm.device)
    sync_weights(model)
    return Step(model, comm, device=comm.device, dtype=config.dtype, skin=config.skin)


def follower_main(rank: int, world_size: int, *, backend: str, timeout_s: float, host: str,
                  port: int, local_rank: int, threads: int | None = None,
                  report: Callable[[str], None] | None = None) -> int:
    """A non-zero rank from start to stop; returns its exit code. ``report`` gets one
    line (``rank R: Type: message``) when the rank fails."""
    keep_freed_memory()  # as rank 0's mlipd serve/drive process (see mlipd.malloc)
    if threads:
        torch.set_num_threads(threads)
    try:
        init_process_group(backend=backend, rank=rank, world_size=world_size,
                           timeout_s=timeout_s, host=host, port=port)
        config: RankConfig = Comm().broadcast_object()
        if config.device(local_rank).type == "cuda":
            torch.cuda.set_device(config.device(local_rank))
        RankLoop(rank_step(config, local_rank)).follow()
    except Exception as e:  # noqa: BLE001 - this rank's one top-level handler: report, exit 1
        try:
            log.exception("rank %d failed", rank)
            if report is not None:
                report(f"rank {rank}: {type(e).__name__}: {e}")
        finally:
            # exit at once: closing our sockets is what unblocks the peers' collectives
            # (and an interpreter exit with a process group alive may never end)
            os._exit(1)
    dist.destroy_process_group()
    return 0


def config_for(model: str | Callable, *, dtype: torch.dtype, skin: float,
               devices: Sequence[str], backend: str, local_world_size: int) -> RankConfig:
    """The RankConfig of a run whose node holds ``local_world_size`` ranks."""
    return RankConfig(model=model, dtype=dtype, skin=float(skin), devices=tuple(devices),
                      backend=pick_backend(backend, devices, local_world_size))
