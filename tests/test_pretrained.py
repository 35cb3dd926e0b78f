"""Published names through each package's own cache: mace-mp / mace-off (mace's cache and
checkpoint functions), tensornet:NAME (matgl's Hugging Face cache), and the network policy.

No file can be downloaded here, so the caches hold small random models saved under the
published names' file names; "no network" is made certain by pointing HTTPS at a closed
loopback port (urllib's proxy variables), so no test ever leaves the machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import mace  # noqa: F401  (mace before e3nn, see mlipd/models/mace.py)
import pytest
import torch
from conftest import MLIPD
from mace.calculators import MACECalculator
from mace.calculators import foundations_models as fm
from mace.tools.utils import get_cache_dir
from model_cases import bulk_box, small_triclinic

from mlipd.engine.single_rank import SingleRankEngine
from mlipd.errors import ModelUnavailable
from mlipd.models import caches
from mlipd.models.mace import MaceModel
from mlipd.models.pretrained import reachable
from mlipd.models.registry import load_model
from mlipd.testing import tolerances as tol
from mlipd.types import Structure

pytestmark = pytest.mark.timeout(300)

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """A fresh $XDG_CACHE_HOME (mace's cache is its /mace) and no route to any host."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("https_proxy", CLOSED)
    monkeypatch.setenv("http_proxy", CLOSED)
    return tmp_path / "cache"


def tiny_mace():
    from test_mace import build_mace

    return build_mace()


def medium_file() -> str:
    """MACE-MP-0 medium's file name in mace's cache, as mlipd computes it."""
    (entry,) = [f for f in caches.mace_files("mace-mp") if f.name == "medium"]
    return entry.path.name


def test_mace_cache_rule_is_maces(cache_home):
    """For every mace-mp name, mace's own download_mace_mp_checkpoint returns the file
    mlipd looks for (present, so mace does not download); same cache directory."""
    assert caches.mace_cache_dir() == get_cache_dir() == cache_home / "mace"
    files = caches.mace_files("mace-mp")
    assert {f.name for f in files} == set(fm.mace_mp_urls)
    for f in files:
        f.path.parent.mkdir(parents=True, exist_ok=True)
        f.path.touch()
        assert fm.download_mace_mp_checkpoint(f.name) == str(f.path), f.name
    assert {f.name for f in caches.mace_files("mace-off")} == set(fm.mace_off_urls)


def test_mace_off_file_is_where_mace_off_loads_it(cache_home):
    """mace_off itself loads the file mlipd names (with no route out, a different path
    would make it try to download and fail)."""
    (small,) = [f for f in caches.mace_files("mace-off") if f.name == "small"]
    small.path.parent.mkdir(parents=True)
    torch.save(tiny_mace(), small.path)
    loaded = fm.mace_off("small", device="cpu", return_raw_model=True)
    assert isinstance(loaded, torch.nn.Module)
    model = load_model("mace-off:small")
    assert isinstance(model, MaceModel)
    atoms = small_triclinic([1, 6, 8, 14])
    (got,) = SingleRankEngine(model).compute([Structure.from_atoms(atoms)])
    direct = SingleRankEngine(MaceModel(model=tiny_mace()))
    (ref,) = direct.compute([Structure.from_atoms(atoms)])
    assert got.energy == ref.energy  # the same weights, the same step: bit for bit
    # the memory options of mace: reach the model behind a name too
    lean = SingleRankEngine(load_model("mace-off:small,recompute=1,chunk=20"))
    (low,) = lean.compute([Structure.from_atoms(atoms)])
    assert lean.model.counters["recompute"] == 1
    assert lean.model.counters["chunks"] > 1
    # chunks sum the messages in another order (``tol.float64``)
    s = Structure.from_atoms(atoms)
    bound = tol.float64(ref, s, direct.model.spec.cutoff, layers=direct.model.spec.n_layers)
    assert abs(low.energy - ref.energy) / len(atoms) <= bound.energy_per_atom


def test_resolving_leaves_torch_load_safe(cache_home):
    """Resolving through mace's functions imports mace, which turns torch.load's
    weights_only default off process-wide; mlipd restores it (a fresh interpreter)."""
    path = cache_home / "mace" / medium_file()
    path.parent.mkdir(parents=True)
    path.touch()
    code = ("import os; from mlipd.models.pretrained import mace_file; "
            "p = mace_file('mace-mp', 'medium', offline=True); "
            "print(os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'), p)")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    assert out.splitlines()[-1] == f"None {path}"


def test_missing_names_fail_at_once_naming_file_and_folder(cache_home):
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailable, match=rf"{medium_file()} is not in "
                       rf"{cache_home / 'mace'} and github.com \(via proxy {CLOSED}\) "
                       "cannot be reached"):
        load_model("mace-mp:medium")
    with pytest.raises(ModelUnavailable, match="offline=1 forbids a download") as info:
        load_model("mace-mp:medium,offline=1")
    # the name mace's download_mace_mp_checkpoint looks for, not the URL's
    # (2023-12-03-mace-128-L1_epoch-199.model): issue 25 item 8
    saved = cache_home / "mace" / "20231203mace128L1_epoch199model"
    assert str(info.value).endswith(
        "download https://github.com/ACEsuit/mace-mp/releases/download/mace_mp_0/"
        f"2023-12-03-mace-128-L1_epoch-199.model and save it as {saved}")
    with pytest.raises(ModelUnavailable, match=r"MACE-OFF23_large\.model is not in") as info:
        load_model("mace-off:large")
    assert str(info.value).endswith(f"save it as {cache_home / 'mace' / 'MACE-OFF23_large.model'}")
    with pytest.raises(ModelUnavailable, match="unknown name 'huge'; known: small"):
        load_model("mace-mp:huge")
    with pytest.raises(ModelUnavailable, match="models--materialyze--NoSuchNet is not in") as info:
        load_model("tensornet:NoSuchNet")
    assert (f"`hf download materialyze/NoSuchNet --cache-dir {caches.matgl_cache_dir()}` "
            "and copy models--materialyze--NoSuchNet into") in str(info.value)
    assert time.perf_counter() - t0 < 30  # the probe, not mace's 120 s read timeout


def test_probe_is_bounded_and_honours_proxies(monkeypatch):
    """``reachable``: a listening loopback port answers, a closed one does not; an HTTPS
    proxy is probed instead of the host (so a proxied site counts as reachable)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        for var in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
            monkeypatch.delenv(var, raising=False)
        assert reachable(f"http://127.0.0.1:{port}/file")
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
        assert reachable("https://models.example.invalid/file.model")
    monkeypatch.setenv("https_proxy", CLOSED)
    assert not reachable("https://models.example.invalid/file.model", timeout=2)


def test_tensornet_name_from_matgls_cache(tmp_path, monkeypatch):
    """tensornet:NAME loads materialyze/NAME from matgl's Hugging Face cache folder."""
    import matgl.config
    import matgl.utils.io
    from test_tensornet import build_potential

    assert caches.matgl_cache_dir() == matgl.config.MATGL_CACHE
    assert caches.MATGL_ORG == matgl.utils.io.HF_MATGL_ORG
    assert set(caches.MATGL_FILES) == set(matgl.utils.io._MODEL_FILES)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", CLOSED)
    repo = caches.hf_repo_folder("materialyze/TensorNet-Tiny", caches.matgl_cache_dir())
    snapshot = repo / "snapshots" / "0123abcd"
    build_potential().save(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    model = load_model("tensornet:TensorNet-Tiny")
    atoms = small_triclinic([1, 6, 8, 14])
    (got,) = SingleRankEngine(model).compute([Structure.from_atoms(atoms)])
    (ref,) = SingleRankEngine(load_model(f"tensornet:{snapshot}")).compute(
        [Structure.from_atoms(atoms)])
    assert got.energy == ref.energy  # the same files, the same step: bit for bit
    listed = {f.name: f for f in caches.tensornet_files()}
    assert listed["TensorNet-Tiny"].present
    assert listed["TensorNet-Tiny"].path == snapshot


# --- acceptance: mace-mp:medium from the cache serves i-PI offline ---------------------------
def test_mace_mp_medium_from_cache_drives_real_ipi(processes, short_tmp, cache_home):
    """A random MACE saved as MACE-MP-0 medium's cache file: ``mlipd drive --model
    mace-mp:medium`` serves i-PI for 20 steps with no route out, and equals
    MACECalculator on that file at the positions i-PI recorded."""
    from helpers.ipi_run import check_trajectory, drive_real_ipi

    path = cache_home / "mace" / medium_file()
    path.parent.mkdir(parents=True)
    torch.save(tiny_mace(), path)
    atoms = bulk_box([6, 14], reps=1, a=4.6, seed=7)
    run = drive_real_ipi(processes, short_tmp, atoms, name="mp", model="mace-mp:medium")
    calc = MACECalculator(model_paths=str(path), device="cpu", default_dtype="float64")

    def mace_calculator(structures):
        out = []
        for s in structures:
            a = atoms.copy()
            a.positions = s.positions
            a.calc = calc
            out.append(SimpleNamespace(energy=a.get_potential_energy(), forces=a.get_forces()))
        return out

    check_trajectory(run, atoms, mace_calculator, cutoff=float(calc.r_max),
                     layers=len(calc.models[0].interactions))


def test_mace_mp_missing_exits_2_at_once(short_tmp, cache_home):
    """The file absent and no route out: a one-line error naming the file and the folder,
    exit code 2, long before any network timeout."""
    bulk_box([6, 14], reps=1).write(short_tmp / "init.xyz", format="extxyz")
    t0 = time.perf_counter()
    proc = subprocess.run([*MLIPD, "drive", "--address", "unix:nobody", "--sockets-prefix",
                           f"{short_tmp}/x_", "--structure", str(short_tmp / "init.xyz"),
                           "--model", "mace-mp:medium"],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "ERROR" in ln]
    assert len(errors) == 1, proc.stderr
    assert medium_file() in errors[0]
    assert str(cache_home / "mace") in errors[0]
    assert elapsed < 60, elapsed  # an interpreter start and a refused probe, not 120 s


def test_catalog_syntax_is_the_adapters():
    from mlipd.models import ase_generic, chgnet, pretrained, tensornet
    from mlipd.models import mace as mace_adapter
    from mlipd.models.catalog import ENTRIES

    syntax = {e.name: e.syntax for e in ENTRIES}
    assert syntax["chgnet"] == chgnet.SYNTAX
    assert syntax["mace"] == mace_adapter.SYNTAX
    assert syntax["mace-mp"] == pretrained.MACE_MP_SYNTAX
    assert syntax["mace-off"] == pretrained.MACE_OFF_SYNTAX
    assert syntax["tensornet"] == tensornet.SYNTAX
    assert syntax["ase"] == ase_generic.SYNTAX
