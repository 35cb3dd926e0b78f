"""The multi-rank engine. The caller's process is rank 0, the front end.

``DistributedEngine(model, device=, dtype=, ranks=N)`` spawns N - 1 rank processes
(one per GPU on cuda: rank r uses cuda:r), joins them in a torch.distributed group
(NCCL on GPUs, gloo on CPU) and keeps them for its lifetime. Each ``compute``:
rank 0 decides whether to rebuild the partition (``RebuildPolicy``), partitions the
batch (``partition_batch``; whole structures per rank when that balances, else
every structure over all ranks), then all ranks run one ``RankLoop.execute``; rank 0
sums energies and virials and places forces in the caller's atom order.

Failures: any exception during a step, on any rank, or a dead rank, becomes
``CalculationFailed`` for that request. The ranks are then torn down (peers may be
blocked inside a collective) and respawned before the next request, which succeeds.
Collectives time out after ``timeout_s``. A rank that died between requests is
noticed before the next step and replaced. Under torchrun (``attach=True``) ranks
cannot be respawned: the engine stays broken and every request fails, so the
front end should exit and let torchrun restart the job.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from mlipd.engine.comm import Comm
from mlipd.engine.local import check_species
from mlipd.engine.partition import Geometry, partition_batch
from mlipd.engine.ranks import (
    STEP,
    STOP,
    RankConfig,
    RankLoop,
    StepHeader,
    init_process_group,
    load_local_model,
    rank_device,
    spawned_follower,
    sync_weights,
    torchrun_backend,
    torchrun_world,
)
from mlipd.engine.step import Frame, RankStep
from mlipd.engine.verlet import RebuildPolicy
from mlipd.errors import CalculationFailed, MlipdError, SetupError
from mlipd.types import Result, Structure

log = logging.getLogger(__name__)


class Frontend:
    """Rank 0's side of the step loop: policy, partition, assembly of Results."""

    def __init__(self, loop: RankLoop, *, skin: float, partition: str,
                 imbalance_limit: float = 1.5) -> None:
        self.loop = loop
        self.partition = partition
        self.policy = RebuildPolicy(skin=skin, imbalance_limit=imbalance_limit)
        self.last_stats: np.ndarray | None = None  # (P, 3): owned atoms, edges, halo atoms

    @property
    def world_size(self) -> int:
        return self.loop.comm.world_size

    def compute(self, structures: Sequence[Structure], *, virial: bool) -> list[Result]:
        rebuild = self.policy.decide(structures)
        counts = tuple(s.n_atoms for s in structures)
        header = StepHeader(cmd=STEP, counts=counts,
                            pbc=tuple(tuple(bool(x) for x in s.pbc) for s in structures),
                            virial=virial, rebuild=rebuild)
        owner = None
        if rebuild:
            owner = partition_batch(
                [Geometry(s.positions, s.cell, s.pbc) for s in structures], self.world_size,
                radius=self.loop.step.radius, method=self.partition)
        frame = Frame(numbers=np.concatenate([s.numbers for s in structures]),
                      positions=np.concatenate([s.positions for s in structures]),
                      cells=np.stack([s.cell for s in structures]),
                      pbc=np.stack([s.pbc for s in structures]),
                      offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                      owner=owner)
        self.loop.comm.broadcast_object(header)
        mine, gathered = self.loop.execute(header, frame)
        return self._assemble(structures, gathered, self.loop.owner, virial=virial,
                              widths=mine.extra_widths)

    def _assemble(self, structures, gathered: list[torch.Tensor], owner: np.ndarray, *,
                  virial: bool, widths: tuple[int, ...]) -> list[Result]:
        nb, n = len(structures), owner.shape[0]
        spec = self.loop.step.model.spec
        energies, virials = np.zeros(nb), np.zeros((nb, 3, 3))
        rows, stats = None, np.zeros((len(gathered), 3))
        for q, buf in enumerate(gathered):
            flat = buf.view(-1).numpy()
            energies += flat[:nb]
            virials += flat[nb: 10 * nb].reshape(nb, 3, 3)
            stats[q] = flat[10 * nb: 10 * nb + 3]
            ids = np.flatnonzero(owner == q)
            body = flat[10 * nb + 3:]
            width = body.size // max(int(np.bincount(owner).max()), 1)
            if rows is None:
                rows = np.zeros((n, width))
            rows[ids] = body.reshape(-1, width)[: ids.size]
        self.last_stats = stats
        self.policy.report_load(stats[:, 1])
        if not np.isfinite(energies).all() or not np.isfinite(rows[:, :3]).all():
            raise CalculationFailed("model returned NaN or infinite energy or forces")
        offsets = np.concatenate([[0], np.cumsum([s.n_atoms for s in structures])])
        results = []
        for b, s in enumerate(structures):
            lo, hi = offsets[b], offsets[b + 1]
            extras, col = {}, 3
            for name, width in zip(spec.per_atom_extras, widths, strict=True):
                block = rows[lo:hi, col: col + width]  # per-atom extras, flattened in rows
                extras[name] = (block[:, 0] if width == 1 else block).tolist()
                col += width
            results.append(Result(
                energy=float(energies[b]), forces=rows[lo:hi, :3].copy(),
                virial=virials[b].copy() if s.pbc.all() and virial else None,
                extras=extras))
        return results

    def stop(self) -> None:
        self.loop.comm.broadcast_object(StepHeader(cmd=STOP))


class DistributedEngine:
    """Engine API (``compute``, ``spec``, ``world_size``, ``calls``, ``close``) on N ranks.

    model: a registry spec (``"reference:layers=3"``) or a picklable zero-argument
    factory returning a Model. Options (keyword-only): device, dtype, ranks,
    skin (Å, Verlet skin of the reused lists), partition ("rcb", "slab", "metis"),
    timeout_s (collectives and rendezvous), threads_per_rank (CPU threads of each
    spawned rank; default: cores / ranks), attach (join a torchrun group instead of
    spawning).
    """

    def __init__(self, model: str | Callable, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float64, ranks: int = 2, skin: float = 0.5,
                 partition: str = "rcb", timeout_s: float = 120.0,
                 threads_per_rank: int | None = None, attach: bool = False) -> None:
        if ranks < 1:
            raise SetupError(f"ranks must be >= 1, got {ranks}")
        self._config = RankConfig(model=model, device_type=torch.device(device).type,
                                  dtype=dtype, skin=float(skin))
        self._device = torch.device(device)
        if self._device.type == "cuda" and not attach and torch.cuda.device_count() < ranks:
            raise SetupError(f"{ranks} ranks need {ranks} GPUs, "
                             f"found {torch.cuda.device_count()}")
        self._ranks = ranks
        self._partition = partition
        self._timeout_s = float(timeout_s)
        self._threads = threads_per_rank or max(1, (os.cpu_count() or 1) // ranks)
        self._attach = attach
        self._procs: list = []
        self._errors = None
        self._front: Frontend | None = None
        self._broken: str | None = None
        self.calls = 0
        self._start()

    # --- lifecycle ----------------------------------------------------------------
    def _start(self) -> None:
        cfg = self._config
        backend = "nccl" if cfg.device_type == "cuda" else "gloo"
        device = rank_device(cfg.device_type, 0) if cfg.device_type == "cuda" else self._device
        model = load_local_model(cfg, device)  # a bad model fails here, before any rank exists
        if dist.is_initialized():
            raise SetupError("a process group already exists in this process: "
                             "one DistributedEngine per process")
        try:
            self._join(backend, model, device)
        except (RuntimeError, ValueError, OSError) as e:
            self._teardown()
            raise SetupError(f"could not start {self._ranks} ranks: {e}") from e

    def _join(self, backend: str, model, device: torch.device) -> None:
        cfg = self._config
        if self._attach:
            world = torchrun_world()
            if world is None or world[0] != 0:
                raise SetupError("attach=True needs torchrun's RANK=0 and WORLD_SIZE > 1")
            self._ranks = world[1]
            backend = torchrun_backend(cfg.device_type)
            init_process_group(backend=backend, rank=0, world_size=world[1],
                               timeout_s=self._timeout_s)
        else:
            self._spawn(backend)
        comm = Comm(device=device if backend == "nccl" else "cpu")
        comm.broadcast_object(cfg)
        sync_weights(model)
        step = RankStep(model, comm, device=device, dtype=cfg.dtype, skin=cfg.skin)
        self._front = Frontend(RankLoop(comm, step), skin=cfg.skin, partition=self._partition)
        self._broken = None
        log.info("distributed engine up: %d ranks, backend %s", self._ranks, backend)

    def _spawn(self, backend: str) -> None:
        import datetime

        ctx = mp.get_context("spawn")
        timeout = datetime.timedelta(seconds=self._timeout_s)
        store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timeout,
                              wait_for_workers=False)
        self._errors = ctx.Queue()
        self._procs = [
            ctx.Process(target=spawned_follower, daemon=True, name=f"mlipd-rank{r}",
                        args=(r, self._ranks, backend, "127.0.0.1", store.port,
                              self._timeout_s, self._threads, self._errors))
            for r in range(1, self._ranks)
        ]
        for p in self._procs:
            p.start()
        dist.init_process_group(backend, store=store, rank=0, world_size=self._ranks,
                                timeout=timeout)

    def _teardown(self) -> None:
        """Stop rank processes without talking to them (they may be inside a collective)."""
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []
        if dist.is_initialized():
            dist.destroy_process_group()
        self._front = None

    def _peer_errors(self) -> list[str]:
        """What failed ranks reported, and which ranks died without a word."""
        out = []
        while self._errors is not None:
            try:
                out.append(self._errors.get(timeout=0.5 if not out else 0.05))
            except queue.Empty:
                break
        reported = {m.split(":", 1)[0] for m in out}
        for r, p in enumerate(self._procs, start=1):
            p.join(timeout=0.1)
            if p.exitcode not in (None, 1) and f"rank {r}" not in reported:
                out.append(f"rank {r} died (exit code {p.exitcode})")
        return out

    def close(self) -> None:
        """Stop the ranks (politely if they are healthy)."""
        if self._front is not None and self._broken is None:
            try:
                self._front.stop()
            except RuntimeError as e:
                log.warning("ranks did not take the stop command: %s", e)
            for p in self._procs:
                p.join(timeout=10)
        self._teardown()

    def __enter__(self) -> DistributedEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- engine API ---------------------------------------------------------------
    @property
    def spec(self):
        return self._front.loop.step.model.spec if self._front else None

    @property
    def world_size(self) -> int:
        return self._ranks

    @property
    def last_stats(self) -> np.ndarray | None:
        """(P, 3) per rank of the last step: owned atoms, edges (r < cutoff), halo atoms."""
        return None if self._front is None else self._front.last_stats

    @property
    def rebuilds(self) -> int:
        return 0 if self._front is None else self._front.policy.rebuilds

    def compute(self, structures: Sequence[Structure], *, virial: bool = True) -> list[Result]:
        if not structures:
            return []
        self._ensure_ranks()
        check_species(self._front.loop.step.model, structures)
        self.calls += 1
        try:
            return self._front.compute(structures, virial=virial)
        except Exception as e:  # peers may sit in a collective: any failure tears ranks down
            self._broken = f"{type(e).__name__}: {e}"
            peers = self._peer_errors()
            self._teardown()
            detail = "; ".join(peers) if peers else self._broken
            log.error("distributed step failed (%s); ranks will be restarted", detail)
            if isinstance(e, MlipdError) and not peers:
                raise CalculationFailed(str(e)) from e
            raise CalculationFailed(f"distributed step failed: {detail}") from e

    def _ensure_ranks(self) -> None:
        dead = [p.name for p in self._procs if not p.is_alive()]
        if self._broken is None and not dead and self._front is not None:
            return
        if self._attach:
            raise CalculationFailed(f"engine broken ({self._broken or dead}); torchrun ranks "
                                    "cannot be restarted from here")
        if dead:
            log.warning("ranks %s died; restarting all ranks", dead)
        self._teardown()
        try:
            self._start()
        except (RuntimeError, MlipdError) as e:
            self._teardown()
            raise CalculationFailed(f"could not restart ranks: {e}") from e
