"""ASE's real SocketIOCalculator is the server, ``mlipd drive`` its client.

Both sides use ASE's constants, so results match a direct evaluation to round-off.
A triclinic, strained cell makes any transposition of cell or virial visible.
"""

from __future__ import annotations

import subprocess
import uuid

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.socketio import SocketIOCalculator
from ase.stress import full_3x3_to_voigt_6_stress
from conftest import MLIPD, free_tcp_port
from helpers.ase_socket import evaluate_through_ase_socket

from mlipd.engine import make_engine
from mlipd.types import Structure

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
    engine = make_engine(LJ, dtype="float64")
    for positions, energy, forces, stress in steps:
        (ref,) = engine.compute([Structure(numbers=atoms.numbers, positions=positions,
                                           cell=atoms.cell.array, pbc=True)])
        np.testing.assert_allclose(energy, ref.energy, rtol=1e-12)
        np.testing.assert_allclose(forces, ref.forces, rtol=1e-10, atol=1e-14)
        voigt = full_3x3_to_voigt_6_stress(ref.stress(atoms.cell.array))
        np.testing.assert_allclose(stress, voigt, rtol=1e-10, atol=1e-14)
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
    # float32 on both sides: the 1e-6 eV/atom and 1e-4 eV/Å
    assert abs(energy - ref.get_potential_energy()) / len(atoms) < 1e-6
    np.testing.assert_allclose(forces, ref.get_forces(), atol=1e-4)
    np.testing.assert_allclose(stress, ref.get_stress(), atol=2e-5)
