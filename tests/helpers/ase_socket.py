"""ASE's real SocketIOCalculator as the server, ``mlipd drive`` as its client."""

from __future__ import annotations

import subprocess
import uuid

from ase.calculators.socketio import SocketIOCalculator
from conftest import MLIPD, Processes


def evaluate_through_ase_socket(processes: Processes, atoms, workdir, model_args: list[str],
                                *, timeout: float = 60):
    """(energy, forces, stress) of ``atoms`` from ASE's socket calculator served by
    ``mlipd drive --model ...`` over a unix socket; the driver must exit cleanly."""
    path = workdir / "structure.xyz"
    atoms.write(path, format="extxyz")
    name = f"mlipd-{uuid.uuid4().hex[:8]}"
    with SocketIOCalculator(unixsocket=name, timeout=timeout) as calc:
        driver = processes.start([*MLIPD, "drive", "--address", f"unix:{name}", "--structure",
                                  path, "--model", *model_args],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        got = atoms.copy()
        got.calc = calc
        result = got.get_potential_energy(), got.get_forces(), got.get_stress()
    out, _ = driver.communicate(timeout=60)
    assert driver.returncode == 0, out
    return result
