"""eSEN against fairchem's own ``FAIRChemCalculator``: the ``models`` suite's comparison
for the e3nn>=0.5 environment (``.venv-e3nn``), where fairchem-core lives."""

from __future__ import annotations

from mlipd.bench.report import Report
from mlipd.bench.suites import models

DESCRIPTION = "eSEN vs fairchem: step time"
REQUIRES = ("fairchem",)
BUDGET_S = models.BUDGET_S
GPU_BUDGET_S = models.GPU_BUDGET_S


def run(report: Report, *, size: str, device: str) -> None:
    models.run(report, size=size, device=device, models=("esen",))
