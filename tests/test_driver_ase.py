"""ASE's real SocketIOCalculator is the server, ``mlipd drive`` its client.

Both sides use ASE's constants, so results match a direct evaluation to the rounding of
the conversions (``mlipd.testing.tolerances``, "Relayed").
A triclinic, strained cell makes any transposition of cell or virial visible.
"""

from __future__ import annotations

import subprocess
import uuid

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.socketio import SocketIOCalculator
from ase.stress import voigt_6_to_full_3x3_stress
from conftest import MLIPD, free_tcp_port
from helpers.ase_socket import evaluate_through_ase_socket
from helpers.float32_bounds import float32_bounds

from mlipd.engine import make_engine
from mlipd.models.chgnet import CHGNetModel
from mlipd.testing import tolerances as tol
from mlipd.types import Result, Structure

pytestmark = pytest.mark.timeout(120)

LJ = "lj:epsilon=0.0104,sigma=3.4,cutoff=6.0"


def triclinic_argon():
    atoms = bulk("Ar", "fcc", a=5.3).repeat((2, 3, 2))  # primitive fcc: a triclinic cell
    strain = np.array([[1.02, 0.03, -0.01], [0.0, 0.98, 0.02], [0.01, 0.0, 1.01]])
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.rattle(0.05, seed=3)
    return atoms


def start_driver(processes, address, *extra, model=LJ):
    return processes.start([*MLIPD, "drive", "--address", address, "--species", "Ar",
                            "--model", model, "--dtype", "float64", *extra],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def drive_steps(calc, atoms, n=3):
    """Energy, forces and stress for ``n`` displaced copies through the socket."""
    out = []
    rng = np.random.default_rng(0)
    for _ in range(n):
        atoms.positions += rng.normal(scale=0.02, size=atoms.positions.shape)
        atoms.calc = calc
        out.append((atoms.positions.copy(), atoms.get_potential_energy(), atoms.get_forces(),
                    atoms.get_stress()))
    return out


def check_lj(steps, atoms):
    """Each step equals a direct float64 evaluation within ``tol.float64`` (the driver
    may sum in another order: its own threads) plus the relay through ASE's socket
    (``tol.relayed``): positions and cell divided by ASE's Bohr and multiplied back (2
    roundings each), energy, forces and virial each converted there and back by a
    constant itself rounded, stress divided by the volume on each side (4 roundings; 2
    more for the stress through the virial here)."""
    engine = make_engine(LJ, dtype="float64")
    cutoff = engine.model.spec.cutoff

    def result_at(positions, cell):
        return engine.compute([Structure(numbers=atoms.numbers, positions=positions,
                                         cell=cell, pbc=True)])[0]

    for positions, energy, forces, stress in steps:
        s = Structure(numbers=atoms.numbers, positions=positions, cell=atoms.cell.array,
                      pbc=True)
        (ref,) = engine.compute([s])
        reach = max(float(np.abs(positions).max()), float(np.abs(s.cell).max()))
        bound = tol.float64(ref, s, cutoff) + tol.relayed(
            ref, s, result_at, rounding=tol.roundings(2) * reach, relative=tol.roundings(6))
        got = Result(energy=energy, forces=forces,
                     virial=-voigt_6_to_full_3x3_stress(stress) * abs(np.linalg.det(s.cell)))
        ratios = tol.assert_within(got, ref, s, bound, "through ASE's socket")
        print("ASE socket, LJ float64: error / bound", {k: f"{v:.2g}" for k, v in
                                                          ratios.items()})
        assert np.abs(stress[3:]).max() > 1e-6  # shear terms are non-zero: a real check


def test_ase_unix_socket(processes):
    atoms = triclinic_argon()
    name = f"mlipd-{uuid.uuid4().hex[:8]}"
    with SocketIOCalculator(unixsocket=name, timeout=60) as calc:
        driver = start_driver(processes, f"unix:{name}")
        steps = drive_steps(calc, atoms)
    out, _ = driver.communicate(timeout=60)
    assert driver.returncode == 0, out  # ASE closes without EXIT: a clean end
    assert "server closed the connection after 3 force requests" in out
    check_lj(steps, atoms)


def test_ase_tcp(processes):
    atoms = triclinic_argon()
    for _ in range(3):
        port = free_tcp_port()
        try:
            calc = SocketIOCalculator(port=port, timeout=60)
            break
        except OSError:  # collided with another test's port: pick another
            continue
    with calc:
        driver = start_driver(processes, f"127.0.0.1:{port}")
        steps = drive_steps(calc, atoms)
    out, _ = driver.communicate(timeout=60)
    assert driver.returncode == 0, out
    check_lj(steps, atoms)


def test_ase_chgnet_matches_chgnet_calculator(processes, short_tmp):
    """CHGNet float32 through the socket vs the chgnet package's float32 calculator."""
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    atoms = bulk("Si", "diamond", a=5.43) * (2, 2, 1)
    atoms.set_cell(atoms.cell.array @ np.diag([1.01, 0.99, 1.0]), scale_atoms=True)
    atoms.rattle(0.05, seed=4)
    energy, forces, stress = evaluate_through_ase_socket(
        processes, atoms, short_tmp, ["chgnet", "--dtype", "float32"], timeout=120)
    ref = atoms.copy()
    ref.calc = CHGNetCalculator(model=CHGNet.load(verbose=False), use_device="cpu")
    package = Result(energy=ref.get_potential_energy(), forces=ref.get_forces(),
                     virial=-voigt_6_to_full_3x3_stress(ref.get_stress()) * ref.get_volume())
    # float32 on both sides (tests/test_chgnet.py's bounds) and ASE's socket's float64
    # conversions (as check_lj: 2 roundings of the geometry, 4 of each output, 2 more of
    # the stress through the virial here)
    b = float32_bounds(CHGNetModel(), atoms)
    reach = max(float(np.abs(atoms.positions).max()), float(np.abs(atoms.cell.array).max()))
    relay = tol.relayed(b.exact, b.structure, b.result_at, rounding=tol.roundings(2) * reach,
                        relative=tol.roundings(6))
    got = Result(energy=energy, forces=forces,
                 virial=-voigt_6_to_full_3x3_stress(stress) * atoms.get_volume())
    ratios = tol.assert_within(got, package, b.structure, b.ours + b.package + relay,
                               "through ASE's socket vs CHGNet's calculator")
    print("ASE socket, CHGNet float32 vs the package: error / bound",
          {k: f"{v:.2g}" for k, v in ratios.items()})
