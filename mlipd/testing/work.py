"""The work each rank does in a model's forward, measured rather than derived: matrix
FLOPs (torch's ``FlopCounterMode``: every mm, bmm, addmm, einsum and convolution the
forward runs, tensor products included), the elements written by element-wise
arithmetic (activations, products, sums, normalisations: work a matrix FLOP count
misses, and all a model without linear layers does), and the rows its exchanges
actually moved (``Comm.traffic``, counted where the all_to_all happens; the atom
exchanges, ``graph.exchange``, apart from the model's own, e.g. CHGNet's bonds).

Zero redundancy means the FLOPs and elements summed over ranks equal P = 1's: any node
or edge work done on halo rows, or done twice on a cut edge, shows up as extra work.

    runs = measure_runs(CHGNetModel, [structure], [(1, torch.float64), (4, torch.float64)])
    (one,), (four,) = runs[(1, torch.float64)], runs[(4, torch.float64)]
    ratio = sum(w.flops for w in four.work) / one.work[0].flops

``factory`` must be picklable (a class or a module-level function, or a
``functools.partial`` of one): the ranks are spawned processes. Rank 0's weights are
copied to every rank, as the engine does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from mlipd.engine.results import assemble
from mlipd.model_api import LocalGraph, Model, ModelOutput
from mlipd.types import Result, Structure

# pointwise-tagged aten ops that only copy or fill: data movement, not arithmetic
_COPIES = frozenset({"clone", "copy", "copy_", "fill", "fill_", "zero_", "lift_fresh",
                     "lift_fresh_copy", "_to_copy", "alias", "detach"})
# normalisations are not tagged pointwise in aten, but are per-row arithmetic
_NORMS = frozenset({"native_layer_norm", "native_batch_norm",
                    "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                    "_fused_rms_norm", "rms_norm", "native_group_norm"})


class ElementCounter(TorchDispatchMode):
    """Counts the floating-point elements written by element-wise arithmetic (aten ops
    tagged ``pointwise``, copies excepted) and normalisations, in ``elements``."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _NORMS or (torch.Tag.pointwise in func.tags and name not in _COPIES):
            first = out[0] if isinstance(out, tuple | list) else out
            if isinstance(first, torch.Tensor) and first.is_floating_point():
                self.elements += first.numel()
        return out


@dataclass(frozen=True)
class Work:
    """One rank's forward.

    flops:          matrix FLOPs (``FlopCounterMode``)
    elements:       elements written by element-wise arithmetic and normalisations
    rows_sent, rows_received, exchanges: every exchange on the rank's communicator
    atom_rows_sent, atom_rows_received, atom_exchanges: those made by ``graph.exchange``
                    (at one rank: its calls, no rows)
    owned, edges, halo: the local graph's owned atoms, edges, halo atoms
    info:           a copy of the model's ``counters`` after the forward, where it keeps
                    such a dict (its own graph sizes, e.g. CHGNet's bonds), as information
    """

    flops: int
    elements: int
    rows_sent: int
    rows_received: int
    exchanges: int
    atom_rows_sent: int
    atom_rows_received: int
    atom_exchanges: int
    owned: int
    edges: int
    halo: int
    info: dict = dataclasses.field(default_factory=dict)


class CountingModel(torch.nn.Module):
    """``model`` whose every forward is measured into ``last`` (a ``Work``)."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model
        self.spec = model.spec
        self.last: Work | None = None

    def forward(self, graph: LocalGraph) -> ModelOutput:
        traffic = None if graph.comm is None else graph.comm.traffic
        atoms = [0, 0, 0]  # rows sent, received, exchanges of graph.exchange

        def snapshot() -> tuple[int, int, int]:
            return (0, 0, 0) if traffic is None else traffic.snapshot()

        def exchange(feats: torch.Tensor) -> torch.Tensor:
            before = snapshot()
            out = graph.exchange(feats)
            moved = [a - b for a, b in zip(snapshot(), before, strict=True)]
            if traffic is None:
                moved[2] = 1
            for k in range(3):
                atoms[k] += moved[k]
            return out

        before = snapshot()
        elements = ElementCounter()
        with FlopCounterMode(display=False) as counter, elements:
            out = self.model(dataclasses.replace(graph, exchange=exchange))
        sent, received, exchanges = (a - b for a, b in zip(snapshot(), before, strict=True))
        self.last = Work(flops=int(counter.get_total_flops()), elements=elements.elements,
                         rows_sent=sent, rows_received=received, exchanges=exchanges,
                         atom_rows_sent=atoms[0], atom_rows_received=atoms[1],
                         atom_exchanges=atoms[2], owned=graph.n_owned,
                         edges=int(graph.receivers.shape[0]), halo=graph.n_local - graph.n_owned,
                         info=dict(getattr(self.model, "counters", {})))
        return out


@dataclass(frozen=True)
class Measured:
    """One structure's step: the assembled ``result`` (energy, forces, virial when
    periodic, extras) and the ``work`` of each rank's forward."""

    result: Result
    work: list[Work]


Run = tuple[int, torch.dtype]  # (ranks, the model's dtype)


def measure_runs(factory: Callable[[], Model], structures: Sequence[Structure],
                 runs: Sequence[Run], *, method: str = "rcb",
                 timeout_s: float = 900.0) -> dict[Run, list[Measured]]:
    """For each run (P, dtype), per structure (each partitioned alone over P ranks):
    the engine's step (skin 0, on the CPU) and its measured work.

    One spawn of max(P) real gloo processes serves every run (P > 1 on a process
    subgroup of the first P ranks, P = 1 on rank 0 without a communicator), so
    importing the model's package is paid once per process, not once per P."""
    structures, runs = list(structures), list(runs)
    world = max(p for p, _ in runs)
    if world == 1:
        per_rank = [_runs_on_rank(0, 1, factory, structures, runs, method)]
    else:
        from mlipd.testing.ranks import run_on_ranks

        per_rank = run_on_ranks(_runs_on_rank, world, factory, structures, runs, method,
                                timeout_s=timeout_s)
    out: dict[Run, list[Measured]] = {}
    for j, (p, dtype) in enumerate(runs):
        measured = []
        for k, s in enumerate(structures):
            parts = [per_rank[r][j][k] for r in range(p)]
            (result,), _ = assemble([s], [x.packed for x in parts],
                                    [x.ids if p > 1 else None for x in parts],
                                    parts[0].layout, virial=True)
            measured.append(Measured(result=result, work=[x.work for x in parts]))
        out[(p, dtype)] = measured
    return out


def measure(factory: Callable[[], Model], structures: Sequence[Structure], ranks: int, *,
            method: str = "rcb", dtype: torch.dtype = torch.float64,
            timeout_s: float = 900.0) -> list[Measured]:
    """``measure_runs`` of one run."""
    return measure_runs(factory, structures, [(ranks, dtype)], method=method,
                        timeout_s=timeout_s)[(ranks, dtype)]


def measure_work(factory: Callable[[], Model], structures: Sequence[Structure], ranks: int, *,
                 method: str = "rcb", dtype: torch.dtype = torch.float64,
                 timeout_s: float = 900.0) -> list[list[Work]]:
    """Per structure, per rank: the ``Work`` of one forward (see ``measure_runs``)."""
    return [m.work for m in measure(factory, structures, ranks, method=method, dtype=dtype,
                                    timeout_s=timeout_s)]


@dataclass(frozen=True)
class _RankStep:
    work: Work
    packed: np.ndarray
    ids: np.ndarray
    layout: tuple


def _runs_on_rank(rank: int, world_size: int, factory: Callable[[], Model],
                  structures: list[Structure], runs: list[Run], method: str
                  ) -> list[list[_RankStep] | None]:
    """Per run, this rank's steps (None where the run has fewer ranks). Every rank
    takes part in every subgroup's creation and weight broadcast (collectives)."""
    import torch.distributed as dist

    from mlipd.engine.comm import Comm
    from mlipd.engine.local import for_inference
    from mlipd.engine.ranks import sync_weights

    cpu = torch.device("cpu")
    models: dict[torch.dtype, Model] = {}
    out: list[list[_RankStep] | None] = []
    for p, dtype in runs:
        group = dist.new_group(list(range(p))) if world_size > 1 and p > 1 else None
        if dtype not in models:  # one model per dtype, rank 0's weights everywhere
            models[dtype] = for_inference(factory(), cpu, dtype)
            if world_size > 1:
                sync_weights(models[dtype])
        if rank >= p:
            out.append(None)
            continue
        comm = Comm(group=group) if p > 1 else None
        out.append(_steps(models[dtype], comm, p, structures, method, dtype))
    return out


def _steps(model: Model, comm, world_size: int, structures: list[Structure], method: str,
           dtype: torch.dtype) -> list[_RankStep]:
    from mlipd.engine.partition import Geometry, partition_batch
    from mlipd.engine.step import Frame, Step

    counting = CountingModel(model)
    step = Step(counting, comm, device=torch.device("cpu"), dtype=dtype, skin=0.0)
    out = []
    for s in structures:
        owner = partition_batch([Geometry(s.positions, s.cell, s.pbc)], world_size,
                                radius=step.radius, method=method)
        step.rebuild(Frame(numbers=s.numbers, positions=s.positions, cells=s.cell[None],
                           pbc=s.pbc[None], offsets=np.array([0, s.n_atoms]), owner=owner))
        packed = step.run(torch.as_tensor(s.positions), torch.as_tensor(s.cell[None]),
                          virial=bool(s.pbc.all()))
        g = step.last_graph
        out.append(_RankStep(work=counting.last, packed=packed.numpy(),
                             ids=g.global_ids[: g.n_owned].numpy(), layout=step.layout))
    return out
