"""The reference message-passing model: smooth, invariant, angular, deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.float64_bounds import assert_float64, assert_over_wire

from mlipd.engine.single_rank import SingleRankEngine
from mlipd.models.reference import ReferenceMP
from mlipd.models.registry import load_model
from mlipd.testing.systems import small_triclinic
from mlipd.types import Result, Structure


def molecule(positions, numbers=None) -> Structure:
    positions = np.asarray(positions, float)
    numbers = np.full(len(positions), 6) if numbers is None else np.asarray(numbers)
    return Structure(numbers=numbers, positions=positions, cell=np.zeros((3, 3)),
                     pbc=np.zeros(3, bool))



@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Intra-op threads fight over the 2 shared cores: this module runs on one."""

@pytest.fixture(scope="module")
def engine():
    return SingleRankEngine(ReferenceMP("layers=3,features=16,cutoff=5,seed=0"))


def test_smooth_to_zero_at_cutoff(engine):
    rc = 5.0
    lone = sum(engine.compute([molecule([[0, 0, 0]])])[0].energy for _ in range(2))
    for d in (1e-2, 1e-3, 1e-4):
        r = engine.compute([molecule([[0, 0, 0], [rc - d, 0, 0]])])[0]
        assert abs(r.energy - lone) < 50 * d**2  # value and slope vanish at rc
        assert np.abs(r.forces).max() < 50 * d
    beyond = engine.compute([molecule([[0, 0, 0], [rc + 1e-6, 0, 0]])])[0]
    assert beyond.energy == pytest.approx(lone, abs=1e-14)


def test_forces_and_virial_match_finite_differences(engine):
    s = small_triclinic()
    r = engine.compute([s])[0]
    h = 1e-5
    for i, k in [(0, 0), (1, 2), (3, 1)]:
        plus, minus = s.positions.copy(), s.positions.copy()
        plus[i, k] += h
        minus[i, k] -= h
        ep = engine.compute([Structure(s.numbers, plus, s.cell, s.pbc)])[0].energy
        em = engine.compute([Structure(s.numbers, minus, s.cell, s.pbc)])[0].energy
        assert -(ep - em) / (2 * h) == pytest.approx(r.forces[i, k], abs=1e-7)
    eps = np.zeros((3, 3))
    eps[0, 1] = eps[1, 0] = h
    e = [engine.compute([Structure(s.numbers, s.positions @ (np.eye(3) + sgn * eps),
                                   s.cell @ (np.eye(3) + sgn * eps), s.pbc)])[0].energy
         for sgn in (1, -1)]
    assert -(e[0] - e[1]) / (2 * h) == pytest.approx(r.virial[0, 1] + r.virial[1, 0], abs=1e-7)


def test_invariant_under_rotation_and_translation(engine):
    rng = np.random.default_rng(0)
    pos = rng.normal(scale=1.5, size=(12, 3))
    s = molecule(pos, rng.integers(1, 10, 12))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    moved = molecule(pos @ q.T + [1.0, -2.0, 3.0], s.numbers)
    a, b = engine.compute([s])[0], engine.compute([moved])[0]
    # the moved coordinates and the rotated forces each round 3 times
    assert_over_wire(b, Result(energy=a.energy, forces=a.forces @ q.T), moved, engine,
                     geometry_roundings=3, output_roundings=3, what="rotated")


def test_angular_term(engine):
    """Two bonds of fixed length whose ends stay beyond the cutoff: only the angle acts."""
    model = SingleRankEngine(ReferenceMP("cutoff=3"))
    energies = []
    for angle in (120.0, 150.0, 180.0):
        a = np.radians(angle)
        energies.append(model.compute([molecule([[0, 0, 0], [2, 0, 0],
                                                 [2 * np.cos(a), 2 * np.sin(a), 0]])])[0].energy)
    assert np.ptp(energies) > 1e-6


def test_deterministic_and_parsed():
    a, b = ReferenceMP("seed=3,layers=4"), load_model("reference:seed=3,layers=4")
    assert a.spec.n_layers == 4
    assert b.spec.cutoff == 5.0
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(ReferenceMP("seed=4").embedding, a.embedding)
    with pytest.raises(ValueError, match="unknown option 'depth'"):
        ReferenceMP("depth=3")
    with pytest.raises(ValueError, match="must be > 0"):
        ReferenceMP("layers=0")


def test_batch_equals_singles(engine):
    s1, s2 = small_triclinic(), molecule([[0, 0, 0], [1.2, 0, 0], [0, 1.3, 0.2]])
    both = engine.compute([s1, s2])
    for one, s in zip(both, (s1, s2), strict=True):
        single = engine.compute([s])[0]
        # another order; image shifts times the cells in a batched product
        assert_float64(one, single, s, engine, other_geometry=True, what="batch")
