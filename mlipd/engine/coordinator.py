"""Rank 0's side of a step at any number of ranks: whether to rebuild, the partition,
the step on every rank (``RankLoop``), and the Results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlipd.engine import deadline
from mlipd.engine.budget import MemoryBudget, default_budget
from mlipd.engine.guards import CloseWatch, Limits, check_structures
from mlipd.engine.partition import Geometry, partition_batch
from mlipd.engine.rank_loop import STEP, Positions, RankLoop, StepHeader
from mlipd.engine.results import RankOutput, assemble
from mlipd.engine.step import Frame
from mlipd.engine.verlet import RebuildPolicy
from mlipd.errors import UnknownSpecies
from mlipd.model_api import ModelSpec, memory_cost
from mlipd.types import Result, Structure, species_names


def check_species(spec: ModelSpec, structures: Sequence[Structure]) -> None:
    known = spec.species
    if known is None:
        return
    for s in structures:
        unknown = s.species() - known
        if unknown:
            raise UnknownSpecies(f"model {spec.name!r} does not know {species_names(unknown)}")


@dataclass(frozen=True)
class Prepared:
    """A batch ready for the ranks (``Coordinator.prepare``)."""

    structures: tuple[Structure, ...]
    header: StepHeader
    coords: Positions
    frame: Frame | None


class Coordinator:
    """Drives ``loop`` (rank 0's) one batch at a time.

    skin:      Å, the Verlet skin of the reused lists (``RebuildPolicy``)
    partition: "rcb", "slab" or "metis" (``mlipd.engine.partition``); unused at one rank
    limits:    the geometry guards' budgets (``mlipd.engine.guards``)
    """

    def __init__(self, loop: RankLoop, *, skin: float, partition: str = "rcb",
                 imbalance_limit: float = 1.5, limits: Limits | None = None) -> None:
        self.loop = loop
        self.partition = partition
        self.limits = limits if limits is not None else Limits()
        self.policy = RebuildPolicy(skin=skin, imbalance_limit=imbalance_limit)
        self.last_stats: np.ndarray | None = None  # (P, 3): owned atoms, edges, halo atoms
        self._owned: list[np.ndarray | None] = [None]
        # the minimum-distance check of reused lists (guards.CloseWatch), from the rebuild
        self._watch = CloseWatch()
        budget = default_budget(self.limits.max_request_memory, loop.step.device,
                                world_size=self.world_size)
        self.memory = None if budget is None else MemoryBudget(
            budget=budget, cost=memory_cost(loop.step.model, loop.step.dtype),
            cutoff=loop.step.cutoff, world_size=self.world_size)

    @property
    def world_size(self) -> int:
        return self.loop.step.world_size

    def compute(self, structures: Sequence[Structure], *, virial: bool) -> list[Result]:
        prepared = self.prepare(structures, virial=virial)
        return self.finish(prepared, self.execute(prepared))

    def prepare(self, structures: Sequence[Structure], *, virial: bool) -> Prepared:
        """Rank 0 alone, no communication: the rebuild decision, and on a rebuild the
        species check, the geometry guards and the partition. Raising here (a refused
        structure, a passed deadline) leaves every rank untouched."""
        deadline.check("queued")
        rebuild = self.policy.decide(structures)
        try:
            if not rebuild:  # the guards hold on a reused list too (guards.CloseWatch)
                self._watch.check(structures)
            frame = self._frame(structures) if rebuild else None
            deadline.check("before the step")
        except BaseException:
            self.policy.invalidate()  # decide() recorded this batch as the reference
            raise
        header = StepHeader(cmd=STEP, counts=tuple(s.n_atoms for s in structures),
                            pbc=tuple(tuple(bool(x) for x in s.pbc) for s in structures),
                            virial=virial, rebuild=rebuild)
        coords = Positions(
            positions=(structures[0].positions if len(structures) == 1
                       else np.concatenate([s.positions for s in structures])),
            cells=np.stack([s.cell for s in structures]))
        return Prepared(tuple(structures), header, coords, frame)

    def execute(self, p: Prepared) -> list[RankOutput]:
        """The step on every rank (collective at P > 1); every rank's output on the host."""
        try:
            return self.loop.execute(p.header, p.coords, p.frame)
        except BaseException:
            self.policy.invalidate()  # the topology may be half built: rebuild next time
            raise

    def finish(self, p: Prepared, parts: list[RankOutput]) -> list[Result]:
        """Rank 0 alone: Results from the ranks' outputs (``CalculationFailed`` for
        non-finite output, with every rank consistent)."""
        results, stats = assemble(p.structures, parts, self._owned, self.loop.step.layout,
                                  virial=p.header.virial)
        self.last_stats = stats
        self.policy.report_load(stats[:, 1])
        deadline.check("after the step")  # every rank is done: refusing costs nothing
        return results

    def _frame(self, structures: Sequence[Structure]) -> Frame:
        """The rebuild's frame, partitioned; refuses unknown species before any rank
        starts the step."""
        step = self.loop.step
        check_species(step.model.spec, structures)
        # before any neighbour list (vesin) and before any other rank sees the batch
        self._watch = CloseWatch()  # until this rebuild's checks have passed
        self._watch = check_structures(structures, radius=step.radius, limits=self.limits,
                                       world_size=self.world_size, skin=step.skin,
                                       memory=self.memory)
        n = sum(s.n_atoms for s in structures)
        if self.world_size == 1:
            owner = np.zeros(n, dtype=np.int64)
            self._owned = [None]
        else:
            owner = partition_batch([Geometry(s.positions, s.cell, s.pbc) for s in structures],
                                    self.world_size, radius=step.radius, method=self.partition)
            self._owned = [np.flatnonzero(owner == q) for q in range(self.world_size)]
        return Frame(numbers=np.concatenate([s.numbers for s in structures]),
                     positions=np.concatenate([s.positions for s in structures]),
                     cells=np.stack([s.cell for s in structures]),
                     pbc=np.stack([s.pbc for s in structures]),
                     offsets=np.concatenate([[0], np.cumsum([s.n_atoms for s in structures])]
                                            ).astype(np.int64),
                     owner=owner)

    def stop(self) -> None:
        self.loop.stop()
