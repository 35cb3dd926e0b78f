"""The work each rank does in a model's forward, measured rather than derived: matrix
FLOPs (torch's ``FlopCounterMode``: every mm, bmm, addmm, einsum and convolution the
forward runs, tensor products included) and the rows its exchanges actually moved
(``Comm.traffic``, counted where the all_to_all happens).

Zero redundancy means the FLOPs summed over ranks equal P = 1's: any node or edge work
done on halo rows, or done twice on a cut edge, shows up as extra FLOPs.

    per_structure = measure_work(CHGNetModel, [structure], ranks=4)
    total = sum(w.flops for w in per_structure[0])

``factory`` must be picklable (a class or a module-level function, or a
``functools.partial`` of one): the ranks are spawned processes. Rank 0's weights are
copied to every rank, as the engine does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from mlipd.model_api import LocalGraph, Model, ModelOutput
from mlipd.types import Structure


@dataclass(frozen=True)
class Work:
    """One rank's forward: matrix FLOPs; rows its exchanges sent and received, and how
    many exchanges (forward only); owned atoms, edges, halo atoms."""

    flops: int
    rows_sent: int
    rows_received: int
    exchanges: int
    owned: int
    edges: int
    halo: int


class CountingModel(torch.nn.Module):
    """``model`` whose every forward is measured into ``last`` (a ``Work``)."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model
        self.spec = model.spec
        self.last: Work | None = None

    def forward(self, graph: LocalGraph) -> ModelOutput:
        traffic = None if graph.comm is None else graph.comm.traffic
        before = (0, 0, 0) if traffic is None else traffic.snapshot()
        with FlopCounterMode(display=False) as counter:
            out = self.model(graph)
        after = (0, 0, 0) if traffic is None else traffic.snapshot()
        sent, received, exchanges = (a - b for a, b in zip(after, before, strict=True))
        self.last = Work(flops=int(counter.get_total_flops()), rows_sent=sent,
                         rows_received=received, exchanges=exchanges, owned=graph.n_owned,
                         edges=int(graph.receivers.shape[0]), halo=graph.n_local - graph.n_owned)
        return out


def measure_work(factory: Callable[[], Model], structures: Sequence[Structure], ranks: int, *,
                 method: str = "rcb", dtype: torch.dtype = torch.float64,
                 timeout_s: float = 600.0) -> list[list[Work]]:
    """Per structure (each partitioned alone over ``ranks`` ranks), per rank: the
    ``Work`` of one forward (the engine's step, skin 0, on the CPU)."""
    if ranks == 1:
        return [[w] for w in _work_on_rank(0, 1, factory, list(structures), method, dtype)]
    from mlipd.testing.ranks import run_on_ranks

    per_rank = run_on_ranks(_work_on_rank, ranks, factory, list(structures), method, dtype,
                            timeout_s=timeout_s)
    return [[per_rank[r][k] for r in range(ranks)] for k in range(len(structures))]


def _work_on_rank(rank: int, world_size: int, factory: Callable[[], Model],
                  structures: list[Structure], method: str, dtype: torch.dtype) -> list[Work]:
    from mlipd.engine.comm import Comm
    from mlipd.engine.local import for_inference
    from mlipd.engine.partition import Geometry, partition_batch
    from mlipd.engine.ranks import sync_weights
    from mlipd.engine.step import Frame, Step

    cpu = torch.device("cpu")
    comm = Comm() if world_size > 1 else None
    model = for_inference(factory(), cpu, dtype)
    if comm is not None:
        sync_weights(model)
    counting = CountingModel(model)
    step = Step(counting, comm, device=cpu, dtype=dtype, skin=0.0)
    out = []
    for s in structures:
        owner = partition_batch([Geometry(s.positions, s.cell, s.pbc)], world_size,
                                radius=step.radius, method=method)
        step.rebuild(Frame(numbers=s.numbers, positions=s.positions, cells=s.cell[None],
                           pbc=s.pbc[None], offsets=np.array([0, s.n_atoms]), owner=owner))
        step.run(torch.as_tensor(s.positions), torch.as_tensor(s.cell[None]), virial=False)
        out.append(counting.last)
    return out
