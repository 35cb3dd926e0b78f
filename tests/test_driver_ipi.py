"""The real i-PI program drives ``mlipd drive``: NVT MD, 4-bead PIMD, UNIX and TCP
sockets, i-PI's batched mode, several connections, and CHGNet.

Tolerances (``mlipd.testing.tolerances``, derived): i-PI converts what it writes with
its own constants, which differ from ASE's (used by mlipd) by 1.4e-8 (Bohr) to 9.6e-8
(Hartree) relative, and writes trajectories with 8 decimals (``ipi_relay``); two runs
of one driver over i-PI are the same computation, equal to i-PI's 16 printed digits.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest
from ase.build import bulk
from conftest import MLIPD
from helpers.float32_bounds import float32_bounds
from helpers.ipi_run import (
    check_trajectory,
    inet_socket_xml,
    ipi_relay,
    ipi_xml,
    run_ipi_and_driver,
    unix_socket_xml,
)
from helpers.systems import write_argon

from mlipd.engine import make_engine
from mlipd.models.chgnet import CHGNetModel
from mlipd.testing import tolerances as tol
from mlipd.types import Result

pytestmark = pytest.mark.timeout(180)

LJ = "lj:epsilon=0.0104,sigma=3.4,cutoff=6.0"


@pytest.fixture(scope="module")
def lj_engine():
    return make_engine(LJ, dtype="float64")


def check_against_engine(run, engine, atoms, *, nbeads, steps):
    """Every 5th recorded step: i-PI's forces of every bead and its potential (bead
    average) equal a direct evaluation of the positions i-PI recorded."""
    check_trajectory(run, atoms, engine.compute, cutoff=engine.model.spec.cutoff,
                     layers=engine.model.spec.n_layers, nbeads=nbeads, steps=steps,
                     min_motion=0)


def test_nvt_unix_socket_path(processes, short_tmp, lj_engine):
    atoms = write_argon(short_tmp)
    prefix = f"{short_tmp}/ipi_"
    run = run_ipi_and_driver(
        processes, short_tmp,
        xml_for=lambda _port: ipi_xml(init_file="init.xyz", socket_xml=unix_socket_xml("nvt"),
                                      sockets_prefix=prefix, steps=20),
        driver_args=["--address", f"unix:{prefix}nvt", "--species", "Ar", "--model", LJ,
                     "--dtype", "float64"])
    assert run.driver_rc == 0, run.driver_log
    assert run.ipi_rc == 0, run.ipi_log
    assert "EXIT after 21 force requests" in run.driver_log
    check_against_engine(run, lj_engine, atoms, nbeads=1, steps=20)
    # NVE-like short run with a weak thermostat: the conserved quantity holds
    conserved = run.properties()[:, 2]
    assert np.ptp(conserved) < 1e-3 * np.abs(conserved).max()


@pytest.fixture(scope="module")
def pimd_tcp(tmp_path_factory):
    """4-bead PIMD over TCP, unbatched; shared by the batched-mode comparison."""
    from conftest import Processes

    workdir = tmp_path_factory.mktemp("pimd_tcp")
    atoms = write_argon(workdir)
    procs = Processes()
    try:
        run = run_ipi_and_driver(
            procs, workdir,
            xml_for=lambda port: ipi_xml(init_file="init.xyz", socket_xml=inet_socket_xml(port),
                                         nbeads=4, steps=20),
            driver_args=["--address", "127.0.0.1:{port}", "--structure", "init.xyz",
                         "--model", LJ, "--dtype", "float64"])
    finally:
        procs.kill_all()
    return run, atoms


def test_pimd_4_beads_tcp(pimd_tcp, lj_engine):
    run, atoms = pimd_tcp
    assert run.driver_rc == 0, run.driver_log
    assert run.ipi_rc == 0, run.ipi_log
    check_against_engine(run, lj_engine, atoms, nbeads=4, steps=20)
    beads = [run.frames("pos", b)[20] for b in range(4)]
    assert np.abs(beads[0] - beads[1]).max() > 1e-4  # the beads did spread


@pytest.fixture(scope="module")
def pimd_batched(tmp_path_factory):
    """The same PIMD in i-PI's batched mode (batch_size 4: one POSDATA carries all 4
    beads), over one UNIX socket."""
    import tempfile
    from pathlib import Path

    from conftest import Processes

    workdir = Path(tempfile.mkdtemp(prefix="mlipd-", dir="/tmp"))  # short UNIX path
    write_argon(workdir)
    procs = Processes()
    try:
        yield run_ipi_and_driver(
            procs, workdir,
            xml_for=lambda _port: ipi_xml(
                init_file="init.xyz", socket_xml=unix_socket_xml("b4", batch_size=4),
                sockets_prefix=f"{workdir}/ipi_", nbeads=4, steps=20),
            driver_args=["--address", "unix:b4", "--sockets-prefix", f"{workdir}/ipi_",
                         "--species", "Ar", "--model", LJ, "--dtype", "float64"])
    finally:
        procs.kill_all()
        shutil.rmtree(workdir, ignore_errors=True)


def test_batched_mode_same_trajectory(pimd_tcp, pimd_batched):
    """batch_size 4: one compute call per step, and the trajectory equals the unbatched
    one."""
    reference, _ = pimd_tcp
    run = pimd_batched
    assert run.driver_rc == 0, run.driver_log
    assert "batch size 4" in run.driver_log
    # 21 POSDATA of 4 structures; at step 0 the 4 beads are identical copies of
    # init.xyz and are computed once (compute_padded), so 84 - 3 evaluations
    assert "21 force requests (84 structures, 81 computed)" in run.driver_log
    same_trajectory(run, reference)


def same_trajectory(run, reference, nbeads: int = 4) -> None:
    """Bit for bit: the same float64 steps of one model on the same positions, whichever
    way i-PI sends them (one structure per call or several, sockets or shared memory),
    and the same thermostat's draws give the same trajectory, printed to the same
    digits."""
    np.testing.assert_array_equal(run.properties(), reference.properties())
    for b in range(nbeads):
        np.testing.assert_array_equal(run.frames("pos", b)[-1], reference.frames("pos", b)[-1])


def engine_calls(driver_log: str) -> tuple[int, int]:
    """(force requests, engine calls) of drive's closing "in all" line."""
    m = re.search(r"in all, .*?: (\d+) force requests, \d+ structures \(.*?\) in (\d+) "
                  r"engine calls?", driver_log)
    assert m is not None, driver_log
    return int(m.group(1)), int(m.group(2))


def test_four_connections_one_engine_call_per_step(processes, short_tmp, pimd_batched):
    """4 beads, unbatched, over 4 connections of one `mlipd drive`: the 4 force requests
    of each force evaluation become one engine call (21 for 20 steps), and the
    trajectory equals batched mode's. The wait for the other connections' beads is
    long here (--max-wait-ms 5000) so a loaded machine cannot split a step; the gate
    lets a step go as soon as all 4 have arrived."""
    write_argon(short_tmp)
    prefix = f"{short_tmp}/ipi_"
    run = run_ipi_and_driver(
        processes, short_tmp,
        xml_for=lambda _port: ipi_xml(init_file="init.xyz", socket_xml=unix_socket_xml("c4"),
                                      sockets_prefix=prefix, nbeads=4, steps=20),
        driver_args=[*[a for _ in range(4) for a in ("--address", f"unix:{prefix}c4")],
                     "--species", "Ar", "--model", LJ, "--dtype", "float64",
                     "--max-wait-ms", "5000"])
    assert run.driver_rc == 0, run.driver_log
    assert run.ipi_rc == 0, run.ipi_log
    assert run.driver_log.count(": connected") == 4, run.driver_log
    assert engine_calls(run.driver_log) == (84, 21), run.driver_log
    same_trajectory(run, pimd_batched)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_shm_mode_same_trajectory(processes, short_tmp, pimd_tcp, batch_size):
    """i-PI's shared-memory mode (positions and forces through /dev/shm)."""
    reference, _ = pimd_tcp
    write_argon(short_tmp)
    run = run_ipi_and_driver(
        processes, short_tmp,
        xml_for=lambda _port: ipi_xml(
            init_file="init.xyz",
            socket_xml=unix_socket_xml("shm", batch_size=batch_size, mode="shm"),
            sockets_prefix=f"{short_tmp}/ipi_", nbeads=4, steps=20),
        driver_args=["--address", f"unix:{short_tmp}/ipi_shm", "--mode", "shm",
                     "--species", "Ar", "--model", LJ, "--dtype", "float64"])
    assert run.driver_rc == 0, run.driver_log
    assert run.ipi_rc == 0, run.ipi_log
    assert f"batch size {batch_size}" in run.driver_log
    same_trajectory(run, reference)


def test_busy_poll_same_trajectory(processes, short_tmp, pimd_tcp):
    """``--busy-poll-us``: the link polls for each next message before blocking; only
    the waiting changes, so the trajectory is the same bits."""
    reference, _ = pimd_tcp
    write_argon(short_tmp)
    run = run_ipi_and_driver(
        processes, short_tmp,
        xml_for=lambda _port: ipi_xml(
            init_file="init.xyz", socket_xml=unix_socket_xml("busy"),
            sockets_prefix=f"{short_tmp}/ipi_", nbeads=4, steps=20),
        driver_args=["--address", f"unix:{short_tmp}/ipi_busy", "--busy-poll-us", "20000",
                     "--species", "Ar", "--model", LJ, "--dtype", "float64"])
    assert run.driver_rc == 0, run.driver_log
    assert run.ipi_rc == 0, run.ipi_log
    same_trajectory(run, reference)


def test_two_connections_share_one_engine(processes, short_tmp, lj_engine):
    """Two connections of one driver process to one i-PI: both serve beads."""
    atoms = write_argon(short_tmp)
    prefix = f"{short_tmp}/ipi_"
    run = run_ipi_and_driver(
        processes, short_tmp,
        xml_for=lambda _port: ipi_xml(init_file="init.xyz", socket_xml=unix_socket_xml("two"),
                                      sockets_prefix=prefix, nbeads=4, steps=10),
        driver_args=["--address", f"unix:{prefix}two", "--address", f"unix:{prefix}two",
                     "--species", "Ar", "--model", LJ, "--dtype", "float64"])
    assert run.driver_rc == 0, run.driver_log
    assert run.driver_log.count("connected") == 2
    # the per-connection summaries: "unix:...: 22 force requests (22 structures, ...), EXIT"
    counts = [int(n) for n in re.findall(r": (\d+) force requests \(", run.driver_log)]
    assert len(counts) == 2, run.driver_log
    assert sum(counts) == 44, run.driver_log
    assert min(counts) > 0, run.driver_log
    check_against_engine(run, lj_engine, atoms, nbeads=4, steps=10)


def test_chgnet_nvt_matches_chgnet_calculator(processes, short_tmp):
    """Acceptance: i-PI + mlipd drive (CHGNet, float32) on silicon, step 0 equals
    the chgnet package's own float32 CHGNetCalculator within float32 round-off."""
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=2)
    atoms.write(short_tmp / "si.xyz", format="extxyz")
    run = run_ipi_and_driver(
        processes, short_tmp,
        xml_for=lambda _port: ipi_xml(init_file="si.xyz", socket_xml=unix_socket_xml("si"),
                                      sockets_prefix=f"{short_tmp}/ipi_", steps=20,
                                      temperature_k=300, timestep_fs=1.0),
        driver_args=["--address", "unix:si", "--sockets-prefix", f"{short_tmp}/ipi_",
                     "--structure", "si.xyz", "--model", "chgnet", "--dtype", "float32"],
        timeout=170)
    assert run.driver_rc == 0, run.driver_log
    assert run.ipi_rc == 0, run.ipi_log
    calc = CHGNetCalculator(model=CHGNet.load(verbose=False), use_device="cpu")
    ref = atoms.copy()
    ref.calc = calc
    package = Result(energy=ref.get_potential_energy(), forces=ref.get_forces())
    # float32 on both sides (tests/test_chgnet.py's bounds), and i-PI's relay of step 0:
    # si.xyz's 8 decimals, then as ``ipi_relay`` says
    b = float32_bounds(CHGNetModel(), atoms)
    relay = ipi_relay()
    reach = max(float(np.abs(atoms.positions).max()), float(np.abs(atoms.cell.array).max()))
    both = b.ours + b.package + tol.relayed(
        b.exact, b.structure, b.result_at, scaling=relay["scaling"],
        rounding=tol.roundings(3) * reach + 2 * tol.half_unit(relay["text_decimals"]),
        forces_decimals=relay["text_decimals"])
    s = b.structure
    got = Result(energy=run.properties()[0, 4] / relay["energy_factor"],
                 forces=run.frames("for", 0)[0])
    ratios = {
        "forces": tol.assert_within(
            replace(got, energy=package.energy), package, s,
            both + tol.proportional(b.exact, s, relay["forces_relative"]), "forces")["forces"],
        "energy_per_atom": tol.assert_within(
            replace(got, forces=package.forces), package, s,
            both + tol.proportional(b.exact, s, relay["energy_relative"]),
            "energy")["energy_per_atom"]}
    print("i-PI, CHGNet float32 vs the package: error / bound",
          {k: f"{v:.2g}" for k, v in ratios.items()})


def test_shm_mode_without_mode_shm_says_so(processes, short_tmp):
    """The real i-PI in shm mode, the driver left in socket mode: the driver says what
    to do (before: "atom count 1198680438 outside ...") instead of misreading names."""
    write_argon(short_tmp)
    (short_tmp / "input.xml").write_text(ipi_xml(
        init_file="init.xyz", socket_xml=unix_socket_xml("shm", mode="shm"),
        sockets_prefix=f"{short_tmp}/ipi_", steps=5))
    ipi = processes.start(["i-pi", "input.xml"], cwd=short_tmp, stdout=subprocess.DEVNULL,
                          stderr=subprocess.STDOUT)
    driver = processes.start([*MLIPD, "drive", "--address", f"unix:{short_tmp}/ipi_shm",
                              "--species", "Ar", "--model", LJ],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = driver.communicate(timeout=120)
    assert ipi.poll() is None  # i-PI waits for a client that speaks its mode
    assert driver.returncode == 1, out
    assert "looks like i-PI's shm mode" in out, out
    assert "use --mode shm" in out, out
