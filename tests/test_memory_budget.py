"""Issue 22, items 1 and 3 below the server: the per-request memory estimate (bounds and
exact counts against vesin, refusal before allocation) and the minimum-distance check on
reused neighbour lists."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule
from vesin import NeighborList

from mlipd.engine.budget import MemoryBudget, exact_counts, neighbour_bound, upper_bound
from mlipd.engine.guards import Limits, _reduced, check_structures
from mlipd.engine.single_rank import SingleRankEngine
from mlipd.errors import TooLarge, ValidationError
from mlipd.model_api import MemoryCost, memory_cost
from mlipd.models.registry import load_model
from mlipd.types import Structure

CHGNET_LIKE = MemoryCost(per_atom=20_000, per_edge=17_000, per_angle=12_000, angle_cutoff=3.0)


def dense_si(n: int = 3, spacing: float = 0.6) -> Structure:
    """The issue's row 1: n^3 Si atoms ``spacing`` apart in a periodic cell n x spacing wide
    (27 atoms 0.6 Å apart in a 1.8 Å cell: a ~1 KB request)."""
    g = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return Structure(numbers=np.full(n**3, 14), positions=g * spacing,
                     cell=np.eye(3) * n * spacing, pbc=np.ones(3, bool))


def _cases() -> dict[str, Structure]:
    rng = np.random.default_rng(0)
    si = bulk("Si", "diamond", a=5.43, cubic=True).repeat(3)
    si.rattle(0.1, seed=1)
    slab = fcc111("Cu", size=(3, 3, 3), vacuum=6.0)
    slab.pbc = (True, True, False)
    tri = bulk("Cu", "fcc", a=3.6)  # 1 atom, a small skewed cell: many images
    water = molecule("H2O")
    cluster = Structure(numbers=np.full(60, 6), positions=rng.uniform(0, 6, (60, 3)),
                        cell=np.zeros((3, 3)), pbc=np.zeros(3, bool))
    return {"si": Structure.from_atoms(si), "slab": Structure.from_atoms(slab),
            "small cell": Structure.from_atoms(tri), "water": Structure.from_atoms(water),
            "open cluster": cluster, "dense si": dense_si()}


@pytest.mark.parametrize("name", list(_cases()))
@pytest.mark.parametrize("radius", [3.0, 6.5])
def test_neighbour_bound_holds_atom_by_atom(name, radius):
    s = _cases()[name]
    u, h, _ = _reduced(s.positions, s.cell, np.asarray(s.pbc))
    bound = neighbour_bound(u, h, np.asarray(s.pbc), radius=radius)
    i, _j = NeighborList(cutoff=radius, full_list=True).compute(
        s.positions, s.cell, [bool(p) for p in s.pbc], quantities="ij")
    exact = np.bincount(i.astype(np.int64), minlength=s.n_atoms)
    assert (bound >= exact).all()
    c = exact_counts(s, cutoff=radius, radius=radius, cost=CHGNET_LIKE)
    ub = upper_bound(s, u, h, cutoff=radius, radius=radius, cost=CHGNET_LIKE)
    assert ub.edges >= c.edges == exact.sum()
    assert ub.angles >= c.angles


def test_dense_structure_is_refused_before_anything_is_allocated():
    s = dense_si()
    budget = MemoryBudget(budget=4 * 2**30, cost=CHGNET_LIKE, cutoff=6.0)
    t0 = time.process_time()
    with pytest.raises(TooLarge) as info:
        check_structures([s], radius=6.5, limits=Limits(), skin=0.5, memory=budget)
    # the estimate (exact counts: ~1.1e5 edges, ~6.5 million angles: > 70 GiB) and the
    # budget are in the message; refused in a fraction of a second of CPU
    text = str(info.value)
    assert "GiB" in text
    assert "budget 4 GiB" in text
    assert "--max-request-memory" in text
    assert re.search(r"1\.12e\+05 edges and 6\.\d+e\+06 angles", text), text
    assert time.process_time() - t0 < 5.0  # generous: the count takes ~0.1 s
    ok = Structure.from_atoms(bulk("Si", "diamond", a=5.43, cubic=True).repeat(2))
    check_structures([ok], radius=6.5, limits=Limits(), skin=0.5, memory=budget)


def test_the_bound_alone_admits_small_requests_and_the_exact_count_decides_near_the_budget():
    s = Structure.from_atoms(bulk("Si", "diamond", a=5.43, cubic=True).repeat(4))
    u, h, _ = _reduced(s.positions, s.cell, np.asarray(s.pbc))
    ub = upper_bound(s, u, h, cutoff=6.0, radius=6.5, cost=CHGNET_LIKE)
    ex = exact_counts(s, cutoff=6.0, radius=6.5, cost=CHGNET_LIKE)
    between = 0.5 * (ub.bytes(CHGNET_LIKE) + ex.bytes(CHGNET_LIKE))
    # over the bound but above the exact estimate: admitted after the exact count
    MemoryBudget(budget=between, cost=CHGNET_LIKE, cutoff=6.0).check(
        [s], u_h=[(u, h)], skin=0.5)
    with pytest.raises(TooLarge):
        MemoryBudget(budget=0.9 * ex.bytes(CHGNET_LIKE), cost=CHGNET_LIKE, cutoff=6.0).check(
            [s], u_h=[(u, h)], skin=0.5)


def test_an_adapter_declares_its_memory_or_gets_the_default():
    import torch

    from mlipd.model_api import DEFAULT_MEMORY_COST

    lj = load_model("lj")
    assert memory_cost(lj, torch.float64).per_edge == 512  # declared
    assert memory_cost(lj, torch.float32).per_edge == 256

    class Plugin(torch.nn.Module):  # declares nothing
        pass

    assert memory_cost(Plugin(), torch.float64) == DEFAULT_MEMORY_COST


# ---------------------------------------------------------------- reused lists (item 3)


def _pair_structure(d: float) -> Structure:
    """Si diamond (8 atoms) with atom 1 moved to ``d`` Å from atom 0 along x."""
    at = bulk("Si", "diamond", a=5.43, cubic=True)
    pos = at.positions.copy()
    pos[1] = pos[0] + [d, 0, 0]
    return Structure(numbers=at.numbers, positions=pos, cell=np.array(at.cell),
                     pbc=np.ones(3, bool))


def test_a_pair_pushed_together_within_the_skin_is_refused_on_a_reused_list():
    # the row 4: a reference 0.45 Å apart, then 0.0002 Å apart with each atom
    # moved less than skin / 2, so the neighbour list is reused (answered ok with
    # E = 5.8e47 eV before)
    engine = SingleRankEngine(load_model("lj"), skin=0.5)
    (first,) = engine.compute([_pair_structure(0.45)])
    close = _pair_structure(0.45)
    close.positions[0, 0] += 0.2249
    close.positions[1, 0] -= 0.2249
    assert engine.rebuilds == 1
    with pytest.raises(ValidationError, match=r"atoms 0 and 1 are 0.0002 Å apart"):
        engine.compute([close])
    (again,) = engine.compute([_pair_structure(0.45)])  # and the engine goes on
    assert again.energy == first.energy


def test_a_small_cell_is_checked_in_full_at_every_reused_step():
    # face height 1 Å < 2 (0.1 + skin): the watch cannot rely on the wrapped image
    cell = np.eye(3) * 1.0
    s = Structure(numbers=np.full(2, 6), positions=np.array([[0, 0, 0], [0.5, 0, 0.0]]),
                  cell=cell, pbc=np.ones(3, bool))
    watch = check_structures([s], radius=2.5, limits=Limits(max_pairs=1e9), skin=0.5)
    assert watch.watched[0].i is None
    moved = Structure(numbers=s.numbers, positions=np.array([[0.2, 0, 0], [0.25, 0, 0.0]]),
                      cell=cell, pbc=s.pbc)
    with pytest.raises(ValidationError, match=r"0\.05 Å apart"):
        watch.check([moved])
    watch.check([s])


def test_nothing_is_watched_in_sane_matter():
    water = molecule("H2O")
    water.center(vacuum=4.0)
    water.pbc = True
    si = bulk("Si", "diamond", a=5.43, cubic=True).repeat(3)
    watch = check_structures([Structure.from_atoms(si), Structure.from_atoms(water)],
                             radius=6.5, limits=Limits(), skin=0.5)
    assert watch.watched == {}  # O-H 0.96 Å > 0.1 + 0.5 Å: no pair to follow


# ---------------------------------------------------------------- the queue in bytes (item 2)


def test_the_scheduler_bounds_its_queue_in_bytes_and_releases_them():
    from mlipd.errors import Busy
    from mlipd.server.scheduler import Scheduler, Ticket

    s = _pair_structure(1.0)
    sched = Scheduler(max_bytes=100)

    def ticket(source, nbytes, token=None):
        return Ticket(source=source, structures=(s,), arrived=0.0, nbytes=nbytes, token=token)

    sched.submit(ticket("a", 500, token="big"))  # alone: always taken (the frame limit bounds it)
    with pytest.raises(Busy, match="--max-queue-bytes"):
        sched.submit(ticket("b", 1))
    assert sched.remove("big").nbytes == 500  # cancelled: its bytes are free at once
    assert sched.pending_bytes == 0
    sched.submit(ticket("a", 60))
    sched.submit(ticket("b", 40))
    with pytest.raises(Busy):
        sched.submit(ticket("c", 1))
    assert len(sched.take(0.0, force=True)) == 2
    assert sched.pending_bytes == 0
    assert sched.remove("nothing") is None


def test_a_model_that_recomputes_when_short_is_held_to_its_recomputed_figure():
    s = Structure.from_atoms(bulk("Si", "diamond", a=5.43, cubic=True).repeat(3))
    u, h, _ = _reduced(s.positions, s.cell, np.asarray(s.pbc))
    stored = MemoryCost(per_atom=20_000, per_edge=17_000)
    cheap = MemoryCost(per_atom=5_000, per_edge=4_000)
    need = exact_counts(s, cutoff=6.0, radius=6.5, cost=stored)
    budget = 0.5 * need.bytes(stored)  # stored over it, recomputed under it
    with pytest.raises(TooLarge):
        MemoryBudget(budget=budget, cost=stored, cutoff=6.0).check([s], u_h=[(u, h)], skin=0.5)
    auto = MemoryCost(per_atom=20_000, per_edge=17_000, recomputed=cheap)
    got = MemoryBudget(budget=budget, cost=auto, cutoff=6.0).check([s], u_h=[(u, h)], skin=0.5)
    assert got == pytest.approx(need.bytes(cheap))
