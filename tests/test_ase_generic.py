"""The generic whole-structure adapter ``ase:MODULE:NAME`` with ASE's own real calculators."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.counterions import AtomicCounterIon
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones
from ase.stress import full_3x3_to_voigt_6_stress
from helpers.ase_socket import evaluate_through_ase_socket

from mlipd.engine import make_engine
from mlipd.engine.whole import WholeEngine
from mlipd.errors import CalculationFailed, SetupError
from mlipd.models.ase_generic import ASECalculatorModel, parse_target
from mlipd.types import Structure

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
        assert r.energy == pytest.approx(e, rel=1e-14, abs=1e-14)
        np.testing.assert_allclose(r.forces, f, rtol=1e-12, atol=1e-14)
        if s is None:
            assert r.virial is None
        else:
            np.testing.assert_allclose(r.stress(atoms.cell.array), s, rtol=1e-12, atol=1e-14)


def test_options_are_passed_as_literals():
    engine = make_engine("ase:ase.calculators.lj:LennardJones,sigma=2.3,epsilon=0.012,rc=5.0,"
                         "smooth=True,cutoff=5.0")
    atoms = rattled_cu(1)
    (r,) = engine.compute([Structure.from_atoms(atoms)])
    e, f, s = direct(atoms, LennardJones(sigma=2.3, epsilon=0.012, rc=5.0, smooth=True))
    assert r.energy == pytest.approx(e, rel=1e-14)
    np.testing.assert_allclose(r.forces, f, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(r.stress(atoms.cell.array), s, rtol=1e-12, atol=1e-14)
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
    assert r.energy == pytest.approx(a.get_potential_energy(), rel=1e-14)
    np.testing.assert_allclose(r.forces, a.get_forces(), rtol=1e-12, atol=1e-14)


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
    assert energy == pytest.approx(e, rel=1e-12)
    np.testing.assert_allclose(forces, f, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stress, full_3x3_to_voigt_6_stress(s), rtol=1e-10, atol=1e-12)
