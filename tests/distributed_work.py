"""A model on P real gloo ranks: results and measured work from one start of the ranks.

Starting ranks that import a model package dominates small-system tests, so one spawn
serves several checks: each rank runs the engine's step (forward and backward) for every
variant (a model factory and a dtype) and every structure, and returns its partial
energy and virial, its owned atoms' forces, the ``Work`` of the forward
(``mlipd.testing.work``: FLOPs by FlopCounterMode, rows the exchanges moved), the rows
moved by the whole step (backward included) and the model's ``recomputed`` counter.

    runs = run_variants({"f64": (factory, torch.float64)}, structures, ranks=4)
    energy, forces, virial = assemble(runs["f64"][k], n_atoms)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mlipd.testing.work import CountingModel, Work
from mlipd.types import Structure


@dataclass(frozen=True)
class RankRun:
    """One rank's step on one structure."""

    work: Work
    energy: float
    virial: np.ndarray  # (3, 3) this rank's part
    ids: np.ndarray  # (n_owned,) global ids of the owned atoms
    forces: np.ndarray  # (n_owned, 3)
    step_traffic: tuple[int, int, int]  # rows sent, received, exchanges: forward + backward
    recomputed: int | None  # pieces the backward ran again (models that count them)
    counters: dict  # the model's ``counters`` after the forward, if it has them


def run_variants(variants: dict[str, tuple[Callable, torch.dtype]],
                 structures: Sequence[Structure], ranks: int, *, timeout_s: float = 600.0
                 ) -> dict[str, list[list[RankRun]]]:
    """{variant: per structure, per rank ``RankRun``}; each structure alone is split over
    all ranks (recursive coordinate bisection)."""
    from mlipd.testing.ranks import run_on_ranks

    per_rank = run_on_ranks(_on_rank, ranks, variants, list(structures), timeout_s=timeout_s)
    return {name: [[per_rank[r][name][k] for r in range(ranks)] for k in range(len(structures))]
            for name in variants}


def assemble(runs: list[RankRun], n_atoms: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Energy, forces (n_atoms, 3) and virial (3, 3) of a structure from its ranks' runs;
    each atom must be owned by exactly one rank."""
    forces = np.full((n_atoms, 3), np.nan)
    seen = np.zeros(n_atoms, int)
    for r in runs:
        forces[r.ids] = r.forces
        np.add.at(seen, r.ids, 1)
    assert (seen == 1).all(), "an atom owned by no rank or by several"
    return sum(r.energy for r in runs), forces, sum(r.virial for r in runs)


def _on_rank(rank: int, world_size: int, variants: dict, structures: list[Structure]) -> dict:
    from mlipd.engine.comm import Comm
    from mlipd.engine.local import for_inference
    from mlipd.engine.partition import Geometry, partition_batch
    from mlipd.engine.ranks import sync_weights
    from mlipd.engine.step import HEADER_COLUMNS, N_STATS, Frame, Step

    cpu = torch.device("cpu")
    comm = Comm()
    out = {}
    for name, (factory, dtype) in variants.items():
        model = for_inference(factory(), cpu, dtype)
        sync_weights(model)
        counting = CountingModel(model)
        step = Step(counting, comm, device=cpu, dtype=dtype, skin=0.0)
        runs = []
        for s in structures:
            owner = partition_batch([Geometry(s.positions, s.cell, s.pbc)], world_size,
                                    radius=step.radius, method="rcb")
            step.rebuild(Frame(numbers=s.numbers, positions=s.positions, cells=s.cell[None],
                               pbc=s.pbc[None], offsets=np.array([0, s.n_atoms]), owner=owner))
            before = comm.traffic.snapshot()
            packed = step.run(torch.as_tensor(s.positions), torch.as_tensor(s.cell[None]),
                              virial=bool(s.pbc.all())).numpy()
            after = comm.traffic.snapshot()
            n = step.last_graph.n_owned
            width = 3 + sum(e.width for e in step.layout)  # forces, then extras
            rows = packed[HEADER_COLUMNS + N_STATS:].reshape(n, width)
            runs.append(RankRun(
                work=counting.last, energy=float(packed[0]), virial=packed[1:10].reshape(3, 3),
                ids=step.last_graph.global_ids[:n].numpy(), forces=rows[:, :3],
                step_traffic=tuple(a - b for a, b in zip(after, before, strict=True)),
                recomputed=getattr(model, "recomputed", None),
                counters=dict(getattr(model, "counters", {}))))
        out[name] = runs
    return out


def check_work_and_results(per_rank: list[RankRun], structure: Structure, ref, flops: float,
                           exchanges: int, name: str) -> tuple[float, np.ndarray, np.ndarray]:
    """The zero-redundancy and equality checks of one structure split over ranks: forward
    FLOPs summed over ranks equal P = 1's ``flops`` (up to rows torch counts differently:
    a 1-row matmul may be no matmul), every rank made ``exchanges`` exchanges moving
    exactly the halo rows, and energy, forces and virial equal P = 1's ``ref`` to 1e-10.
    Returns the assembled (energy, forces, virial)."""
    from model_cases import rel

    work = [r.work for r in per_rank]
    assert abs(sum(w.flops for w in work) / flops - 1) <= 1e-4, name
    assert all(w.exchanges == exchanges for w in work), name
    halo = sum(w.halo for w in work)
    assert sum(w.rows_received for w in work) == sum(w.rows_sent for w in work) == (
        exchanges * halo), name
    if name == "bulk":
        assert all(w.owned > 0 for w in work)
        assert halo > 0
    energy, forces, virial = assemble(per_rank, structure.n_atoms)
    assert rel(energy, ref.energy) <= 1e-10, name
    assert rel(forces, ref.forces) <= 1e-10, name
    if ref.virial is not None:
        assert rel(virial, ref.virial) <= 1e-10, name
    return energy, forces, virial


def check_float32_run(per_rank: list[RankRun], structure: Structure, ref, name: str) -> None:
    """A float32 run split over ranks is within float32's tolerance of the float64 ``ref``."""
    from model_cases import rel

    energy, forces, _ = assemble(per_rank, structure.n_atoms)
    assert rel(energy, ref.energy) <= 1e-5, name
    assert rel(forces, ref.forces) <= 1e-4, name


def p1_reference(model_class: Callable, path: str, model, structures: Sequence[Structure]
                 ) -> tuple[str, list[Structure], list, list[int]]:
    """(path, structures, P = 1's results of ``model`` in a ``LocalEngine``, the forward
    FLOPs of ``model_class(path)`` at P = 1) for the zero-redundancy tests."""
    import functools

    from mlipd.engine.local import LocalEngine
    from mlipd.testing.work import measure_work

    engine = LocalEngine(model)
    results = [engine.compute([s])[0] for s in structures]
    flops = [w[0].flops for w in measure_work(functools.partial(model_class, path),
                                              structures, 1)]
    return path, list(structures), results, flops
