"""The generic whole-structure adapter ``ase:MODULE:NAME`` with ASE's own real calculators."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.counterions import AtomicCounterIon
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones
from ase.stress import voigt_6_to_full_3x3_stress
from helpers.ase_socket import evaluate_through_ase_socket
from helpers.float64_bounds import assert_over_wire

from mlipd.engine import make_engine
from mlipd.engine.whole import WholeEngine
from mlipd.errors import CalculationFailed, SetupError
from mlipd.models.ase_generic import ASECalculatorModel, parse_target
from mlipd.testing import tolerances as tol
from mlipd.types import Result, Structure

pytestmark = pytest.mark.timeout(60)


def rattled_cu(seed=0):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.positions += np.random.default_rng(seed).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def direct(atoms, calc):
    a = atoms.copy()
    a.calc = calc
    stress = a.get_stress(voigt=False) if a.pbc.all() else None
    return a.get_potential_energy(), a.get_forces(), stress


def test_emt_through_make_engine_equals_emt():
    engine = make_engine("ase:ase.calculators.emt:EMT")
    assert isinstance(engine, WholeEngine)
    assert engine.world_size == 1
    assert engine.spec.name == "ase:ase.calculators.emt:EMT"
    cases = [rattled_cu(), molecule("CH3CH2OH")]
    results = engine.compute([Structure.from_atoms(a) for a in cases])
    assert engine.calls == 1
    for atoms, r in zip(cases, results, strict=True):
        e, f, s = direct(atoms, EMT())
        # ASE's calculator on the same coordinates: its numbers, passed on as they are;
        # the stress made a virial and back (2 roundings)
        assert r.energy == e
        np.testing.assert_array_equal(r.forces, f)
        if s is None:
            assert r.virial is None
        else:
            np.testing.assert_allclose(r.stress(atoms.cell.array), s, rtol=tol.roundings(2),
                                       atol=0)


def test_options_are_passed_as_literals():
    engine = make_engine("ase:ase.calculators.lj:LennardJones,sigma=2.3,epsilon=0.012,rc=5.0,"
                         "smooth=True,cutoff=5.0")
    atoms = rattled_cu(1)
    (r,) = engine.compute([Structure.from_atoms(atoms)])
    e, f, s = direct(atoms, LennardJones(sigma=2.3, epsilon=0.012, rc=5.0, smooth=True))
    assert r.energy == e  # as above
    np.testing.assert_array_equal(r.forces, f)
    np.testing.assert_allclose(r.stress(atoms.cell.array), s, rtol=tol.roundings(2), atol=0)
    assert engine.spec.cutoff == 5.0


def test_parse_target():
    assert parse_target("a.b:C,x=1,y=abc,z=[1, 2]") == ("a.b", "C", {"x": 1, "y": "abc",
                                                                     "z": [1, 2]})
    with pytest.raises(ValueError, match="MODULE:NAME"):
        parse_target("EMT")
    with pytest.raises(ValueError, match="key=value"):
        parse_target("a:B,flag")


def test_calculator_without_stress_gives_no_virial():
    atoms = bulk("Na", "sc", a=4.0).repeat((2, 2, 2))
    atoms.positions += np.random.default_rng(2).normal(scale=0.1, size=atoms.positions.shape)
    calc = AtomicCounterIon(1.0, 0.0115, 2.35, rc=3.9)
    engine = WholeEngine(ASECalculatorModel(calculator=calc))
    (r,) = engine.compute([Structure.from_atoms(atoms)])
    assert r.virial is None
    a = atoms.copy()
    a.calc = AtomicCounterIon(1.0, 0.0115, 2.35, rc=3.9)
    assert r.energy == a.get_potential_energy()  # as above
    np.testing.assert_array_equal(r.forces, a.get_forces())


def test_more_than_one_rank_needs_an_adapter():
    with pytest.raises(SetupError, match="needs an mlipd adapter"):
        make_engine("ase:ase.calculators.emt:EMT", ranks=2)


@pytest.mark.parametrize(("arg", "match"), [
    ("ase:no_such_module_xyz:Calc", "cannot import"),
    ("ase:ase.calculators.emt:NoSuch", "has no"),
    ("ase:collections:OrderedDict", "not an ASE calculator"),
    ("ase", "needs a calculator"),
])
def test_setup_errors(arg, match):
    with pytest.raises(SetupError, match=match):
        make_engine(arg)


def test_calculation_error_is_typed_and_engine_keeps_working():
    engine = make_engine("ase:ase.calculators.emt:EMT")
    with pytest.raises(CalculationFailed, match="No EMT-potential"):
        engine.compute([Structure.from_atoms(bulk("U", "fcc", a=4.0))])
    (r,) = engine.compute([Structure.from_atoms(rattled_cu())])
    assert np.isfinite(r.energy)


def test_behind_the_driver_front_end(processes, short_tmp):
    """``mlipd drive --model ase:...`` serves ASE's real SocketIOCalculator: the generic
    adapter sits behind the same front ends as graph models."""
    atoms = rattled_cu(3)
    energy, forces, stress = evaluate_through_ase_socket(
        processes, atoms, short_tmp, ["ase:ase.calculators.emt:EMT"])
    e, f, s = direct(atoms, EMT())
    # ASE's socket's conversions (as tests/test_driver_ase.py: 2 roundings of the
    # geometry, up to 6 of the stress through the virial here); EMT's result at the
    # converted coordinates within its measured response
    engine = make_engine("ase:ase.calculators.emt:EMT")
    st = Structure.from_atoms(atoms)
    ref = Result(energy=e, forces=f, virial=-s * atoms.get_volume())
    got = Result(energy=energy, forces=forces,
                 virial=-voigt_6_to_full_3x3_stress(stress) * atoms.get_volume())
    assert_over_wire(got, ref, st, engine, geometry_roundings=2, output_roundings=6)
