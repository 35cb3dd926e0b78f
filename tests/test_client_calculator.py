"""mlipd.client (Lazy Pirate over real ZeroMQ) and MlipdCalculator driving ASE."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq
from ase import units
from ase.build import bulk, molecule
from ase.calculators.calculator import CalculatorSetupError
from ase.md.verlet import VelocityVerlet

from mlipd.calculator import MlipdCalculator
from mlipd.client import Client
from mlipd.engine import make_engine
from mlipd.errors import Busy, ServerUnavailable
from mlipd.protocols import zmq_msgs as zm
from mlipd.server.testing import running_server
from mlipd.types import Structure

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("srv") / "serve.log"
    with running_server(["--model", "lj", "--dtype", "float64", "--zmq", "tcp://127.0.0.1:0"],
                        log=log) as srv:
        yield srv


def test_calculator_drives_ase_md_like_the_direct_model(server):
    atoms = bulk("Ar", "fcc", a=5.3, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=1)
    atoms.set_momenta(np.random.default_rng(0).normal(0, 0.05, (len(atoms), 3)))
    engine = make_engine("lj", dtype="float64")
    energies, refs = [], []

    def record():
        energies.append(atoms.get_potential_energy())
        (r,) = engine.compute([Structure.from_atoms(atoms)])
        refs.append(r)
        np.testing.assert_allclose(atoms.get_forces(), r.forces, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(atoms.get_stress(), -r.virial[[0, 1, 2, 1, 0, 0],
                                   [0, 1, 2, 2, 2, 1]] / atoms.get_volume(), rtol=1e-10,
                                   atol=1e-14)

    with MlipdCalculator(server.address) as calc:
        atoms.calc = calc
        md = VelocityVerlet(atoms, timestep=5 * units.fs)
        md.attach(record, interval=1)
        md.run(25)
        assert calc.get_property("free_energy", atoms) == atoms.get_potential_energy()
    assert len(energies) >= 25
    assert energies == pytest.approx([r.energy for r in refs], rel=1e-12)
    assert np.ptp(energies) > 1e-4  # the atoms did move


def test_molecule_without_cell_has_no_stress(server):
    atoms = molecule("H2O")
    atoms.positions *= 2.5  # keep LJ away from its wall
    with MlipdCalculator(server.address) as calc:
        atoms.calc = calc
        (ref,) = make_engine("lj", dtype="float64").compute([Structure.from_atoms(atoms)])
        assert atoms.get_potential_energy() == pytest.approx(ref.energy, rel=1e-12)
        with pytest.raises(CalculatorSetupError, match="periodic"):
            atoms.get_stress()


def test_bad_atoms_are_refused_before_any_network_call():
    # nothing listens here; a network call would take timeout x retries
    calc = MlipdCalculator("tcp://127.0.0.1:9", timeout_s=30, retries=3)
    try:
        bad = bulk("Ar", "fcc", a=5.3)
        bad.cell[2] = 0.0
        t0 = time.monotonic()
        with pytest.raises(CalculatorSetupError, match="zero-length"):
            calc.get_potential_energy(bad)
        empty = bulk("Ar")[:0]
        with pytest.raises(CalculatorSetupError, match="no atoms"):
            calc.get_potential_energy(empty)
        assert time.monotonic() - t0 < 1.0
    finally:
        calc.close()
    with pytest.raises(CalculatorSetupError, match="either"):
        MlipdCalculator()


def test_client_gives_up_after_its_retries():
    t0 = time.monotonic()
    with Client("tcp://127.0.0.1:9", timeout_s=0.2, retries=3) as c, \
            pytest.raises(ServerUnavailable, match="3 tries"):
        c.ping()
    assert 0.5 < time.monotonic() - t0 < 5.0


def test_lazy_pirate_resends_and_skips_a_late_reply():
    """A real ROUTER that answers the first try too late: the client retries on a
    fresh socket, and a stale reply with an old id is never taken for a new one."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    seen: list[int] = []

    def serve() -> None:
        for k in range(3):
            if not router.poll(10_000):
                return
            ident, raw = router.recv_multipart()
            req = zm.unpack_request(raw)
            seen.append(req.id)
            if k == 0:
                continue  # lose the first try
            if k == 2:  # a late duplicate answer with an old id, then the real one
                router.send_multipart([ident, zm.pack_value(req.id - 1, {"stale": True})])
                router.send_multipart([ident, zm.pack_error(req.id, Busy("try later"))])
            else:
                router.send_multipart([ident, zm.pack_value(req.id, {"pong": True})])

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with Client(f"tcp://127.0.0.1:{port}", timeout_s=0.5, retries=2) as c:
            assert c.ping() == {"pong": True}
            with pytest.raises(Busy, match="try later"):
                c.ping()
    finally:
        thread.join(timeout=20)
        router.close(0)
        ctx.term()
    assert seen == [1, 1, 2]
