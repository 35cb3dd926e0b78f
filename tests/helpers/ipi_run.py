"""Run the real i-PI program against ``mlipd drive``, read what it wrote, and check its
trajectory against a direct evaluation."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
from conftest import MLIPD, Processes, free_tcp_port

from mlipd.types import Structure


def ipi_xml(*, init_file: str, socket_xml: str, nbeads: int = 1, steps: int = 20,
            temperature_k: float = 50.0, timestep_fs: float = 2.0, seed: int = 12345,
            sockets_prefix: str = "/tmp/ipi_") -> str:
    """An NVT (PI)MD input: properties every step (full precision), positions and
    forces per bead in Å and eV/Å (extended xyz, 8 decimals)."""
    return f"""<simulation verbosity="low" floatformat="%.16e" sockets_prefix="{sockets_prefix}">
  <output prefix="sim">
    <properties stride="1" filename="out">[step, time{{picosecond}}, conserved{{electronvolt}},
      temperature{{kelvin}}, potential{{electronvolt}}]</properties>
    <trajectory filename="pos" stride="1" format="ase" cell_units="ase"
      >positions{{ase}}</trajectory>
    <trajectory filename="for" stride="1" format="ase">forces{{ase}}</trajectory>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>{seed}</seed></prng>
  {socket_xml}
  <system>
    <initialize nbeads="{nbeads}">
      <file mode="ase" units="angstrom">{init_file}</file>
      <velocities mode="thermal" units="kelvin">{temperature_k}</velocities>
    </initialize>
    <forces><force forcefield="mlipd"/></forces>
    <motion mode="dynamics">
      <dynamics mode="nvt">
        <timestep units="femtosecond">{timestep_fs}</timestep>
        <thermostat mode="pile_l"><tau units="femtosecond">100</tau></thermostat>
      </dynamics>
    </motion>
    <ensemble><temperature units="kelvin">{temperature_k}</temperature></ensemble>
  </system>
</simulation>
"""


def unix_socket_xml(name: str, *, batch_size: int = 1, mode: str = "unix") -> str:
    return (f'<ffsocket name="mlipd" mode="{mode}"><address>{name}</address>'
            f"<batch_size>{batch_size}</batch_size></ffsocket>")


def inet_socket_xml(port: int, *, batch_size: int = 1) -> str:
    return (f'<ffsocket name="mlipd" mode="inet"><address>127.0.0.1</address>'
            f"<port>{port}</port><batch_size>{batch_size}</batch_size></ffsocket>")


@dataclass
class Run:
    workdir: Path
    ipi_rc: int
    driver_rc: int
    driver_log: str
    ipi_log: str
    wall_s: float

    def properties(self) -> np.ndarray:
        """(steps+1, 5): step, time ps, conserved eV, temperature K, potential eV."""
        return np.loadtxt(self.workdir / "sim.out", ndmin=2)

    def frames(self, what: str, bead: int) -> list[np.ndarray]:
        """Per step (N, 3) arrays of ``pos`` (Å) or ``for`` (eV/Å) of one bead."""
        frames = ase.io.read(self.workdir / f"sim.{what}_{bead}.extxyz", index=":")
        return [f.positions if what == "pos" else f.get_forces() for f in frames]


def run_ipi_and_driver(processes: Processes, workdir: Path, *, xml_for, driver_args: list,
                       timeout: float = 120.0, retries: int = 3) -> Run:
    """Start i-PI on ``xml_for(port)`` and ``mlipd drive driver_args`` (which may contain
    the placeholder ``{port}``), wait for both. Retries on a TCP port collision."""
    for _ in range(retries):
        port = free_tcp_port()
        (workdir / "input.xml").write_text(xml_for(port))
        t0 = time.perf_counter()
        ipi_log = (workdir / "ipi.log").open("w")
        ipi = processes.start(["i-pi", "input.xml"], cwd=workdir, stdout=ipi_log,
                              stderr=subprocess.STDOUT)
        args = [str(a).format(port=port) for a in driver_args]
        driver = processes.start([*MLIPD, "drive", *args], cwd=workdir,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = driver.communicate(timeout=timeout)
            ipi_rc = ipi.wait(timeout=30)
        finally:
            ipi_log.close()
        log = (workdir / "ipi.log").read_text()
        if "Address already in use" in log:
            continue
        return Run(workdir, ipi_rc, driver.returncode, out, log, time.perf_counter() - t0)
    raise RuntimeError(f"no free TCP port for i-PI after {retries} tries")


def drive_real_ipi(processes: Processes, workdir: Path, atoms, *, model: str,
                   name: str = "md", steps: int = 20, temperature_k: float = 100.0,
                   timestep_fs: float = 0.5, dtype: str = "float64",
                   timeout: float = 170.0) -> Run:
    """i-PI NVT MD of ``atoms`` (one bead, a UNIX socket) forced by ``mlipd drive --model
    model``; both must exit cleanly."""
    atoms.write(workdir / "init.xyz", format="extxyz")
    prefix = f"{workdir}/ipi_"
    run = run_ipi_and_driver(
        processes, workdir,
        xml_for=lambda _port: ipi_xml(init_file="init.xyz", socket_xml=unix_socket_xml(name),
                                      sockets_prefix=prefix, steps=steps,
                                      temperature_k=temperature_k, timestep_fs=timestep_fs),
        driver_args=["--address", f"unix:{name}", "--sockets-prefix", prefix, "--structure",
                     "init.xyz", "--model", model, "--dtype", dtype],
        timeout=timeout)
    assert run.driver_rc == 0, run.driver_log
    assert run.ipi_rc == 0, run.ipi_log
    return run


def check_trajectory(run: Run, atoms, compute, *, nbeads: int = 1, steps: int = 20,
                     every: int = 5, force_atol: float = 2e-8, min_motion: float = 1e-3) -> None:
    """Every ``every``-th recorded step: i-PI's forces of every bead and its potential
    (the bead average) equal ``compute(structures)`` (anything with ``.energy`` and
    ``.forces`` per structure) at the positions i-PI recorded; and the atoms moved.

    Tolerances: i-PI's constants differ from ASE's (used by mlipd) by ~1e-7 relative and
    its files keep 8 decimals, hence rtol 1e-6 and ``force_atol`` (2e-8 eV/Å for soft
    systems; stiff ones move their forces by more when positions are rounded by 5e-9 Å).
    """
    props = run.properties()
    assert props.shape[0] == steps + 1
    positions = [run.frames("pos", b) for b in range(nbeads)]
    forces = [run.frames("for", b) for b in range(nbeads)]
    for step in range(0, steps + 1, every):
        structures = [Structure(numbers=atoms.numbers, positions=positions[b][step],
                                cell=atoms.cell.array, pbc=True) for b in range(nbeads)]
        results = compute(structures)
        for b, r in enumerate(results):
            np.testing.assert_allclose(forces[b][step], r.forces, rtol=1e-6, atol=force_atol)
        np.testing.assert_allclose(props[step, 4], np.mean([r.energy for r in results]),
                                   rtol=1e-6)
    if min_motion:
        moved = max(float(np.abs(positions[0][steps] - positions[0][0]).max()), 0.0)
        assert moved > min_motion  # the atoms moved: forces came from the model each step
