"""Models: each model adapter against its package's own calculator at production-like
sizes: TensorNet vs matgl's ``PESCalculator``, MACE vs ``MACECalculator`` (eSEN vs
fairchem's ``FAIRChemCalculator``: the ``esen`` suite, in the e3nn>=0.5 environment;
CHGNet: ``capacity`` and ``latency``).

Per model and size, in this process, interleaved call by call (two warm-ups): mlipd
rebuilding its lists every call (the calculators' graph work: the like-for-like
figure), mlipd's MD step (lists reused within the skin) and the package; the results
of one call are compared to show the same model is timed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mlipd.bench import contenders
from mlipd.bench.report import Report
from mlipd.bench.zoo import make_case

DESCRIPTION = "TensorNet vs matgl, MACE vs mace-torch: step time"
REQUIRES = ("matgl", "mace")
BUDGET_S = {"tiny": 150.0, "quick": 40.0, "full": 2 * 3600.0}
GPU_BUDGET_S = {"full": 50.0}  # one GPU session: all suites in ~9 min
MODELS = ("tensornet", "mace")
SIZES = {"tiny": [64], "quick": [216], "full": [1000, 8000]}
GPU_SIZES = {"tiny": [64], "quick": [1000], "full": [1000, 8000, 32768]}
REPEATS = {"tiny": 3, "quick": 3, "full": 5}
SCALE = {"tiny": "small", "quick": "small", "full": "large"}


def run(report: Report, *, size: str, device: str, models: tuple[str, ...] = MODELS) -> None:
    sizes = (GPU_SIZES if device.startswith("cuda") else SIZES)[size]
    table = report.table(
        "s per call (energy, forces, stress), float32, median (min-max) after 2 warm-ups",
        ["model", "atoms", "mlipd rebuilding", "package", "package / mlipd rebuilding",
         "mlipd MD step", "package / mlipd MD step", "mlipd vs package (same call)"])
    plot = report.plot("Step time: mlipd (rebuilding) vs the package", "atoms",
                       "s per call")
    workdir = Path(tempfile.mkdtemp(prefix="mlipd-bench-models-"))
    try:
        for model, deadline in report.deadline.shares(models):
            try:
                case = make_case(model, scale=SCALE[size], workdir=workdir)
            except ImportError as e:
                table.notes.append(f"{model}: not run ({e})")
                continue
            table.notes.append(f"{model}: {case.description}; package: {case.package}")
            ours, theirs = plot.curve(f"{model} mlipd"), plot.curve(f"{model} package")
            for n in sizes:
                if deadline.passed:
                    table.notes.append(f"{model} from {n} atoms: not run (deadline)")
                    break
                t, same = contenders.side_by_side(case, n, device=device,
                                                  repeats=REPEATS[size],
                                                  deadline=deadline)
                md, rb, pk = t["mlipd MD step"], t["mlipd rebuilding"], t["package"]
                ours.add(n, rb.median)
                theirs.add(n, pk.median)
                table.add(model, n, rb.cell(), pk.cell(), rb.ratio(pk), md.cell(),
                          md.ratio(pk), same)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table.notes.append(
        "Structures: (Mn,Ni)O rocksalt, rattled 0.05 Å; every call moves the atoms ~0.01 Å.")
    if "esen" in models:
        table.notes.append("fairchem runs its FP32 path without torch.compile (InferenceSettings "
                           "compile=False; its default also compiles), as mlipd compiles nothing.")
    table.notes.append("P > 1 of these models: `mlipd bench scaling`.")
