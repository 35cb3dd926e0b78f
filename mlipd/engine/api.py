"""The engine interface every front end uses, and the one way to get an engine.

``make_engine`` returns a ``SingleRankEngine`` (one rank, no process group), a
``DistributedEngine`` (several ranks, spawned or launched by torchrun/srun) or a
``WholeEngine`` (a whole-structure model such as an ASE calculator); all satisfy
``Engine``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from mlipd.engine.guards import Limits
from mlipd.errors import SetupError
from mlipd.model_api import ModelSpec, is_whole_structure
from mlipd.types import Result, Structure

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_DTYPE = "float32"  # model features; geometry and sums are float64 whatever this is


@runtime_checkable
class Engine(Protocol):
    """One step of physics for a batch of structures.

    spec:       the model's ModelSpec (never None, also after ``close``)
    device:     where rank 0 computes
    devices:    every local rank's device, rank order
    dtype:      the model's floating dtype
    world_size: ranks the structures are partitioned across
    backend:    the process group's backend (nccl, gloo), None without one
    threads:    intra-op threads of each rank
    limits:     the geometry guards' budgets (``mlipd.engine.guards.Limits``)
    restarts:   times the ranks were torn down and started again
    compiled:   the step runs as one compiled function (``mlipd.engine.compiled``; False
                too once it gave up on the model)
    calls:      engine calls so far (batching counters)
    """

    calls: int

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def world_size(self) -> int: ...

    @property
    def devices(self) -> tuple[str, ...]: ...

    @property
    def backend(self) -> str | None: ...

    @property
    def threads(self) -> int: ...

    @property
    def limits(self) -> Limits: ...

    @property
    def restarts(self) -> int: ...

    @property
    def compiled(self) -> bool: ...

    def compute(self, structures: Sequence[Structure], *,
                virial: bool = True) -> list[Result]:
        """Energy (eV), forces (N, 3) eV/Å, virial (3, 3) eV (fully periodic cells, when
        asked) per structure; raises ``MlipdError`` subclasses."""
        ...

    def close(self) -> None: ...


class OneProcess:
    """The ``Engine`` properties of an engine that runs in the caller's process alone
    (one device ``self.device``, no process group, never restarted)."""

    @property
    def devices(self) -> tuple[str, ...]:
        return (str(self.device),)

    @property
    def backend(self) -> str | None:
        return None

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    @property
    def restarts(self) -> int:
        return 0

    @property
    def compiled(self) -> bool:
        return False


def make_engine(model: str, *, device: str = "auto", dtype: str | None = None,
                ranks: int = 1, devices: Sequence[str] | None = None,
                backend: str = "auto", world=None, skin: float | None = None,
                timeout_s: float = 120.0, threads: int | None = None, limits=None,
                rank_heartbeat_s: float | None = None, cuda_graphs: str = "auto",
                compile: str = "0") -> Engine:
    """Load ``model`` (``name`` or ``name:arg``) and return an engine on ``ranks`` ranks.

    device:  auto (CUDA when available), cpu, cuda or cuda:N; devices: an explicit list
             (rank r on the r-th); backend: auto, nccl or gloo (``mlipd.engine.devices``)
    dtype:   float32 (default) or float64, the model's features
    world:   a ``mlipd.engine.ranks.World`` when torchrun or srun started this process
             as rank 0 of a job (``ranks`` is then the job's size)
    threads: intra-op threads of each rank (``mlipd.engine.threads``); at one rank it is
             set for this process when given (else torch's default stays); at several,
             default: the host's cores divided among its ranks
    limits:  the geometry guards' budgets (``mlipd.engine.guards.Limits``)
    rank_heartbeat_s: restart the ranks when one is silent this long (several ranks)
    cuda_graphs: auto, 0 or 1: replay the warm one-rank step as a captured CUDA graph
             (``mlipd.engine.cuda_graphs``)
    compile: 0 or 1: run the one-rank step's model, forces and virial as one
             ``torch.compile``d function (``mlipd.engine.compiled``); one rank and
             mlipd's own adapters only
    """
    from mlipd.engine.compiled import check_mode as check_compile
    from mlipd.engine.devices import node_devices, resolve_device
    from mlipd.engine.single_rank import DEFAULT_SKIN
    from mlipd.engine.threads import threads_per_rank

    dtype = dtype or DEFAULT_DTYPE
    if dtype not in DTYPES:
        raise SetupError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if ranks < 1:
        raise SetupError(f"--ranks must be >= 1, got {ranks}")
    if threads is not None:
        threads_per_rank(threads, 1)  # checked before anything loads
    if check_compile(compile) and (ranks > 1 or (world is not None and world.size > 1)):
        raise SetupError("--compile 1 needs one rank: a compiled step cannot hold the "
                         "ranks' exchanges")
    skin = DEFAULT_SKIN if skin is None else skin
    local_devices = node_devices(device, devices)  # every name checked, one-line errors
    if world is not None and world.size > 1:
        from mlipd.engine.distributed import DistributedEngine

        return DistributedEngine(model, device=device, devices=devices, backend=backend,
                                 dtype=DTYPES[dtype], skin=skin, timeout_s=timeout_s,
                                 threads_per_rank=threads, world=world, limits=limits,
                                 heartbeat_s=rank_heartbeat_s)
    if ranks == 1:
        from mlipd.engine.single_rank import SingleRankEngine
        from mlipd.models.registry import load_model

        if threads is not None:
            torch.set_num_threads(threads)
        loaded = load_model(model)
        if is_whole_structure(loaded):
            from mlipd.engine.whole import WholeEngine

            if check_compile(compile):
                raise SetupError(f"--compile 1: {model!r} is a whole-structure model (it "
                                 "computes its own forces), there is no step to compile")

            return WholeEngine(loaded, device=device, dtype=DTYPES[dtype], limits=limits)
        return SingleRankEngine(loaded, device=resolve_device(local_devices[0]),
                                dtype=DTYPES[dtype], skin=skin, limits=limits,
                                cuda_graphs=cuda_graphs, compile=compile)
    if _whole_structure(model):
        raise SetupError(
            f"{model!r} is a single-device (whole-structure) model and cannot run on "
            f"{ranks} ranks: distributing it needs an mlipd adapter (see docs/models.md)")
    from mlipd.engine.distributed import DistributedEngine

    return DistributedEngine(model, device=device, devices=devices, backend=backend,
                             dtype=DTYPES[dtype], ranks=ranks, skin=skin, timeout_s=timeout_s,
                             threads_per_rank=threads, limits=limits,
                             heartbeat_s=rank_heartbeat_s)


def describe(engine: Engine) -> str:
    """One line for the start-up log: model, cutoff, device(s), dtype, ranks, threads
    and memory (this process's resident set; free memory on rank 0's device)."""
    from mlipd.memory import available_bytes, resident_bytes

    spec = engine.spec
    ranks = engine.world_size
    devices = sorted(set(engine.devices))
    backend = engine.backend
    threads = engine.threads
    layers = f"{spec.n_layers} layer{'s' if spec.n_layers > 1 else ''}"
    parts = [f"model {spec.name} (cutoff {spec.cutoff:g} Å, {layers})",
             f"device {', '.join(devices)}",
             f"dtype {str(engine.dtype).removeprefix('torch.')}",
             f"{ranks} rank{'s' if ranks > 1 else ''}" + (f" over {backend}" if backend else ""),
             f"{threads} thread{'s' if threads > 1 else ''}" + (" per rank" if ranks > 1 else "")]
    if engine.compiled:
        parts.append("compiled step (torch.compile at the first call)")
    memory = [f"{resident_bytes() / 2**20:.0f} MiB resident"]
    if engine.device.type == "cuda":
        memory.append(f"{torch.cuda.memory_allocated(engine.device) / 2**20:.0f} MiB "
                      f"allocated on {engine.device}")
    free = available_bytes(engine.device)
    if free is not None:
        memory.append(f"{free / 2**30:.1f} GiB free on {engine.device}")
    return ", ".join(parts) + "; memory: " + ", ".join(memory)


def _whole_structure(model: str) -> bool:
    """Whether the model behind ``model`` declares itself whole-structure (its adapter
    module is imported, not the model's own package beyond it)."""
    from mlipd.errors import ModelUnavailable
    from mlipd.models.registry import model_factory

    try:
        return is_whole_structure(model_factory(model))
    except ModelUnavailable:
        return False  # the distributed engine reports the missing package
