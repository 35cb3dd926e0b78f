"""Run the real i-PI program against ``mlipd drive`` and read what it wrote."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
from conftest import MLIPD, Processes, free_tcp_port


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
