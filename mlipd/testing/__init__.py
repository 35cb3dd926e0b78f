"""Helpers for tests (ours and other projects'): real gloo ranks, test systems, test models."""

from mlipd.testing.ranks import run_on_ranks

__all__ = ["run_on_ranks"]
