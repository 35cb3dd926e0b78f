"""A third-party model package, installed separately, is found through its entry point.

``examples/plugin`` is installed with pip into a temporary target directory (the venv
is not touched) and put on ``sys.path`` / ``PYTHONPATH``: mlipd finds it through the
``mlipd.models`` entry-point group alone, runs it at P = 1 and on 2 gloo ranks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from model_cases import check_distributed, four_cases, molecule

from mlipd.engine import make_engine
from mlipd.models.registry import load_model, names
from mlipd.types import Structure

pytestmark = pytest.mark.timeout(300)

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "plugin"


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
    check_distributed("density:cutoff=4.5", load_model("density:cutoff=4.5"), ranks,
                      four_cases([1, 6, 8, 14]))
