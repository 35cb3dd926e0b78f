"""Helpers for tests (ours and other projects'): real gloo ranks, test systems, test models."""

from mlipd.testing.hostreads import HostReads
from mlipd.testing.ranks import run_on_ranks

__all__ = ["HostReads", "run_on_ranks"]
