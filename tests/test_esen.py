"""eSEN is blocked on the environment (see mlipd/models/esen.py): the model name must
fail with that reason, never with a misleading install hint or a traceback."""

from __future__ import annotations

import importlib.util

import pytest

from mlipd.engine import make_engine
from mlipd.errors import SetupError


def test_esen_reports_why_it_is_unavailable(tmp_path):
    with pytest.raises(SetupError, match=r"e3nn>=0.5.*e3nn==0.4.4"):
        make_engine(f"esen:{tmp_path / 'checkpoint.pt'}")


def test_the_block_still_holds():
    """If fairchem-core ever lands beside mace-torch here, this fails: write the adapter."""
    both = importlib.util.find_spec("fairchem") is not None and importlib.util.find_spec(
        "mace") is not None
    assert not both, "fairchem-core and mace-torch now share the environment: port eSEN"
