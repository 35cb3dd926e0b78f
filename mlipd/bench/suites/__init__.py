"""Benchmark suites of ``mlipd bench``: one module each, with ``DESCRIPTION`` and
``run(report, *, size, device)``."""

SUITES = ("engine", "mace")
