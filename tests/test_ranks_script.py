"""Issue 25 item 1: ``MlipdCalculator(model=..., ranks=2)`` in a plain script, without
``if __name__ == "__main__":``, works (rank processes are mlipd's own program and never
import the script) and equals one rank; a model factory the ranks cannot import is
refused at once, in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from ase.build import bulk

from mlipd.errors import SetupError
from mlipd.models.registry import load_model
from mlipd.testing import tolerances as tol
from mlipd.types import Result, Structure

SCRIPT = textwrap.dedent("""
    import json
    from ase.build import bulk
    from mlipd.calculator import MlipdCalculator

    print("script body runs", flush=True)  # once: a rank re-running it would print again
    atoms = bulk("Cu", cubic=True).repeat(2)
    atoms.rattle(0.05, seed=1)
    out = {}
    for ranks in (2, 1):
        with MlipdCalculator(model="reference", ranks=ranks, dtype="float64") as calc:
            atoms.calc = calc
            out[ranks] = [atoms.get_potential_energy(), atoms.get_forces().tolist()]
    print("RESULT " + json.dumps(out), flush=True)
""")


@pytest.mark.timeout(300)
def test_a_script_without_the_main_guard_runs_two_ranks(tmp_path):
    script = tmp_path / "relax.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("script body runs") == 1
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    out = json.loads(line.removeprefix("RESULT "))
    (e2, f2), (e1, f1) = out["2"], out["1"]
    # two float64 computations, a rank's halo images built by other operations
    # (``tol.measured_float64``); the script's structure rebuilt here
    atoms = bulk("Cu", cubic=True).repeat(2)
    atoms.rattle(0.05, seed=1)
    s = Structure.from_atoms(atoms)
    one = Result(energy=e1, forces=np.array(f1))
    bound = tol.measured_float64(tol.float64_engine(lambda: load_model("reference")), s, one)
    tol.assert_within(Result(energy=e2, forces=np.array(f2)), one, s, bound, "2 ranks")
    assert "Traceback" not in proc.stderr


def _factory_in_main():
    from mlipd.models.reference import ReferenceMP

    return ReferenceMP()


def test_a_factory_defined_in_the_script_is_refused_at_once():
    from mlipd.engine.distributed import DistributedEngine

    _factory_in_main.__module__ = "__main__"  # as if defined in the script being run
    with pytest.raises(SetupError, match="__main__") as info:
        DistributedEngine(_factory_in_main, ranks=2)
    assert "\n" not in str(info.value)
