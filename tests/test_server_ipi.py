"""`mlipd serve --ipi` against the real i-PI: PIMD beads end in one engine call per step.

Two ways i-PI hands out 8 beads: 8 client connections (one bead each), or one
connection in batched mode (``batch_size`` 8). Both must reach the engine as one
batched call per MD step (checked from the server's own counters via ``stats``),
and i-PI's recorded forces must equal a direct, unbatched evaluation.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import replace

import ase.io
import pytest
from helpers import systems
from helpers.ipi_run import ipi_bounds, ipi_relay, ipi_xml, unix_socket_xml

from mlipd.client import Client
from mlipd.engine import make_engine
from mlipd.server.testing import running_server
from mlipd.testing import tolerances as tol
from mlipd.types import Result, Structure

pytestmark = pytest.mark.timeout(240)

NBEADS = 8
STEPS = 5


def write_argon(workdir) -> ase.Atoms:
    return systems.write_argon(workdir, seed=3)


def start_ipi(processes, workdir, *, name: str, batch_size: int, mode: str = "unix"):
    """Start i-PI and wait until its socket file exists (so all clients join at once)."""
    prefix = f"{workdir}/ipi_"
    (workdir / "input.xml").write_text(ipi_xml(
        init_file="init.xyz", socket_xml=unix_socket_xml(name, batch_size=batch_size,
                                                         mode=mode),
        sockets_prefix=prefix, nbeads=NBEADS, steps=STEPS))
    log = (workdir / "ipi.log").open("w")
    proc = processes.start(["i-pi", "input.xml"], cwd=workdir, stdout=log,
                           stderr=subprocess.STDOUT)
    path = f"{prefix}{name}"
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            log.close()
            pytest.fail("i-PI did not open its socket:\n" + (workdir / "ipi.log").read_text())
        time.sleep(0.05)
    return proc, log, f"unix:{path}"


def check_forces_against_direct(workdir, atoms) -> None:
    """Every bead's forces at every step equal an unbatched evaluation, within i-PI's
    relay of them (its constants, its 8 printed decimals: ``helpers.ipi_run.ipi_bounds``)."""
    engine = make_engine("lj", dtype="float64")
    spec, relay = engine.model.spec, ipi_relay(NBEADS)

    def result_at(positions, cell):
        return engine.compute([Structure(atoms.numbers, positions, cell, True)])[0]

    for b in range(NBEADS):
        pos = ase.io.read(workdir / f"sim.pos_{b}.extxyz", index=":")
        frc = ase.io.read(workdir / f"sim.for_{b}.extxyz", index=":")
        assert len(pos) == STEPS + 1
        for p, f in zip(pos, frc, strict=True):
            s = Structure(numbers=atoms.numbers, positions=p.positions, cell=atoms.cell.array,
                          pbc=True)
            (ref,) = engine.compute([s])
            bound, _ = ipi_bounds(ref, s, result_at, cutoff=spec.cutoff,
                                  layers=spec.n_layers, relay=relay)
            got = Result(energy=ref.energy, forces=f.get_forces())
            tol.assert_within(got, replace(ref, virial=None), s, bound, f"bead {b}")


def one_call_per_step(stats, *, runs: int = 1, batched: bool = False) -> None:
    evaluations = runs * (STEPS + 1)  # the initial forces, then one per step
    if batched:
        assert stats["engine_calls"] == evaluations, stats
        # all beads start at the same positions, and the driver evaluates a batch's
        # repeated structure once: the first call of each run has 1 structure
        assert stats["batch_structures"] == {"1": runs, str(NBEADS): runs * STEPS}, stats
    else:
        # every step's 8 beads share one call: the scheduler waits for every connected
        # link (an event; the --max-wait-ms bound never fires). Only the initial forces
        # may be split, by links that connected after i-PI handed out the first beads.
        sizes = {int(k): v for k, v in stats["batch_structures"].items()}
        assert sum(k * v for k, v in sizes.items()) == NBEADS * evaluations, stats
        assert sizes.get(NBEADS, 0) >= evaluations - runs, stats


def test_pimd_8_beads_over_8_connections(processes, short_tmp):
    atoms = write_argon(short_tmp)
    ipi, ipi_log, address = start_ipi(processes, short_tmp, name="beads", batch_size=1)
    # batches go as soon as all 8 beads are in; the bound is only a fallback
    args = ["--model", "lj", "--dtype", "float64", "--zmq", "tcp://127.0.0.1:0", "--species", "Ar",
            "--max-wait-ms", "60000"]
    for _ in range(NBEADS):
        args += ["--ipi", address]
    try:
        with running_server(args, log=short_tmp / "serve.log",
                            env=dict(os.environ, OMP_NUM_THREADS="1")) as srv:
            assert ipi.wait(timeout=180) == 0, (short_tmp / "ipi.log").read_text()
            with Client(srv.address) as c:
                stats = c.stats()
            one_call_per_step(stats)
            assert stats["requests"]["ipi"] == NBEADS * (STEPS + 1)
            assert srv.stop() == 0
    finally:
        ipi_log.close()
    check_forces_against_direct(short_tmp, atoms)


def test_pimd_batched_connection_and_ipi_restart(processes, short_tmp):
    atoms = write_argon(short_tmp)
    ipi, ipi_log, address = start_ipi(processes, short_tmp, name="batch", batch_size=NBEADS)
    args = ["--model", "lj", "--dtype", "float64", "--zmq", "tcp://127.0.0.1:0", "--species", "Ar",
            "--ipi", address]
    try:
        with running_server(args, log=short_tmp / "serve.log",
                            env=dict(os.environ, OMP_NUM_THREADS="1")) as srv:
            assert ipi.wait(timeout=180) == 0, (short_tmp / "ipi.log").read_text()
            ipi_log.close()
            with Client(srv.address) as c:
                one_call_per_step(c.stats(), batched=True)
            check_forces_against_direct(short_tmp, atoms)
            # i-PI restarts on the same address: the link reconnects by itself
            for f in short_tmp.glob("sim.*"):
                f.unlink()
            ipi, ipi_log, _ = start_ipi(processes, short_tmp, name="batch", batch_size=NBEADS)
            assert ipi.wait(timeout=180) == 0, (short_tmp / "ipi.log").read_text()
            with Client(srv.address) as c:
                stats = c.stats()
            one_call_per_step(stats, runs=2, batched=True)
            assert stats["requests"]["ipi"] == 2 * (STEPS + 1)
            assert srv.stop() == 0
    finally:
        ipi_log.close()
    check_forces_against_direct(short_tmp, atoms)


def test_shm_link_and_ipi_restart(processes, short_tmp):
    """``--ipi shm:PATH``: i-PI's shared-memory mode on a link that reconnects when i-PI
    restarts; every force right, and the log counts force requests (8 beads x 6 force
    evaluations = 48 per run), not "steps"."""
    atoms = write_argon(short_tmp)
    ipi, ipi_log, address = start_ipi(processes, short_tmp, name="shm", batch_size=1,
                                      mode="shm")
    shm_address = "shm:" + address.removeprefix("unix:")
    args = ["--model", "lj", "--dtype", "float64", "--zmq", "tcp://127.0.0.1:0", "--species",
            "Ar", "--ipi", shm_address]
    try:
        with running_server(args, log=short_tmp / "serve.log",
                            env=dict(os.environ, OMP_NUM_THREADS="1")) as srv:
            for run in (1, 2):
                if run == 2:  # i-PI restarts on the same address: the link reconnects
                    for f in short_tmp.glob("sim.*"):
                        f.unlink()
                    ipi, ipi_log, _ = start_ipi(processes, short_tmp, name="shm",
                                                batch_size=1, mode="shm")
                assert ipi.wait(timeout=180) == 0, (short_tmp / "ipi.log").read_text()
                ipi_log.close()
                check_forces_against_direct(short_tmp, atoms)
            with Client(srv.address) as c:
                stats = c.stats()
            assert stats["requests"]["ipi"] == 2 * NBEADS * (STEPS + 1)
            assert srv.stop() == 0
            text = srv.log_text()
    finally:
        ipi_log.close()
    assert text.count(f"EXIT after {NBEADS * (STEPS + 1)} force requests") == 2, text
    assert " steps" not in text, text
