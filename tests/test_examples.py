"""Every example runs at a tiny size, as a user runs it (a fresh process, the default
model), prints its summary and writes its PNG."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ase.io
import pytest
from helpers.float32_bounds import float32_bounds

from mlipd.models.chgnet import CHGNetModel
from mlipd.testing import tolerances as tol

pytestmark = pytest.mark.timeout(300)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# example, tiny arguments, its plot, lines its summary must contain
CASES = {
    "pimd": ("run_pimd.py", ["--steps", "2", "--beads", "2"], "pimd_si.png",
             ["steps:                 2", "mean potential energy:",
              "i-PI batch_size:       2"]),
    "ase": ("ase_relax_md.py", ["--repeat", "1", "--relax-steps", "4", "--md-steps", "3"],
            "relax_md.png", ["model chgnet (float32), 1 rank(s), 7 Si atoms",
                             "NVT MD:      3 steps", "(3 engine calls: one per step)"]),
    "zmq": ("zmq_client.py", ["--points", "3"], "zmq_ev_curve.png",
            ["model chgnet, cutoff 6 Å, 1 rank(s) on cpu, float32",
             "3 volumes in one batch request", "an error reply, as documented: unknown_species"]),
    "lammps": ("lammps_md.py", ["--repeat", "1", "--steps", "3"], "lammps_npt.png",
               ["LAMMPS NPT: 3 steps of 1 fs, Si8", "mlipd calls: 4 (one per step",
                "volume:"]),
    "multirank": ("multirank_large.py", ["--repeat", "2", "--steps", "2"], "multirank.png",
                  ["64 atoms, 2 ranks on cpu", "rank 1: 32 atoms owned", "2 MD steps:",
                   "one rank, same structure:"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_example_runs_and_plots(case, processes, tmp_path):
    script, args, png, lines = CASES[case]
    proc = processes.start([sys.executable, EXAMPLES / script, *args, "--out", tmp_path],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=280)
    assert proc.returncode == 0, out
    for line in lines:
        assert line in out, out
    image = tmp_path / png
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.stat().st_size > 10_000  # axes, lines and labels, not an empty canvas
    if case == "multirank":
        check_one_rank_agreement(out, tmp_path / "multirank_last.traj")


def check_one_rank_agreement(out: str, last) -> None:
    """The multi-rank example's own check, read back: float32 at 2 ranks equals float32
    at one rank within both sides' float32-arithmetic bounds (``mlipd.testing.
    tolerances``, at the structure it checked, which it writes) as far as its printed
    digits tell (``printed_at_most``: the printed value less half a unit of its last
    digit)."""
    (line,) = [s for s in out.splitlines() if s.startswith("one rank, same structure:")]
    de = line.split("|dE| ")[1].split()[0]
    df = line.split("max |dF| ")[1].split()[0]
    b = float32_bounds(CHGNetModel(), ase.io.read(last))
    both = b.ours + b.ours
    assert tol.printed_at_most(de, both.energy_per_atom), (line, both)
    assert tol.printed_at_most(df, both.forces), (line, both)
    print(f"multirank example: |dE| {de} of {both.energy_per_atom:.1e} eV/atom, "
          f"max |dF| {df} of {both.forces:.1e} eV/Å")
