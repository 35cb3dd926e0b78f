"""The multi-rank engine. The caller's process is rank 0.

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
``timeout_s``.

Spawned ranks are processes of their own program (``mlipd.engine.rank_main``), not
``multiprocessing`` children, so a script without ``if __name__ == "__main__":``
works. While ranks start, rank 0 waits for each to announce itself in the store,
watching their handles, and only then joins the group (with a short connection
bound), so a rank that dies at start-up is an error at once, not after
``timeout_s``. A monitor thread on rank 0 watches them through their process handles
(``mlipd.engine.rank_procs``) every ``WATCH_PERIOD_S``: a rank that exited (any code,
any signal) is logged at once and the other ranks are killed, so a collective rank 0
may sit in fails now; a rank whose heartbeat (written from a thread of its own into
shared memory) is older than ``heartbeat_s`` (stopped, swapped out, hung with the GIL
held) is killed, with the same effect. The next request finds the ranks gone and
starts new ones. Under torchrun or srun (``world=``) ranks cannot be respawned:
the engine stays broken and every request fails, so the caller should exit and
let the launcher restart the job.
"""

from __future__ import annotations

import datetime
import logging
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
from mlipd.engine.rank_procs import RankProcesses, describe_exit
from mlipd.engine.ranks import (
    JOINED_KEY,
    World,
    config_for,
    init_process_group,
    load_local_model,
    sync_weights,
)
from mlipd.engine.step import Step
from mlipd.engine.threads import threads_per_rank as resolve_threads
from mlipd.errors import CalculationFailed, MlipdError, SetupError
from mlipd.model_api import ModelSpec
from mlipd.types import Result, Structure

log = logging.getLogger(__name__)

WATCH_PERIOD_S = 0.25  # how often rank 0 looks at its ranks' handles and heartbeats
JOIN_POLL_S = 0.02  # how often rank 0 looks for starting ranks (and their handles)
# the group's connection, once every rank is about to join (healthy: ~30 ms). gloo tries
# it 5 times: a rank killed in the first milliseconds of its join costs rank 0 5 x this
# (measured: 5.0 s at 1 s, 25 s at 5 s), a wait every request behind it shares
CONNECT_TIMEOUT_S = 1.0
CONNECT_ATTEMPTS = 2  # a connection that timed out with every rank alive: start them again
DEFAULT_HEARTBEAT_S = 10.0  # silence after which rank 0 kills and replaces a rank


def check_factory(model: str | Callable) -> None:
    """A factory defined in the script that runs (``__main__``) cannot be imported by
    the rank processes, which never run that script: refuse it now, in one line."""
    func = getattr(model, "func", model)  # functools.partial
    if callable(model) and getattr(func, "__module__", None) == "__main__":
        name = getattr(func, "__qualname__", repr(func))
        raise SetupError(f"the model factory {name} is defined in the script being run "
                         "(__main__), which rank processes do not import: define it in a "
                         "module of its own, or give a model name")


class SlowConnection(RuntimeError):
    """The group's connection timed out while every rank process was alive."""


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
                raise SetupError("only rank 0 of a launched job drives the engine")
            ranks = world.size
        if ranks < 1:
            raise SetupError(f"ranks must be >= 1, got {ranks}")
        if ranks > 1 and world is None:
            check_factory(model)
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
        self._lost: str | None = None  # what the monitor saw: a rank dead or silent
        self._monitor_stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self.restarts = 0  # times the ranks were torn down and spawned again
        # every rank of this host, rank 0 (this process) too, takes its share of the cores
        self._threads = resolve_threads(threads_per_rank, local)
        self._caller_threads = torch.get_num_threads()
        torch.set_num_threads(self._threads)
        self._procs: RankProcesses | None = None
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
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            # rank 0 hosts the store on a port of the kernel's choice, then tells the ranks
            store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=self._timeout_s))
            self._procs = RankProcesses(world_size=self._ranks, backend=self._config.backend,
                                        host="127.0.0.1", port=store.port,
                                        timeout_s=self._timeout_s, threads=self._threads)
            try:
                self._join_watching(store)
                break
            except SlowConnection as e:
                if attempt == CONNECT_ATTEMPTS:
                    raise
                log.warning("%s; starting the ranks again", e)
                self._procs.stop()
                self._procs = None
        self._start_monitor()

    def _join_watching(self, store: dist.Store) -> None:
        """Rank 0's side of the rendezvous. First wait, watching the ranks' handles,
        until every rank is about to join (``JOINED_KEY``; importing torch takes
        seconds): a rank that exits meanwhile is an error now, not after ``timeout_s``.
        Then join with a short connection bound, as a rank may still die in the few
        milliseconds between its key and its connection."""
        keys = [f"{JOINED_KEY}{r}" for r in range(1, self._ranks)]
        end = time.monotonic() + self._timeout_s
        while not store.check(keys):
            lost = self._procs.lost()
            if lost is not None:
                errors = self._procs.errors()
                raise RuntimeError(f"{lost} while the ranks were starting"
                                   + (f": {'; '.join(errors)}" if errors else ""))
            if time.monotonic() > end:
                raise RuntimeError(f"the ranks did not start within {self._timeout_s:g} s")
            time.sleep(JOIN_POLL_S)
        bound = min(CONNECT_TIMEOUT_S, self._timeout_s)
        try:
            init_process_group(backend=self._config.backend, rank=0, world_size=self._ranks,
                               timeout_s=self._timeout_s, store=store, connect_timeout_s=bound)
        except RuntimeError as e:
            lost = self._procs.lost()
            if lost is not None:
                raise RuntimeError(f"{lost} while the ranks connected ({e})") from e
            # every rank alive: slow (a loaded machine), not dead
            raise SlowConnection(f"the ranks did not connect within {bound:g} s, all alive "
                                 f"({e})") from e

    def _start_monitor(self) -> None:
        self._monitor_stop = threading.Event()
        self._lost = None
        self._monitor = threading.Thread(target=self._watch,
                                         args=(self._monitor_stop, self._procs),
                                         name="mlipd-rank-monitor", daemon=True)
        self._monitor.start()

    def _watch(self, stop: threading.Event, procs: RankProcesses) -> None:
        """Notice a rank that exited or fell silent, and kill the others (or the silent
        one): their sockets close, so a collective rank 0 may sit in fails now."""
        while not stop.wait(WATCH_PERIOD_S):
            lost = procs.lost()
            if lost is not None:
                self._lost = lost
                log.error("%s; the ranks will be restarted", lost)
                procs.kill()
                return
            silent = procs.silent(self._heartbeat_s)
            if silent is not None:
                r, age = silent
                self._lost = (f"rank {r} (pid {procs.pid(r)}) sent no heartbeat for "
                              f"{age:.1f} s (limit {self._heartbeat_s:g} s)")
                log.error("%s: killing it; the ranks will be restarted", self._lost)
                procs.kill(r)
                return

    def _stop_monitor(self) -> None:
        self._monitor_stop.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=5)
        self._monitor = None

    def _teardown(self) -> None:
        """Stop rank processes without talking to them (they may be inside a collective)."""
        self._stop_monitor()
        if self._procs is not None:
            self._procs.stop()
            self._procs = None
        if dist.is_initialized():
            dist.destroy_process_group()
        self._front = None

    def _peer_errors(self) -> list[str]:
        """What failed ranks reported, and which ranks died without a word."""
        procs = self._procs
        if procs is None:
            return [self._lost] if self._lost else []
        out = procs.errors()
        if not out:  # a failing rank writes its line just before it exits
            procs.wait(0.5)
            out = procs.errors()
        reported = {m.split(":", 1)[0] for m in out}
        if self._lost is not None and self._lost.split(" (", 1)[0] not in reported:
            out.insert(0, self._lost)
        reported |= {m.split(" (", 1)[0] for m in out}
        for r, code in procs.exited():
            if code != 1 and f"rank {r}" not in reported:
                out.append(f"rank {r} (pid {procs.pid(r)}) {describe_exit(code)}")
        return out

    def close(self) -> None:
        """Stop the ranks (politely if they are healthy)."""
        self._stop_monitor()  # ranks leaving on a stop command are not lost
        if self._front is not None and self._broken is None:
            try:
                self._front.stop()
            except RuntimeError as e:
                log.warning("ranks did not take the stop command: %s", e)
            if self._procs is not None:
                self._procs.wait(10.0)
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
    def compiled(self) -> bool:
        """Never: a compiled step cannot hold the ranks' exchanges."""
        return False

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

    @property
    def memory_budget(self) -> float | None:
        """Bytes one engine call may take per device (``mlipd.engine.budget``); None:
        no budget (or no ranks running)."""
        memory = self._front.memory if self._front is not None else None
        return None if memory is None else float(memory.budget)

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
        lost = self._procs.lost() if self._procs is not None else None
        if self._broken is None and lost is None and self._front is not None:
            return
        if self._world is not None:
            raise CalculationFailed(f"engine broken ({self._broken or lost}); launched ranks "
                                    "cannot be restarted from here")
        if lost is not None and self._broken is None:
            log.warning("%s; restarting all ranks", self._lost or lost)
        self._teardown()
        self.restarts += 1
        try:
            self._start()
        except (RuntimeError, MlipdError) as e:
            self._teardown()
            log.error("could not restart the ranks (%s); trying again at the next request", e)
            raise CalculationFailed(f"could not restart ranks: {e}") from e
