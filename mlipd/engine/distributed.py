"""The multi-rank engine. The caller's process is rank 0, the front end.

``DistributedEngine(model, device=, dtype=, ranks=N)`` spawns N - 1 rank processes,
joins them in a torch.distributed group (NCCL with one GPU per rank, gloo otherwise;
see ``mlipd.engine.devices``) and keeps them for its lifetime. Each ``compute`` runs
the engine's one step (``mlipd.engine.step``) on every rank through rank 0's
``Coordinator``.

Failures. What rank 0 refuses alone leaves the ranks as they were and costs no
restart: unknown species, the geometry guards (``mlipd.engine.guards``, before any
rank sees the batch), a passed deadline (checked before and after the step), a
non-finite result (assembled on rank 0 after every rank finished). Any exception
during a step, on any rank, or a dead rank, becomes ``CalculationFailed`` for that
request; the ranks are then torn down (peers may be blocked inside a collective)
and respawned before the next request, which succeeds. Collectives time out after
``timeout_s``. A spawned rank also writes a heartbeat into shared memory every
``HEARTBEAT_PERIOD_S`` from a thread of its own; a monitor thread on rank 0 kills a
rank silent for ``heartbeat_s`` (stopped, swapped out, hung with the GIL held), so
rank 0's collective fails at once instead of after ``timeout_s`` and the ranks are
replaced. A rank that died between requests is noticed before the next step and
replaced. Under torchrun or srun (``world=``) ranks cannot be respawned: the engine
stays broken and every request fails, so the front end should exit and let the
launcher restart the job.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from mlipd.engine.coordinator import Coordinator
from mlipd.engine.devices import node_devices
from mlipd.engine.guards import Limits
from mlipd.engine.rank_loop import RankLoop
from mlipd.engine.ranks import (
    World,
    config_for,
    init_process_group,
    load_local_model,
    spawned_follower,
    sync_weights,
)
from mlipd.engine.step import Step
from mlipd.engine.threads import threads_per_rank as resolve_threads
from mlipd.errors import CalculationFailed, MlipdError, SetupError
from mlipd.model_api import ModelSpec
from mlipd.types import Result, Structure

log = logging.getLogger(__name__)

HEARTBEAT_PERIOD_S = 0.5  # how often a spawned rank writes its heartbeat
DEFAULT_HEARTBEAT_S = 10.0  # silence after which rank 0 kills and replaces a rank
STARTUP_GRACE_S = 60.0  # a spawned rank imports torch before its first beat


def _beat(beats, slot: int) -> None:
    """A rank's heartbeat thread: its slot holds the last time (CLOCK_MONOTONIC, shared
    by every process of the host) at which this process was scheduled."""
    while True:
        beats[slot] = time.monotonic()
        time.sleep(HEARTBEAT_PERIOD_S)


def _spawned_rank(rank: int, world_size: int, backend: str, host: str, port: int,
                  timeout_s: float, threads: int | None, errors, beats) -> None:
    """Target of a spawned rank process: a heartbeat thread, then the follower's life."""
    threading.Thread(target=_beat, args=(beats, rank - 1), name="mlipd-heartbeat",
                     daemon=True).start()
    spawned_follower(rank, world_size, backend, host, port, timeout_s, threads, errors)


class DistributedEngine:
    """The engine API on N ranks.

    model: a registry spec (``"reference:layers=3"``) or a picklable zero-argument
    factory returning a Model. Options (keyword-only): device (``auto``, ``cpu``,
    ``cuda``, ``cuda:N``), devices (explicit list, rank r on the r-th), backend
    (``auto``, ``nccl``, ``gloo``), dtype, ranks, skin (Å, Verlet skin of the reused
    lists), partition ("rcb", "slab", "metis"), timeout_s (collectives and
    rendezvous), threads_per_rank (intra-op threads of each rank; default: cores /
    ranks of this host; rank 0, the calling process, takes the same and gets its own
    count back at ``close``), world (join a torchrun/srun job as its rank 0 instead of
    spawning), limits (the geometry guards' budgets), heartbeat_s (kill and replace a
    spawned rank silent this long; see the module docstring).
    """

    def __init__(self, model: str | Callable, *, device: str = "cpu",
                 devices: Sequence[str] | None = None, backend: str = "auto",
                 dtype: torch.dtype = torch.float64, ranks: int = 2, skin: float = 0.5,
                 partition: str = "rcb", timeout_s: float = 120.0,
                 threads_per_rank: int | None = None, world: World | None = None,
                 limits: Limits | None = None, heartbeat_s: float | None = None) -> None:
        if world is not None:
            if world.rank != 0:
                raise SetupError("only rank 0 of a launched job runs the engine's front end")
            ranks = world.size
        if ranks < 1:
            raise SetupError(f"ranks must be >= 1, got {ranks}")
        local = world.local_size if world is not None else ranks
        self._config = config_for(model, dtype=dtype, skin=skin,
                                  devices=node_devices(device, devices), backend=backend,
                                  local_world_size=local)
        self._ranks = ranks
        self._world = world
        self._partition = partition
        self._limits = limits
        self._timeout_s = float(timeout_s)
        self._heartbeat_s = float(heartbeat_s or DEFAULT_HEARTBEAT_S)
        self._beats = None  # shared heartbeat slots of the spawned ranks
        self._silent: str | None = None  # why the monitor killed a rank
        self._monitor_stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self.restarts = 0  # times the ranks were torn down and spawned again
        # every rank of this host, rank 0 (this process) too, takes its share of the cores
        self._threads = resolve_threads(threads_per_rank, local)
        self._caller_threads = torch.get_num_threads()
        torch.set_num_threads(self._threads)
        self._procs: list = []
        self._errors = None
        self._front: Coordinator | None = None
        self._broken: str | None = None
        self.calls = 0
        try:
            self._start()
        except BaseException:
            torch.set_num_threads(self._caller_threads)
            raise

    # --- lifecycle ----------------------------------------------------------------
    def _start(self) -> None:
        cfg = self._config
        device = cfg.device(0)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model = load_local_model(cfg, device)  # a bad model fails here, before any rank exists
        self._spec = model.spec  # kept while the ranks restart or after close
        if dist.is_initialized():
            raise SetupError("a process group already exists in this process: "
                             "one DistributedEngine per process")
        try:
            self._join(model)
        except (RuntimeError, ValueError, OSError) as e:
            self._teardown()
            raise SetupError(f"could not start {self._ranks} ranks: {e}") from e

    def _join(self, model) -> None:
        cfg, w = self._config, self._world
        if w is not None:
            init_process_group(backend=cfg.backend, rank=0, world_size=w.size,
                               timeout_s=self._timeout_s, host=w.host, port=w.port)
        else:
            self._spawn()
        comm = cfg.comm(0)
        comm.broadcast_object(cfg)
        sync_weights(model)
        # one rank: the step without a communicator (no collective, no halo)
        step = Step(model, comm if self._ranks > 1 else None, device=comm.device,
                    dtype=cfg.dtype, skin=cfg.skin)
        self._front = Coordinator(RankLoop(step), skin=cfg.skin, partition=self._partition,
                                  limits=self._limits)
        self._broken = None
        log.info("distributed engine up: %d ranks, backend %s, devices %s", self._ranks,
                 cfg.backend, ", ".join(cfg.devices))

    def _spawn(self) -> None:
        # rank 0 hosts the store on a port of the kernel's choice, then tells the ranks
        store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=self._timeout_s))
        port = store.port
        ctx = mp.get_context("spawn")
        self._errors = ctx.Queue()
        # a rank is not silent before it could beat: the slots start in the future
        self._beats = ctx.Array("d", [time.monotonic() + STARTUP_GRACE_S] * (self._ranks - 1),
                                lock=False)
        self._procs = [
            ctx.Process(target=_spawned_rank, daemon=True, name=f"mlipd-rank{r}",
                        args=(r, self._ranks, self._config.backend, "127.0.0.1", port,
                              self._timeout_s, self._threads, self._errors, self._beats))
            for r in range(1, self._ranks)
        ]
        for p in self._procs:
            p.start()
        self._start_monitor()
        init_process_group(backend=self._config.backend, rank=0, world_size=self._ranks,
                           timeout_s=self._timeout_s, store=store)

    def _start_monitor(self) -> None:
        self._monitor_stop = threading.Event()
        self._silent = None
        self._monitor = threading.Thread(target=self._watch, args=(self._monitor_stop,),
                                         name="mlipd-rank-monitor", daemon=True)
        self._monitor.start()

    def _watch(self, stop: threading.Event) -> None:
        """Kill a rank whose heartbeat is older than ``heartbeat_s``: its sockets close,
        so the collective rank 0 may sit in fails now, not after ``timeout_s``."""
        procs, beats = list(self._procs), self._beats
        while not stop.wait(HEARTBEAT_PERIOD_S):
            now = time.monotonic()
            for r, p in enumerate(procs, start=1):
                silent = now - beats[r - 1]
                if silent > self._heartbeat_s and p.is_alive():
                    self._silent = (f"rank {r} (pid {p.pid}) sent no heartbeat for "
                                    f"{silent:.1f} s (limit {self._heartbeat_s:g} s)")
                    log.error("%s: killing it; the ranks will be restarted", self._silent)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGKILL)
                    return

    def _teardown(self) -> None:
        """Stop rank processes without talking to them (they may be inside a collective)."""
        self._monitor_stop.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=5)
        self._monitor = None
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
        if self._silent is not None:
            out.insert(0, self._silent)
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
        torch.set_num_threads(self._caller_threads)

    def __enter__(self) -> DistributedEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- engine API ---------------------------------------------------------------
    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def device(self) -> torch.device:
        """Rank 0's device (``devices`` lists every rank's)."""
        return self._config.device(0)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(str(self._config.device(r)) for r in range(
            self._world.local_size if self._world else self._ranks))

    @property
    def dtype(self) -> torch.dtype:
        return self._config.dtype

    @property
    def backend(self) -> str:
        return self._config.backend

    @property
    def world_size(self) -> int:
        return self._ranks

    @property
    def threads(self) -> int:
        """Intra-op threads of each rank."""
        return self._threads

    @property
    def last_stats(self) -> np.ndarray | None:
        """(P, 3) per rank of the last step: owned atoms, edges (r < cutoff), halo atoms."""
        return None if self._front is None else self._front.last_stats

    @property
    def rebuilds(self) -> int:
        return 0 if self._front is None else self._front.policy.rebuilds

    @property
    def limits(self) -> Limits:
        return self._limits if self._limits is not None else Limits()

    def compute(self, structures: Sequence[Structure], *, virial: bool = True) -> list[Result]:
        if not structures:
            return []
        self._ensure_ranks()
        self.calls += 1
        front = self._front
        prepared = front.prepare(structures, virial=virial)  # rank 0 alone: ranks untouched
        try:
            parts = front.execute(prepared)
        except Exception as e:  # peers may sit in a collective: any failure tears ranks down
            raise self._failure(e) from e
        return front.finish(prepared, parts)  # rank 0 alone: a bad result spares the ranks

    def _failure(self, e: Exception) -> CalculationFailed:
        """Tear the ranks down after a failed step; the error to raise."""
        self._broken = f"{type(e).__name__}: {e}"
        peers = self._peer_errors()
        self._teardown()
        detail = "; ".join(peers) if peers else self._broken
        log.error("distributed step failed (%s); ranks will be restarted", detail)
        if isinstance(e, MlipdError) and not peers:
            return CalculationFailed(str(e))
        return CalculationFailed(f"distributed step failed: {detail}")

    def _ensure_ranks(self) -> None:
        dead = [p.name for p in self._procs if not p.is_alive()]
        if self._broken is None and not dead and self._front is not None:
            return
        if self._world is not None:
            raise CalculationFailed(f"engine broken ({self._broken or dead}); launched ranks "
                                    "cannot be restarted from here")
        if dead:
            log.warning("ranks %s died%s; restarting all ranks", dead,
                        f" ({self._silent})" if self._silent else "")
        self._teardown()
        self.restarts += 1
        try:
            self._start()
        except (RuntimeError, MlipdError) as e:
            self._teardown()
            raise CalculationFailed(f"could not restart ranks: {e}") from e
