"""The single-rank engine with the analytic LJ model against ASE's own LennardJones."""

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.lj import LennardJones as AseLJ

from mlipd.engine import make_engine
from mlipd.errors import UnknownModel, ValidationError
from mlipd.models.registry import load_model, names
from mlipd.types import Structure

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
    (r,) = engine.compute([Structure.from_atoms(atoms)])
    e, f, s = ase_reference(atoms)
    assert r.energy == pytest.approx(e, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(r.forces, f, rtol=1e-10, atol=1e-12)
    if s is None:
        assert r.virial is None
    else:
        np.testing.assert_allclose(r.stress(atoms.cell.array), s, rtol=1e-10, atol=1e-14)


def test_batch_equals_singles(engine):
    structures = [Structure.from_atoms(a) for a in systems().values()]
    batched = engine.compute(structures)
    for s, b in zip(structures, batched, strict=True):
        (single,) = engine.compute([s])
        assert b.energy == pytest.approx(single.energy, rel=1e-13, abs=1e-14)
        np.testing.assert_allclose(b.forces, single.forces, rtol=1e-12, atol=1e-14)


def test_rotation_and_translation_invariance(engine):
    atoms = systems()["bulk"]
    (r0,) = engine.compute([Structure.from_atoms(atoms)])
    moved = atoms.copy()
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    moved.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
    moved.positions = atoms.positions @ rot.T + [0.3, -1.1, 2.0]
    (r1,) = engine.compute([Structure.from_atoms(moved)])
    assert r1.energy == pytest.approx(r0.energy, rel=1e-11)
    np.testing.assert_allclose(r1.forces, r0.forces @ rot.T, atol=1e-11)


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
    assert r.energy == pytest.approx(e, rel=1e-6)
    np.testing.assert_allclose(r.forces, f, rtol=0, atol=1e-5 * np.abs(f).max())
    np.testing.assert_allclose(r.stress(atoms.cell.array), s, rtol=0, atol=1e-5 * np.abs(s).max())
