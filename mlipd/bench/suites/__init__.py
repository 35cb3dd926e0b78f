"""Benchmark suites of ``mlipd bench``: one module each, with ``DESCRIPTION``,
``BUDGET_S`` (seconds per size) and ``run(report, *, size, device)``."""

SUITES = ("engine", "capacity", "latency", "beads", "ipi", "scaling", "partition", "overhead",
          "models", "esen", "sevennet", "soak", "mace", "clients", "gpu")
