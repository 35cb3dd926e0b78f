"""A third-party model package, installed separately, is found through its entry point.

``examples/plugin`` is installed with pip into a temporary target directory (the venv
is not touched) and put on ``sys.path`` / ``PYTHONPATH``: mlipd finds it through the
``mlipd.models`` entry-point group alone, runs it at P = 1 and on 2 gloo ranks.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_cases import (
    as_structures,
    check_distributed,
    check_float32,
    four_cases,
    molecule,
)

from mlipd.engine import make_engine
from mlipd.models.registry import load_model, names
from mlipd.testing import check_zero_redundancy
from mlipd.testing.work import measure_runs
from mlipd.types import Structure

pytestmark = pytest.mark.timeout(300)

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "plugin"
SPEC = "density:cutoff=4.5"
SPECIES = (1, 6, 8, 14)
F64, F32 = torch.float64, torch.float32


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    """``pip install --target`` of a copy (an in-tree build would leave build/ behind)."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target), str(src)],
                   check=True, timeout=240)
    return target


@pytest.fixture
def on_path(plugin_dir, monkeypatch):
    # spawned ranks inherit the parent's sys.path (multiprocessing's spawn preparation)
    monkeypatch.syspath_prepend(str(plugin_dir))
    return plugin_dir


def test_not_visible_without_install():
    assert "density" not in names()


def test_cli_lists_the_plugin(plugin_dir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(plugin_dir), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "mlipd", "models"], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    assert "density" in out


def test_loads_and_computes_at_one_rank(on_path):
    model = load_model("density:cutoff=4.5")
    assert type(model).__module__ == "mlipd_example_plugin.density"
    assert model.spec.cutoff == 4.5
    engine = make_engine("density:cutoff=4.5", dtype="float64")
    atoms = molecule([1, 6, 8], n=8)
    s = Structure.from_atoms(atoms)
    (r,) = engine.compute([s])
    # forces are the engine's autograd of the plug-in's energy: check by central differences
    h = 1e-5
    for i, k in [(0, 0), (3, 1), (7, 2)]:
        e = []
        for sign in (1, -1):
            pos = s.positions.copy()
            pos[i, k] += sign * h
            e.append(engine.compute([Structure(s.numbers, pos, s.cell, s.pbc)])[0].energy)
        assert r.forces[i, k] == pytest.approx(-(e[0] - e[1]) / (2 * h), rel=1e-6, abs=1e-8)
    assert np.abs(r.forces).max() > 1e-3


@pytest.mark.parametrize("ranks", [1, 2])
def test_runs_on_ranks(on_path, ranks):
    check_distributed(SPEC, load_model(SPEC), ranks, four_cases(SPECIES))


@pytest.fixture(scope="module")
def runs(plugin_dir):
    """The plug-in found by its entry point on every rank, measured at P = 1, 2, 4, 8
    (float64) and 4 (float32) in one spawn of 8 ranks."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(plugin_dir))  # spawned ranks inherit sys.path
        factory = functools.partial(load_model, SPEC)
        cases = as_structures(four_cases(SPECIES, bulk_reps=3))
        runs = [(1, F64), (2, F64), (4, F64), (8, F64), (4, F32)]
        return factory, cases, measure_runs(factory, list(cases.values()), runs)


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_ranks_equal_p1_without_redundancy(runs, on_path, ranks):  # on_path: the bound's engine
    """Every op's work summed over ranks is P = 1's, forward and backward, besides
    autograd's sums of the gradients on halo rows (positions: 9 elements a row, the
    exchanged density: 3), and the one exchange per step moves exactly the halo."""
    factory, cases, measured = runs
    got = check_zero_redundancy(factory, cases, (ranks,), runs=measured,
                                per_halo_row={"add": 12},
                                reason="autograd's gradient sums on halo rows")
    assert all(w.atom_exchanges == 1 for m in got[(ranks, F64)] for w in m.work)


def test_float32_on_four_ranks(runs):
    """Against float64 at P = 1 within the derived float32 bounds
    (``mlipd.testing.tolerances``)."""
    factory, cases, measured = runs
    ratios = check_float32(factory, cases, 4, runs=measured)
    print("plugin float32 error / bound:", ratios)


@pytest.mark.parametrize("threads", [1, 2])
def test_float32_at_one_and_two_threads(plugin_dir, threads):
    """float32 at P = 1 and P = 2 with 1 and 2 torch threads on every rank (float32 sums
    follow the threads; CI's 2 cores give a lone rank 2 threads and each of 2 ranks 1:
    ``mlipd.engine.threads``), within the same derived bounds."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(plugin_dir))
        factory = functools.partial(load_model, SPEC)
        cases = as_structures(four_cases(SPECIES, bulk_reps=3))
        measured = measure_runs(factory, list(cases.values()), [(1, F64), (1, F32), (2, F32)],
                                threads=threads)
    for ranks in (1, 2):
        ratios = check_float32(factory, cases, ranks, runs=measured)
        print(f"plugin float32, P = {ranks}, {threads} threads: error / bound (worst)",
              {k: f"{max(r.get(k, 0.0) for r in ratios):.2g}" for k in ratios[0]})
