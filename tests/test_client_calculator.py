"""mlipd.client over real ZeroMQ (connect check, heartbeats, limits from info) and
MlipdCalculator driving ASE."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import zmq
from ase import units
from ase.build import bulk, molecule
from ase.calculators.calculator import CalculatorSetupError
from ase.md.verlet import VelocityVerlet
from ase.stress import voigt_6_to_full_3x3_stress
from conftest import free_tcp_port
from helpers.float64_bounds import assert_over_wire

from mlipd.calculator import MlipdCalculator
from mlipd.client import Client
from mlipd.engine import make_engine
from mlipd.errors import ServerUnavailable, SetupError, TooLarge, ValidationError
from mlipd.protocols import zmq_msgs as zm
from mlipd.server.testing import running_server
from mlipd.types import Result, Structure

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
        s = Structure.from_atoms(atoms)
        (r,) = engine.compute([s])
        refs.append(r)
        # the server's own float64 step, the stress through the virial here (2 roundings)
        got = Result(energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                     virial=-voigt_6_to_full_3x3_stress(atoms.get_stress()) * atoms.get_volume())
        assert_over_wire(got, r, s, engine, output_roundings=2)

    with MlipdCalculator(server.address) as calc:
        atoms.calc = calc
        md = VelocityVerlet(atoms, timestep=5 * units.fs)
        md.attach(record, interval=1)
        md.run(25)
        assert calc.get_property("free_energy", atoms) == atoms.get_potential_energy()
    assert len(energies) >= 25  # each compared in record()
    assert np.ptp(energies) > 1e-4  # the atoms did move


def test_client_takes_ase_atoms_as_well_as_structures(server):
    """Issue 25 item 7: ``compute`` and ``batch`` with ``ase.Atoms``, equal to the same
    structures sent as ``Structure``; anything else is refused naming its type."""
    a = bulk("Ar", "fcc", a=5.3, cubic=True)
    a.rattle(0.05, seed=2)
    b = molecule("H2O")
    b.center(vacuum=4.0)
    with Client(server.address) as c:
        one = c.compute(a)
        want = c.compute(Structure.from_atoms(a))
        assert one.energy == want.energy
        np.testing.assert_array_equal(one.forces, want.forces)
        both = c.batch([a, Structure.from_atoms(b)])
        assert [r.energy for r in both] == [want.energy, c.compute(b).energy]
        with pytest.raises(ValidationError, match="got list"):
            c.compute([[0.0, 0.0, 0.0]])


def test_molecule_without_cell_has_no_stress(server):
    atoms = molecule("H2O")
    atoms.positions *= 2.5  # keep LJ away from its wall
    with MlipdCalculator(server.address) as calc:
        atoms.calc = calc
        direct = make_engine("lj", dtype="float64")
        s = Structure.from_atoms(atoms)
        (ref,) = direct.compute([s])
        assert_over_wire(Result(energy=atoms.get_potential_energy(), forces=atoms.get_forces()),
                         ref, s, direct)
        with pytest.raises(CalculatorSetupError, match="periodic"):
            atoms.get_stress()


def test_bad_atoms_are_refused_before_any_network_call(server):
    with MlipdCalculator(server.address) as calc, Client(server.address) as c:
        before = c.stats()["requests"]
        bad = bulk("Ar", "fcc", a=5.3)
        bad.cell[2] = 0.0
        with pytest.raises(CalculatorSetupError, match="zero-length"):
            calc.get_potential_energy(bad)
        empty = bulk("Ar")[:0]
        with pytest.raises(CalculatorSetupError, match="no atoms"):
            calc.get_potential_energy(empty)
        after = c.stats()["requests"]
    # the server saw only the two clients' info and stats requests, no compute
    assert after.get("compute", 0) == before.get("compute", 0)
    with pytest.raises(CalculatorSetupError, match="either"):
        MlipdCalculator()


@pytest.mark.parametrize("make", [Client, MlipdCalculator])
@pytest.mark.parametrize(("endpoint", "hint"), [
    ("127.0.0.1:5555", "did you mean tcp://127.0.0.1:5555"),
    ("tcp://127.0.0.1", "expected tcp://HOST:PORT"),
    ("tcp://127.0.0.1:0", "real host and port"),
    ("udp://127.0.0.1:5555", "not supported"),
    ("ipc://@abstract", "abstract"),
    ("tcp://[nothex]:5555", "expected tcp://HOST:PORT"),
])
def test_malformed_endpoints_are_refused_at_once_with_the_expected_form(make, endpoint, hint):
    # parsed, never connected: a connection attempt would wait the hour out (the test's
    # timeout fails it first)
    with pytest.raises(SetupError, match=re.escape(hint)):
        make(endpoint, connect_timeout_s=3600.0)


def test_malformed_endpoint_on_serve_fails_before_loading_a_model():
    proc = subprocess.run([sys.executable, "-m", "mlipd", "serve", "--zmq", "127.0.0.1:5555",
                           "--model", "lj"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "did you mean tcp://127.0.0.1:5555" in proc.stderr


def test_nothing_answering_fails_within_the_connect_timeout_naming_the_endpoint():
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    # the connect timeout, not a hang: the test's own timeout is the generous bound
    with pytest.raises(ServerUnavailable, match=re.escape(endpoint)) as info:
        Client(endpoint, connect_timeout_s=1.0)
    assert "mlipd serve" in str(info.value)
    with pytest.raises(ServerUnavailable, match=re.escape(endpoint)):
        MlipdCalculator(endpoint, connect_timeout_s=1.0)


def test_the_client_resends_on_the_same_socket_and_waits_while_the_server_is_alive():
    """A real ROUTER that takes its time: it answers the first tries of a compute with
    'pending' (as mlipd does for a repeated id), sends a stale reply with an old id, then
    the result. The client keeps one socket (one routing id), skips the stale reply and
    returns the result; it never gives up while it hears 'pending'."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    seen: list[tuple[bytes, int]] = []

    def serve() -> None:
        while router.poll(10_000):
            ident, raw = router.recv_multipart()
            req = zm.unpack_request(raw)
            seen.append((ident, req.id))
            if req.op == "info":
                router.send_multipart([ident, zm.pack_value(req.id, {"max_request_atoms": 100})])
            elif sum(1 for _, r in seen if r == req.id) < 4:
                router.send_multipart([ident, zm.pack_pending(req.id, state="computing",
                                                              waited_s=0.0)])
            else:
                router.send_multipart([ident, zm.pack_value(req.id - 1, {"stale": True})])
                router.send_multipart([ident, zm.pack_value(req.id, {"pong": True})])
                return

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with Client(f"tcp://127.0.0.1:{port}", heartbeat_s=0.4) as c:
            with pytest.raises(TooLarge, match="limit of 100"):  # from info, never sent
                c.compute(Structure.from_atoms(bulk("Ar", "fcc", a=5.3).repeat(5)))
            assert c.ping() == {"pong": True}
    finally:
        thread.join(timeout=20)
        router.close(0)
        ctx.term()
    assert len({ident for ident, _ in seen}) == 1  # one socket, one routing id
    assert [rid for _, rid in seen] == [1, 2, 2, 2, 2]  # the too-large batch never left
