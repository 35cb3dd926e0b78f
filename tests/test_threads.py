"""Intra-op threads per rank: given, or the host's cores shared among its ranks."""

from __future__ import annotations

import os

import pytest
import torch

from mlipd.engine import make_engine
from mlipd.engine.threads import host_cores, threads_per_rank
from mlipd.errors import SetupError


def test_default_shares_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert host_cores() == 8
    assert threads_per_rank(None, 1) == 8
    assert threads_per_rank(None, 3) == 2
    assert threads_per_rank(None, 16) == 1  # never zero
    assert threads_per_rank(5, 3) == 5  # given: taken as it is
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert host_cores() == len(os.sched_getaffinity(0))
    with pytest.raises(SetupError, match="--threads must be >= 1, got 0"):
        threads_per_rank(0, 1)


def test_one_rank_sets_this_process():
    before = torch.get_num_threads()
    try:
        make_engine("lj", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
