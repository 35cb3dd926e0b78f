"""The single-rank engine with the analytic LJ model against ASE's own LennardJones."""

from dataclasses import replace

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.lj import LennardJones as AseLJ
from helpers.float64_bounds import assert_float64, assert_over_wire

from mlipd.engine import make_engine
from mlipd.errors import UnknownModel, ValidationError
from mlipd.models.registry import load_model, names
from mlipd.testing import tolerances as tol
from mlipd.types import Result, Structure

EPS, SIGMA, RC = 0.0104, 3.4, 7.0


def ase_reference(atoms):
    atoms = atoms.copy()
    atoms.calc = AseLJ(epsilon=EPS, sigma=SIGMA, rc=RC, smooth=False)
    stress = atoms.get_stress(voigt=False) if atoms.pbc.all() else None
    return atoms.get_potential_energy(), atoms.get_forces(), stress


def systems():
    box = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(3)
    box.rattle(0.15, seed=1)
    # triclinic cell much smaller than the cutoff: many images of every atom, self-images included
    tri = Atoms("Ar2", positions=[[0, 0, 0], [1.9, 1.2, 1.4]],
                cell=[[3.9, 0, 0], [1.1, 3.7, 0], [0.6, 0.8, 4.1]], pbc=True)
    slab = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((2, 2, 2))
    slab.pbc = [True, True, False]
    slab.rattle(0.1, seed=2)
    mol = molecule("CH4")
    mol.positions *= 2.5  # LJ-sized distances
    return {"bulk": box, "triclinic": tri, "slab": slab, "molecule": mol}


@pytest.fixture(scope="module")
def engine():
    return make_engine(f"lj:epsilon={EPS},sigma={SIGMA},cutoff={RC}", dtype="float64")


@pytest.mark.parametrize("name", list(systems()))
def test_lj_equals_ase(engine, name):
    atoms = systems()[name]
    st = Structure.from_atoms(atoms)
    (r,) = engine.compute([st])
    e, f, s = ase_reference(atoms)
    if s is None:
        assert r.virial is None
    # ASE's LJ: its own neighbour list and sums (the virial from its stress: 2 roundings)
    ref = Result(energy=e, forces=f, virial=None if s is None else -s * atoms.get_volume())
    assert_float64(r, ref, st, engine, other_geometry=True, output_roundings=2, what=name)


def test_batch_equals_singles(engine):
    structures = [Structure.from_atoms(a) for a in systems().values()]
    batched = engine.compute(structures)
    for s, b in zip(structures, batched, strict=True):
        (single,) = engine.compute([s])
        # another order; image shifts times the cells in a batched product
        assert_float64(b, single, s, engine, other_geometry=True, what="batch")


def test_rotation_and_translation_invariance(engine):
    atoms = systems()["bulk"]
    (r0,) = engine.compute([Structure.from_atoms(atoms)])
    moved = atoms.copy()
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    moved.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
    moved.positions = atoms.positions @ rot.T + [0.3, -1.1, 2.0]
    s1 = Structure.from_atoms(moved)
    (r1,) = engine.compute([s1])
    # the rotated coordinates and cell and the rotated forces each round 3 times (a
    # 3-term product and a sum)
    rotated = Result(energy=r0.energy, forces=r0.forces @ rot.T)
    assert_over_wire(replace(r1, virial=None), rotated, s1, engine, geometry_roundings=3,
                     output_roundings=3, what="rotated")


def test_inputs_not_mutated(engine):
    atoms = systems()["bulk"]
    s = Structure.from_atoms(atoms)
    before = s.positions.copy()
    engine.compute([s])
    np.testing.assert_array_equal(s.positions, before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"positions": [[np.nan, 0, 0]]}, "NaN"),
        ({"positions": [[0, 0, 0], [1, 1, 1]]}, "shape"),
        ({"numbers": [0]}, "atomic numbers"),
        ({"cell": np.eye(2)}, "cell"),
    ],
)
def test_structure_validation(kwargs, message):
    args = {"numbers": [18], "positions": [[0.0, 0, 0]], "cell": np.zeros((3, 3)), "pbc": False}
    args.update(kwargs)
    with pytest.raises(ValidationError, match=message):
        Structure(**args)


def test_registry():
    assert {"lj", "chgnet", "mace"} <= set(names())
    with pytest.raises(UnknownModel, match="unknown model 'nope'"):
        load_model("nope")


def test_float32_keeps_geometry_in_float64():
    """A float32 model far from the origin: positions near 2,000 Å have a float32 ulp of
    1.2e-4 Å, which would cost ~1e-3 relative in LJ forces; the engine subtracts in
    float64 and rounds only the edge vectors, so float32 stays at float32 round-off."""
    atoms = systems()["bulk"]
    e, f, s = ase_reference(atoms)
    far = atoms.copy()
    far.positions += [1500.0, -2000.0, 900.0]  # a periodic box: the same physics
    engine32 = make_engine(f"lj:epsilon={EPS},sigma={SIGMA},cutoff={RC}", dtype="float32")
    (r,) = engine32.compute([Structure.from_atoms(far)])
    # float32 arithmetic on float64 geometry (``mlipd.testing.tolerances``): the bound
    # does not grow with the distance from the origin; ASE's float64 LJ is the reference
    st = Structure.from_atoms(atoms)
    ref = Result(energy=e, forces=f, virial=-s * atoms.get_volume())
    tol.assert_within(r, ref, st, tol.arithmetic(ref, st, RC), "far from the origin")
