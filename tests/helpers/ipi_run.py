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

from mlipd.testing import tolerances as tol
from mlipd.types import Result, Structure


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


def ipi_relay(nbeads: int = 1) -> dict:
    """What i-PI does to mlipd's numbers (``mlipd.testing.tolerances.relayed``): it holds
    positions and cell in Bohr by its own constant (8 digits), which mlipd converts with
    ASE's, so the driver sees the recorded geometry scaled by their ``mismatch``; each
    coordinate is rounded by 3 float64 conversions (Å to Bohr, Bohr to Å on each side)
    and by the 8 decimals of i-PI's extended xyz; forces go to Hartree/Bohr by ASE's
    constant and back by i-PI's (mismatch + 2 roundings), then to 8 decimals; the
    potential goes to Hartree by ASE's constant and back by i-PI's, a known factor
    (``energy_factor``, i-PI's Hartree over ASE's: 1 + 9.6e-8) that the tests divide
    out (one rounding), plus 2 roundings, is averaged over the beads (one rounding a
    bead, one for the mean here) and printed to 16 digits (1)."""
    from ase import units as ase_units
    from ipi.utils import units as ipi_units

    def mismatch(kind: str, user: str, ase_value: float) -> float:
        return tol.mismatch(1.0 / ipi_units.unit_to_internal(kind, user, 1.0), ase_value)

    return {"scaling": mismatch("length", "angstrom", ase_units.Bohr),
            "text_decimals": 8,
            "forces_relative": mismatch("force", "ev/ang", ase_units.Ha / ase_units.Bohr)
            + tol.roundings(2),
            "energy_factor": (1.0 / ipi_units.unit_to_internal("energy", "electronvolt", 1.0)
                              / ase_units.Ha),
            "energy_relative": tol.roundings(5 + nbeads)}


def ipi_bounds(ref: Result, s: Structure, result_at, *, cutoff: float, layers: int,
               relay: dict) -> tuple[tol.Bounds, tol.Bounds]:
    """(forces' bound, potential's bound) of what i-PI recorded for a float64 result at
    ``s`` against a direct float64 evaluation there: two computations of one model
    (``tol.float64``) and ``ipi_relay``'s ``relay`` (``tol.relayed``)."""
    reach = max(float(np.abs(s.positions).max()), float(np.abs(s.cell).max()))
    both = tol.float64(ref, s, cutoff, layers=layers) + tol.relayed(
        ref, s, result_at, scaling=relay["scaling"],
        rounding=tol.roundings(3) * reach + tol.half_unit(relay["text_decimals"]),
        forces_decimals=relay["text_decimals"])
    return (both + tol.proportional(ref, s, relay["forces_relative"]),
            both + tol.proportional(ref, s, relay["energy_relative"]))


def check_trajectory(run: Run, atoms, compute, *, cutoff: float, layers: int,
                     nbeads: int = 1, steps: int = 20, every: int = 5,
                     min_motion: float = 1e-3) -> None:
    """Every ``every``-th recorded step: i-PI's forces of every bead and its potential
    (the bead average) equal ``compute(structures)`` (anything with ``.energy`` and
    ``.forces`` per structure, float64) at the positions i-PI recorded; and the atoms
    moved.

    Bounds (``mlipd.testing.tolerances``): ``compute`` and the driver are two float64
    computations of one model (``tol.float64``, of ``cutoff`` and ``layers``), the
    driver's relayed through i-PI (``ipi_relay``, ``tol.relayed``).
    """
    relay = ipi_relay(nbeads)
    props = run.properties()
    assert props.shape[0] == steps + 1
    positions = [run.frames("pos", b) for b in range(nbeads)]
    forces = [run.frames("for", b) for b in range(nbeads)]
    cell = atoms.cell.array

    def as_result(r) -> Result:
        return Result(energy=float(r.energy), forces=np.asarray(r.forces, dtype=float))

    def result_at(pos, c) -> Result:
        return as_result(compute([Structure(numbers=atoms.numbers, positions=pos, cell=c,
                                            pbc=True)])[0])

    worst: dict[str, float] = {}
    for step in range(0, steps + 1, every):
        structures = [Structure(numbers=atoms.numbers, positions=positions[b][step],
                                cell=cell, pbc=True) for b in range(nbeads)]
        results = [as_result(r) for r in compute(structures)]
        energy_bound = 0.0
        for b, (s, r) in enumerate(zip(structures, results, strict=True)):
            forces_b, energy_b = ipi_bounds(r, s, result_at, cutoff=cutoff, layers=layers,
                                            relay=relay)
            got = Result(energy=r.energy, forces=forces[b][step])
            ratio = tol.ratios(got, r, s, forces_b)["forces"]
            assert ratio <= 1.0, (step, b, ratio, forces_b)
            worst["forces"] = max(worst.get("forces", 0.0), ratio)
            energy_bound = max(energy_bound, energy_b.energy_per_atom * s.n_atoms)
        error = abs(props[step, 4] / relay["energy_factor"]
                    - np.mean([r.energy for r in results]))
        assert error <= energy_bound, (step, error, energy_bound)
        worst["energy"] = max(worst.get("energy", 0.0), error / energy_bound)
    print("i-PI trajectory: error / bound (worst)", {k: f"{v:.2g}" for k, v in worst.items()})
    if min_motion:
        moved = max(float(np.abs(positions[0][steps] - positions[0][0]).max()), 0.0)
        assert moved > min_motion  # the atoms moved: forces came from the model each step
