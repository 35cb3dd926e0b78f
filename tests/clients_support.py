"""Shared by the tests of the compiled clients (test_clients_c.py, test_clients_fortran.py):
a pytest plug-in (``pytest_plugins = ("clients_support",)``) whose session fixtures build
``clients/`` with CMake once and start each `mlipd serve` once, and the checks both
languages must pass through their probe programs (clients/examples/probe.c, probe.f90).

A piece that cannot be built fails the tests with the build's log; nothing is skipped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from helpers.float64_bounds import assert_float64

from mlipd.bench.compiled import BuildFailed, ClientPrograms, build_clients, run_probe
from mlipd.client import Client
from mlipd.curve import keygen
from mlipd.engine import make_engine
from mlipd.server.testing import running_server
from mlipd.testing import tolerances as tol
from mlipd.types import Structure

MAX_REQUEST_ATOMS = 200
# protocol fidelity: a cheap message-passing model whose output depends on every input
# byte (species, positions, cell), in float64
REFERENCE = ["--model", "reference", "--dtype", "float64", "--device", "cpu"]


@pytest.fixture(scope="session")
def clients(tmp_path_factory) -> ClientPrograms:
    try:
        return build_clients(tmp_path_factory.mktemp("clients"))
    except BuildFailed as e:
        pytest.fail(f"the compiled clients do not build: {e}", pytrace=False)


@pytest.fixture(scope="session")
def reference_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_server([*REFERENCE, "--zmq", "tcp://127.0.0.1:0", "--max-request-atoms",
                         str(MAX_REQUEST_ATOMS)], log=log) as srv:
        yield srv


@pytest.fixture(scope="session")
def curve_server(tmp_path_factory):
    """A server with --curve: (server, its key directory, another client's keys that
    know the server's public key but are not accepted)."""
    base = tmp_path_factory.mktemp("curve")
    keys, other = base / "keys", base / "other"
    keygen(keys)
    keygen(other)
    (other / "server.key").write_bytes((keys / "server.key").read_bytes())
    with running_server([*REFERENCE, "--zmq", "tcp://127.0.0.1:0", "--curve", str(keys)],
                        log=base / "serve.log") as srv:
        yield srv, keys, other


@pytest.fixture(scope="session")
def chgnet_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("chgnet") / "serve.log"
    with running_server(["--model", "chgnet", "--device", "cpu", "--zmq",
                         "tcp://127.0.0.1:0"], log=log) as srv:
        yield srv


# ---------------------------------------------------------------- structures


def fidelity_structures() -> list[Structure]:
    """Periodic, slab, open and triclinic structures with several elements."""
    periodic = bulk("Ar", "fcc", a=5.3, cubic=True).repeat((2, 1, 1))
    periodic.numbers[::3] = 36  # Kr
    periodic.rattle(0.05, seed=1)
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0, a=3.7)
    slab.numbers[-2:] = 29, 47
    slab.rattle(0.03, seed=2)
    open_ = Atoms("C2H4O", positions=[[0, 0, 0], [1.34, 0, 0], [-0.6, 0.9, 0.1],
                                      [-0.6, -0.9, -0.1], [1.9, 0.9, 0.05],
                                      [1.9, -0.9, 0.0], [3.2, 0.2, 0.3]])
    triclinic = _on_grid(Atoms("Si3O5", cell=[[5.1, 0.0, 0.0], [1.3, 4.8, 0.0],
                                              [0.9, -1.1, 5.6]], pbc=True))
    return [Structure.from_atoms(a) for a in (periodic, slab, open_, triclinic)]


def _on_grid(atoms: Atoms) -> Atoms:
    """Up to 8 atoms on a jittered 2x2x2 grid of the cell (random positions could overlap)."""
    grid = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)]) / 2
    jitter = np.random.default_rng(4).normal(0, 0.03, grid.shape)
    atoms.set_scaled_positions(grid[: len(atoms)] + 0.25 + jitter[: len(atoms)])
    return atoms


def python_results(endpoint: str, structures, *, key_dir=None):
    with Client(endpoint, timeout_s=120, curve=key_dir) as c:
        return [c.compute(s) for s in structures]


def assert_bitwise(got, want) -> None:
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.energy == w.energy, (k, g.energy, w.energy)
        assert np.array_equal(g.forces, w.forces), (k, np.abs(g.forces - w.forces).max())
        if w.virial is None:
            assert g.virial is None, k  # NaN from the compiled client: none
        else:
            assert np.array_equal(g.virial, w.virial), (k, g.virial - w.virial)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- checks for both languages


def check_equals_python_client(probe: Path, server, workdir: Path) -> None:
    structures = fidelity_structures()
    want = python_results(server.address, structures)
    run = run_probe(probe, server.address, structures, mode="single", workdir=workdir)
    assert run.results is not None, run.lines
    assert_bitwise(run.results, want)
    assert [r.virial is None for r in want] == [False, True, True, False]  # both kinds seen


def check_batch(probe: Path, server, workdir: Path) -> None:
    structures = fidelity_structures()
    with Client(server.address, timeout_s=120) as c:
        want_batch = c.batch(structures)
        singles = [c.compute(s) for s in structures]
    run = run_probe(probe, server.address, structures, mode="batch", workdir=workdir)
    assert run.results is not None, run.lines
    assert_bitwise(run.results, want_batch)
    # one batched engine call against one call per structure: the same model on the same
    # atoms, summed in another order (float64 round-off)
    # (``tol.float64``, image shifts times the cells in a batched product: the stiffness
    # measured with the same model here)
    engine = make_engine("reference", dtype="float64")
    for got, one, s in zip(run.results, singles, structures, strict=True):
        assert_float64(got, one, s, engine, other_geometry=True, what="batch vs single")


def check_nan_is_bad_input(probe: Path, server, workdir: Path) -> None:
    s = fidelity_structures()[0]
    positions = s.positions.copy()
    positions[2, 1] = np.nan
    bad = Structure.__new__(Structure)  # skips the Python-side check: the server's answer
    for name, value in (("numbers", s.numbers), ("positions", positions), ("cell", s.cell),
                        ("pbc", s.pbc)):
        object.__setattr__(bad, name, value)
    run = run_probe(probe, server.address, [bad], mode="single", workdir=workdir)
    assert run.returncode == 1, run.lines
    assert run.line("error").startswith("error -1 bad_input:"), run.lines
    assert "NaN" in run.line("error")
    with Client(server.address) as c:  # still serving
        assert c.ping()["pong"] is True


def check_too_large_before_sending(probe: Path, server, workdir: Path) -> None:
    big = Structure.from_atoms(bulk("Ar", "fcc", a=5.3, cubic=True).repeat((4, 4, 4)))
    assert big.n_atoms > MAX_REQUEST_ATOMS
    with Client(server.address) as c:
        before = c.stats()["requests"]
        run = run_probe(probe, server.address, [big], mode="single", workdir=workdir)
        after = c.stats()["requests"]
    assert run.returncode == 1, run.lines
    assert run.line("error").startswith("error -2 too_large:"), run.lines
    assert f"limit of {MAX_REQUEST_ATOMS}" in run.line("error")
    # the probe asked for info when it connected, and sent no compute request
    assert after.get("compute", 0) == before.get("compute", 0), (before, after)
    assert after.get("info", 0) == before.get("info", 0) + 1, (before, after)


def check_missing_server(probe: Path, workdir: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    run = run_probe(probe, endpoint, fidelity_structures()[:1], mode="single",
                    workdir=workdir, timeout_s=1.0, wait_s=60)
    assert run.returncode == 2, run.lines
    line = run.line("connect")
    assert line.startswith("connect -7 unavailable:"), run.lines
    assert endpoint in line, line
    assert "within 1 s" in line, line
    run = run_probe(probe, "127.0.0.1:5555", fidelity_structures()[:1], mode="single",
                    workdir=workdir, timeout_s=1.0, wait_s=60)
    assert "did you mean tcp://127.0.0.1:5555" in run.line("connect"), run.lines


def check_curve(probe: Path, curve_server, workdir: Path) -> None:
    srv, keys, other = curve_server
    structures = fidelity_structures()[:2]
    want = python_results(srv.address, structures, key_dir=keys)
    run = run_probe(probe, srv.address, structures, mode="single", workdir=workdir,
                    key_dir=keys)
    assert run.results is not None, run.lines
    assert_bitwise(run.results, want)
    run = run_probe(probe, srv.address, structures, mode="single", workdir=workdir,
                    key_dir=other, timeout_s=2.0)
    assert run.returncode == 2, run.lines
    assert "refused our CURVE key" in run.line("connect"), run.lines
    run = run_probe(probe, srv.address, structures, mode="single", workdir=workdir,
                    key_dir=workdir / "no-such-dir", timeout_s=2.0)
    assert "cannot read CURVE certificate" in run.line("connect"), run.lines
    assert "CURVE: denied a client whose public key" in srv.log_text()


def check_heartbeat(probe: Path, workdir: Path) -> None:
    """A request longer than the heartbeat: the client resends its id, hears `pending`,
    waits, and gets the one result (computed once). A server that dies mid-request: the
    client says it is gone after one heartbeat of silence."""
    from helpers.server import Gate, plugin_env

    gate = Gate(workdir / "gate")
    env = dict(os.environ, MLIPD_HEARTBEAT_S="0.5")
    structure = fidelity_structures()[0]
    with running_server(["--model", gate.model, "--zmq", "tcp://127.0.0.1:0"],
                        log=workdir / "serve.log", env=plugin_env(workdir)) as srv, \
            Client(srv.address) as stats:
        gate.hold()
        argv = _probe_argv(probe, srv.address, [structure], workdir / "slow", timeout_s=120)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        try:
            gate.wait_started(1)
            # resent every heartbeat/4 = 0.125 s: 16 repeats span 4 heartbeats of a
            # computation that has not answered yet
            _wait_for(lambda: stats.stats()["requests"].get("repeat", 0) >= 16)
            gate.release()
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, out
        assert stats.stats()["engine_calls"] == 1  # every resend answered, none recomputed
        gate.hold()
        argv = _probe_argv(probe, srv.address, [structure], workdir / "gone", timeout_s=120)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        try:
            gate.wait_started(2)
            srv.stop(sig=signal.SIGKILL)
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            gate.release()
    assert proc.returncode == 1, out
    assert f"error -7 unavailable: {srv.address}: nothing heard for 0.5 s" in out, out


def _probe_argv(probe: Path, endpoint: str, structures, workdir: Path, *, timeout_s: float):
    from mlipd.bench.compiled import write_structures

    workdir.mkdir(parents=True, exist_ok=True)
    write_structures(workdir / "in.bin", structures)
    return [str(probe), endpoint, repr(timeout_s), "single", str(workdir / "in.bin"),
            str(workdir / "out.bin")]


def _wait_for(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.02)


# ---------------------------------------------------------------- the MD examples

MD_STEPS = 20
# Velocity Verlet's energy error for a harmonic mode is ~(omega dt)^2 / 8 of its energy:
# Si's highest optical phonon, 15.5 THz (omega = 9.7e13 /s), at dt = 1 fs gives 1.2e-3
# of ~3 kT = 0.078 eV per atom at 300 K, i.e. ~1e-4 eV per atom; CHGNet's float32
# forces add noise far below that over 20 steps. 1 meV per atom is ten times the
# integrator's own error and a hundredth of a wrong force (unit or sign) in 20 steps.
MAX_DRIFT_EV_PER_ATOM = 1e-3


def si64() -> Structure:
    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat(2)
    return Structure.from_atoms(atoms)


def check_md_example(program: Path, server) -> None:
    proc = subprocess.run([str(program), server.address, str(MD_STEPS)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln and not ln.startswith(("#", "m"))]
    assert [int(r[0]) for r in rows] == list(range(MD_STEPS + 1))
    e_pot = np.array([float(r[1]) for r in rows])
    e_tot = np.array([float(r[3]) for r in rows])
    drift = np.abs(e_tot - e_tot[0]).max() / 64
    assert drift < MAX_DRIFT_EV_PER_ATOM, proc.stdout
    # the program's own drift, printed with 4 digits, from unrounded energies; ours from
    # its rows' 8 decimals (each E_tot off by half a unit: twice that in a difference)
    printed = proc.stdout.split("per atom:")[1].split()[0]
    assert abs(float(printed) - drift) <= (tol.printed_half_unit(printed)
                                           + 2 * tol.half_unit(8) / 64), (printed, drift)
    # the first step is the perfect crystal: the Python client's energy of it, from the
    # same float32 server on coordinates built another way (each run within CHGNet's
    # float32 bound of float64: mlipd.testing.tolerances), printed with 8 decimals
    (want,) = python_results(server.address, [si64()])
    from helpers.float32_bounds import float32_bounds  # chgnet imported here only

    from mlipd.models.chgnet import CHGNetModel

    b = float32_bounds(CHGNetModel(), bulk("Si", "diamond", a=5.431, cubic=True).repeat(2))
    assert abs(e_pot[0] - want.energy) <= 2 * b.ours.energy_per_atom * 64 + tol.half_unit(8)
    assert np.ptp(e_pot) > 10 * drift  # the atoms moved: energy flowed between kinds

