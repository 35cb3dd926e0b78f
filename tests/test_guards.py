"""The geometry guards (``mlipd.engine.guards``) and the per-request deadline, in process:
what they refuse, what they let through, and that what they let through is safe."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vesin import NeighborList

from mlipd.engine import make_engine
from mlipd.engine.deadline import deadline
from mlipd.engine.guards import (
    Limits,
    _reduced,
    check_structure,
    closest_pair,
    pair_bound,
    vesin_grid,
)
from mlipd.errors import DeadlineExceeded, MlipdError, TooLarge, ValidationError
from mlipd.testing import tolerances as tol
from mlipd.types import Structure

pytestmark = pytest.mark.timeout(300)
RADIUS = 6.5


def structure(positions, cell, pbc) -> Structure:
    positions = np.asarray(positions, dtype=float)
    return Structure(numbers=np.full(len(positions), 14), positions=positions,
                     cell=np.asarray(cell, dtype=float), pbc=np.broadcast_to(pbc, 3))


def test_real_structures_pass():
    si = bulk("Si")  # 2-atom primitive cell, faces 3.1 Å high: many images
    cu = bulk("Cu")  # 1-atom fcc primitive cell
    slab = fcc111("Cu", size=(3, 3, 4), vacuum=10.0)  # pbc T, T, F
    water = molecule("H2O")
    big = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(10)
    big.rattle(0.05, seed=1)
    flat = structure([[0, 0, 0], [2000, 2000, 0]], np.zeros((3, 3)), False)  # vesin copes
    for s in [*map(Structure.from_atoms, (si, cu, slab, water, big)), flat]:
        check_structure(s, radius=RADIUS, limits=Limits(), world_size=4)


@pytest.mark.parametrize(("s", "error", "words"), [
    (structure([[0, 0, 0], [1e6, 0, 0]], np.zeros((3, 3)), False), ValidationError, "grid"),
    (structure([[0, 0, 0], [3000, 3000, 0]], np.zeros((3, 3)), False), ValidationError,
     "too flat"),
    (structure([[0, 0, 0]], np.eye(3) * 1e300, True), ValidationError, "cell entry"),
    (structure([[0, 0, 0]], np.diag([12, 12, 2e20]), True), ValidationError, "cell entry"),
    (structure([[0, 0, 0]], [[12, 0, 0], [8.6e9, 12, 0], [0, 0, 12]], True), ValidationError,
     "cell entry"),
    (structure([[0, 0, 0]], [[12, 0, 0], [5e3, 12, 0], [0, 0, 12]], True), ValidationError,
     "face height"),
    (structure([[0, 0, 0]], np.eye(3) * 0.4, True), TooLarge, "periodic images"),
    (structure([[0, 0, 0]], np.eye(3) * 0.05, True), ValidationError, "face height"),
    (structure(np.random.default_rng(0).uniform(0, 3, (4000, 3)), np.eye(3) * 3, True),
     TooLarge, "--max-pairs"),
    (structure([[0, 0, 0], [5e7, 0, 0]], np.zeros((3, 3)), False), ValidationError,
     "from the origin"),
    (structure([[0, 0, 0], [0, 0, 0.05]], np.eye(3) * 10, True), ValidationError, "apart"),
    (structure([[0, 0, 0], [0, 0, 5e4]], np.diag([10, 10, 0]), [True, True, False]),
     TooLarge, "cell pairs"),
])
def test_refusals(s, error, words):
    with pytest.raises(error, match=words):
        check_structure(s, radius=RADIUS, limits=Limits())


def test_partition_grid_is_bounded_at_several_ranks_only():
    cloud = structure([[0, 0, 0], [5000, 0, 0], [0, 5000, 0], [0, 0, 5000]], np.zeros((3, 3)),
                      False)
    check_structure(cloud, radius=RADIUS, limits=Limits(), world_size=1)
    with pytest.raises(TooLarge, match="partition bins"):
        check_structure(cloud, radius=RADIUS, limits=Limits(), world_size=2)


@st.composite
def random_structures(draw):
    pbc = np.array(draw(st.lists(st.booleans(), min_size=3, max_size=3)))
    lengths = np.array(draw(st.lists(st.floats(3.0, 20.0), min_size=3, max_size=3)))
    cell = np.diag(lengths)
    cell[1, 0], cell[2, 0], cell[2, 1] = draw(st.lists(st.floats(-0.4, 0.4), min_size=3,
                                                        max_size=3)) * lengths[[1, 2, 2]]
    n = draw(st.integers(1, 60))
    seed = draw(st.integers(0, 2**31))
    frac = np.random.default_rng(seed).uniform(-0.5, 1.5, (n, 3))
    return structure(frac @ cell, cell, pbc)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(random_structures())
def test_pair_bound_is_an_upper_bound(s):
    nl = NeighborList(cutoff=RADIUS, full_list=True)
    i, _ = nl.compute(s.positions, s.cell, list(s.pbc), quantities="ij")
    u, h, _ = _reduced(s.positions, s.cell, s.pbc)
    assert pair_bound(u, h, s.pbc, radius=RADIUS) >= len(i) + s.n_atoms


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(170, 700), st.integers(0, 2**31), st.floats(0.0, 0.099),
       st.booleans())
def test_closest_pair_finds_a_planted_pair_on_the_hashed_path(n, seed, d, periodic):
    """Beyond the brute-force size: atoms on a jittered grid (>= 1 Å apart), one moved
    next to another (across a periodic boundary when it falls there)."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    cell = np.diag([side * 2.0, side * 2.1, side * 1.9])
    cell[1, 0] = 0.3 * side
    positions = (grid + rng.uniform(0, 0.2, grid.shape)) @ (cell / side)
    clean = structure(positions, cell, periodic)
    u, h, _ = _reduced(clean.positions, clean.cell, clean.pbc)
    assert closest_pair(u, h, clean.pbc, cell=clean.cell, below=0.1) is None
    i, j = rng.choice(n, 2, replace=False)
    step = rng.normal(size=3)
    positions[j] = positions[i] + d * step / np.linalg.norm(step)
    if periodic:
        positions[j] += cell[0] * rng.integers(-1, 2)  # an image, not the atom itself
    planted = structure(positions, cell, periodic)
    u, h, _ = _reduced(planted.positions, planted.cell, planted.pbc)
    found = closest_pair(u, h, planted.pbc, cell=planted.cell, below=0.1)
    assert found is not None
    assert found[2] < 0.1


def test_what_the_guards_let_through_does_not_crash_vesin(tmp_path):
    """Extreme shapes (extents and cells from 1e-3 to 1e6 Å, every periodicity): vesin
    runs on every one the guards accept, in a child process, which must survive. The
    guards replicate vesin's grid (``vesin_grid``); this checks the replica."""
    rng = np.random.default_rng(1)
    accepted = []
    for _ in range(150):
        pbc = rng.random(3) < 0.5
        n = int(rng.integers(1, 6))
        scale = 10.0 ** rng.uniform(-3, 6, 3)
        cell = np.diag(np.maximum(scale, 1.0))
        positions = rng.uniform(0, 1, (n, 3)) * scale
        s = structure(positions, cell, pbc)
        try:
            check_structure(s, radius=RADIUS, limits=Limits(min_distance=0.0))
        except MlipdError:
            continue
        accepted.append((s.positions, s.cell, [bool(p) for p in s.pbc]))
    assert len(accepted) > 20
    data = tmp_path / "accepted.pkl"
    data.write_bytes(pickle.dumps(accepted))
    code = ("import pickle, sys; from vesin import NeighborList\n"
            f"for p, c, pbc in pickle.load(open({str(data)!r}, 'rb')):\n"
            f"    NeighborList(cutoff={RADIUS}, full_list=False).compute(p, c, pbc, "
            "quantities='ij')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def test_vesin_grid_replica_flags_the_shapes_that_crash_vesin():
    h = np.ones(3)
    crash = np.array([[0, 0, 0], [3000, 3000, 0.0]])
    fine = np.array([[0, 0, 0], [2000, 2000, 0.0]])
    assert vesin_grid(crash, h, np.zeros(3, bool), radius=RADIUS) is None
    assert vesin_grid(fine, h, np.zeros(3, bool), radius=RADIUS) is not None


def test_deadline_is_checked_between_stages_and_the_engine_recovers():
    engine = make_engine("lj", dtype="float64")
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=2)
    s = Structure.from_atoms(atoms)
    (ref,) = engine.compute([s])
    moved = Structure(numbers=s.numbers, positions=s.positions + 0.01, cell=s.cell, pbc=True)
    with deadline(time.monotonic() - 1), pytest.raises(DeadlineExceeded, match="queued"):
        engine.compute([moved])
    with deadline(time.monotonic() + 60):
        (again,) = engine.compute([s])
    assert again.energy == ref.energy  # the same step on the same input: bit for bit
    direct = make_engine("lj", dtype="float64")
    (fresh,) = direct.compute([moved])
    (got,) = engine.compute([moved])
    # a reused neighbour list (another order): two float64 computations (``tol.float64``)
    bound = tol.float64(fresh, moved, direct.model.spec.cutoff).energy_per_atom
    assert abs(got.energy - fresh.energy) / moved.n_atoms <= bound


def test_whole_structure_engines_are_guarded_too():
    engine = make_engine("ase:ase.calculators.emt:EMT")
    far = Structure(numbers=np.array([29, 29]), positions=np.array([[0, 0, 0], [1e6, 0, 0.0]]),
                    cell=np.zeros((3, 3)), pbc=False)
    with pytest.raises(ValidationError, match="grid"):
        engine.compute([far])
