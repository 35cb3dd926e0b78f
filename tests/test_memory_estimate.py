"""Issue 22, item 1: the per-request memory estimate against the measured peak of one
engine call, for each model at three small sizes (a child process per model: the peak
is its VmHWM, ``memory_probe.py``).

The margin: the estimate may not fall below measured / 1.25 - 64 MiB. The 64 MiB allow
for what a first call allocates once whatever its size (operator caches, thread
buffers: ~40 MB for MACE at 8 atoms); the estimate is for large requests, where the
per-item terms dominate. Over-estimates are allowed (they refuse early, never kill the
process); the measured ratios are in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("memory_probe.py")
MARGIN, ALLOWANCE = 1.25, 64 * 2**20

CASES = {  # model: (dtype, lattice, sizes)
    "lj": ("float64", "si", ("2x2x2", "4x4x4", "6x6x6")),
    "reference": ("float64", "si", ("2x2x2", "4x4x4", "6x6x6")),
    "chgnet": ("float32", "cu", ("1x1x1", "2x2x2", "3x3x3")),
    "mace": ("float64", "si", ("1x1x1", "2x2x2", "3x3x3")),
    "tensornet": ("float64", "si", ("1x1x1", "2x2x2", "3x3x3")),
    "sevennet": ("float32", "si", ("1x1x1", "2x2x2", "3x3x3")),
    "esen": ("float64", "si", ("1x1x1", "2x2x2", "3x3x3")),
}
E3NN = {"sevennet", "esen"}
CHEAP = {"lj", "reference"}  # seconds; the others ~2.5 min per family on 2 shared cores


def _param(name: str):
    marks = [pytest.mark.e3nn] if name in E3NN else []
    return pytest.param(name, marks=marks if name in CHEAP else [*marks, pytest.mark.slow])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", [_param(n) for n in CASES])
def test_estimate_is_not_below_the_measured_peak(name):
    dtype, lattice, sizes = CASES[name]
    out = subprocess.run([sys.executable, str(PROBE), name, dtype, lattice, *sizes],
                         capture_output=True, text=True, timeout=580,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(sizes)
    for r in rows:
        assert r["estimate"] >= r["measured"] / MARGIN - ALLOWANCE, r
