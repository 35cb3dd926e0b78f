"""SingleRankEngine's reused (Verlet-skin) neighbour list equals a fresh list at every call."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from ase.build import bulk

from mlipd.engine.single_rank import SingleRankEngine
from mlipd.errors import UnknownSpecies
from mlipd.models.lj import LennardJones
from mlipd.models.reference import ReferenceMP
from mlipd.testing import tolerances as tol
from mlipd.types import Structure

pytestmark = pytest.mark.timeout(120)


def trajectory(steps: int, *, step_ang: float, seed: int = 0):
    """Argon fcc with a random walk of every atom: pairs cross the cutoff on the way."""
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(2)
    atoms.rattle(0.1, seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        atoms.positions += rng.normal(0, step_ang, atoms.positions.shape)
        out.append(Structure.from_atoms(atoms))
    return out


def assert_same(a, b, s: Structure, make=lambda: LennardJones(cutoff=5.0)):
    """Two float64 computations of ``make()``'s model at ``s``: another list, another
    order, image shifts maybe multiplied in a batched product (``tol.measured_float64``,
    the stiffness measured with an engine of its own: the counters stay the tests')."""
    assert a.virial is not None
    assert b.virial is not None
    tol.assert_within(a, b, s, tol.measured_float64(tol.float64_engine(make), s, b), "same")


@pytest.mark.parametrize("make", [lambda: LennardJones(cutoff=5.0),
                                  lambda: ReferenceMP("cutoff=4.5,layers=2,features=8")])
def test_reuse_equals_fresh_list(make):
    reused = SingleRankEngine(make(), skin=0.6)
    fresh = SingleRankEngine(make(), skin=0.0)
    traj = trajectory(12, step_ang=0.04)
    for s in traj:
        (a,), (b,) = reused.compute([s]), fresh.compute([s])
        assert_same(a, b, s, make)
    assert fresh.rebuilds == len(traj)  # skin 0: a new list at every call
    assert 2 <= reused.rebuilds < len(traj) // 2  # reused most steps, rebuilt past skin / 2


def test_pairs_crossing_the_cutoff_are_counted_exactly():
    """Two atoms walked through r = cutoff without a rebuild: the energy follows."""
    cutoff = 4.0
    engine = SingleRankEngine(LennardJones(cutoff=cutoff), skin=1.0)
    fresh = SingleRankEngine(LennardJones(cutoff=cutoff), skin=0.0)
    for r in (4.2, 4.05, 3.99, 3.8, 3.99, 4.1):  # moves < skin / 2 from the first build
        s = Structure(numbers=[18, 18], positions=[[0, 0, 0], [r, 0, 0]],
                      cell=np.zeros((3, 3)), pbc=False)
        (a,), (b,) = engine.compute([s]), fresh.compute([s])
        # one pair: the same terms from a reused list (``tol.float64``)
        tol.assert_within(a, b, s, tol.float64(b, s, cutoff), f"r = {r}")
        assert (a.energy == 0.0) == (r >= cutoff)
    assert engine.rebuilds == 1


def test_rebuild_on_cell_species_or_batch_change():
    engine = SingleRankEngine(LennardJones(cutoff=5.0), skin=0.5)
    s = trajectory(1, step_ang=0.0)[0]
    engine.compute([s])
    engine.compute([s])
    assert engine.rebuilds == 1
    strained = Structure(numbers=s.numbers, positions=s.positions, cell=s.cell * 1.001,
                         pbc=s.pbc)
    (got,) = engine.compute([strained])
    (want,) = SingleRankEngine(LennardJones(cutoff=5.0), skin=0.0).compute([strained])
    assert_same(got, want, strained)
    assert engine.rebuilds == 2
    engine.compute([s, strained])
    assert engine.rebuilds == 3
    other = Structure(numbers=np.full(s.n_atoms, 36), positions=s.positions, cell=s.cell,
                      pbc=s.pbc)
    engine.compute([other])
    assert engine.rebuilds == 4


def test_species_error_is_not_cached():
    """A rejected batch leaves no reusable list behind: the same batch fails again."""
    model = ReferenceMP("cutoff=4")
    model.spec = type(model.spec)(name="ref", cutoff=4.0, n_layers=3, species=frozenset({18}))
    engine = SingleRankEngine(model, skin=0.5)
    s = trajectory(1, step_ang=0.0)[0]
    bad = Structure(numbers=np.r_[s.numbers[:-1], 36], positions=s.positions, cell=s.cell,
                    pbc=s.pbc)
    for _ in range(2):
        with pytest.raises(UnknownSpecies):
            engine.compute([bad])
    (r,) = engine.compute([s])
    assert np.isfinite(r.energy)


def test_virial_off_matches_virial_on():
    engine = SingleRankEngine(LennardJones(cutoff=5.0))
    s = trajectory(1, step_ang=0.0)[0]
    (with_v,) = engine.compute([s], virial=True)
    (without,) = engine.compute([s], virial=False)
    assert without.virial is None
    assert without.energy == with_v.energy
    # the cell's gradient in the same backward pass may reorder the positions' sums
    tol.assert_within(without, replace(with_v, virial=None), s, tol.float64(with_v, s, 5.0),
                      "virial off")


def test_inputs_shared_with_torch_are_not_written():
    engine = SingleRankEngine(LennardJones(cutoff=5.0), dtype=torch.float64)
    s = trajectory(1, step_ang=0.0)[0]
    before = s.positions.copy()
    (r,) = engine.compute([s])
    r.forces[:] = 0.0  # the caller owns the returned arrays
    np.testing.assert_array_equal(s.positions, before)
    (again,) = engine.compute([s])
    assert np.abs(again.forces).max() > 0


def test_batched_virial_equals_singles():
    """The per-structure virial of a batch (segment sums over atoms) equals one by one."""
    engine = SingleRankEngine(LennardJones(cutoff=5.0))
    a = trajectory(1, step_ang=0.0)[0]
    tri = Structure(numbers=[18, 18], positions=[[0, 0, 0], [1.9, 1.2, 1.4]],
                    cell=[[3.9, 0, 0], [1.1, 3.7, 0], [0.6, 0.8, 4.1]], pbc=True)
    batch = engine.compute([a, tri, a])
    for s, got in zip([a, tri, a], batch, strict=True):
        (want,) = SingleRankEngine(LennardJones(cutoff=5.0), skin=0.0).compute([s])
        assert_same(got, want, s)
