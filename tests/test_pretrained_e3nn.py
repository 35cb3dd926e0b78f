"""Published names of the e3nn>=0.5 family: ``esen:NAME`` from fairchem's cache (its own
table and Hugging Face cache folder), and the syntax ``mlipd models`` shows for eSEN and
SevenNet. No network: the cache holds a small random eSEN under a registered file name,
and HTTPS points at a closed loopback port."""

from __future__ import annotations

import fairchem.core._config
import pytest
import torch
from fairchem.core.calculate import pretrained_mlip
from model_cases import small_triclinic
from test_esen import ZS, _save

from mlipd.engine.single_rank import SingleRankEngine
from mlipd.errors import ModelUnavailable
from mlipd.models import caches, esen, sevennet
from mlipd.models.catalog import ENTRIES
from mlipd.models.registry import load_model
from mlipd.types import Structure

pytestmark = [pytest.mark.e3nn, pytest.mark.timeout(300)]
NAME = "esen-sm-conserving-all-omol"


def test_fairchem_rules_are_fairchems():
    assert str(caches.fairchem_cache_dir()) == fairchem.core._config.CACHE_DIR
    assert set(caches.fairchem_checkpoints()) == set(pretrained_mlip.available_models)
    assert NAME in caches.esen_names(caches.fairchem_checkpoints())


def test_esen_name_from_fairchems_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRCHEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(ModelUnavailable, match=r"esen_sm_conserving_all\.pt is not in .*"
                       "models--facebook--OMol25.* cannot be reached") as info:
        load_model(f"esen:{NAME}")
    assert f"--cache-dir {tmp_path}` and copy models--facebook--OMol25 into" in str(info.value)
    entry = caches.fairchem_checkpoints()[NAME]
    repo = caches.hf_repo_folder(entry["repo_id"], tmp_path)
    file = repo / "snapshots" / "feed01" / caches.fairchem_repo_file(entry)
    file.parent.mkdir(parents=True)
    _save(file, 300, 0)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("feed01")
    by_name = load_model(f"esen:{NAME}")
    by_path = load_model(f"esen:{file}")
    s = [Structure.from_atoms(small_triclinic(ZS))]
    (a,) = SingleRankEngine(by_name, dtype=torch.float64).compute(s)
    (b,) = SingleRankEngine(by_path, dtype=torch.float64).compute(s)
    assert a.energy == b.energy  # the same file, the same step: bit for bit
    (listed,) = [f for f in caches.esen_files() if f.name == NAME]
    assert listed.present
    assert listed.path == file
    with pytest.raises(ModelUnavailable, match="not an eSEN checkpoint mlipd can run"):
        load_model("esen:uma-s-1p1")


def test_catalog_syntax_is_the_adapters():
    syntax = {e.name: e.syntax for e in ENTRIES}
    assert syntax["esen"] == esen.SYNTAX
    assert syntax["sevennet"] == sevennet.SYNTAX
