"""Helpers for tests (ours and plug-in authors'): real gloo ranks, the zero-redundancy
check, the work counter, float32 tolerances, test systems."""

from mlipd.testing.hostreads import HostReads
from mlipd.testing.ranks import run_on_ranks
from mlipd.testing.redundancy import check_zero_redundancy

__all__ = ["HostReads", "check_zero_redundancy", "run_on_ranks"]
