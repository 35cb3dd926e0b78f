"""Latency: milliseconds per warm call on small structures (8-512 atoms), where
overhead, not arithmetic, sets the speed of unbatched MD.

Per model and size, three contenders in this process, interleaved call by call:
mlipd's MD step (neighbour list reused within the skin: what ``mlipd drive`` does),
mlipd rebuilding its lists every call (the package's graph work, like for like), and
the package's own calculator. Each call moves the atoms (``systems.Jiggle``); every
contender computes energy, forces and stress. The results of one call are compared
(mlipd rebuilding vs the package) to show the same model is timed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mlipd.bench import contenders
from mlipd.bench.report import Report
from mlipd.bench.zoo import make_case

REQUIRES = ("chgnet", "mace", "matgl")
DESCRIPTION = "ms per warm call at 8-512 atoms: mlipd MD step, mlipd rebuilding, package"
BUDGET_S = {"tiny": 120.0, "quick": 40.0, "full": 1800.0}
GPU_BUDGET_S = {"full": 30.0}  # one GPU session: all suites in ~9 min
MODELS = {"tiny": ("chgnet", "mace"), "quick": ("chgnet", "mace", "tensornet"),
          "full": ("chgnet", "mace", "tensornet")}
SIZES = {"tiny": [8], "quick": [8, 64], "full": [8, 64, 216, 512]}
REPEATS = {"tiny": 3, "quick": 5, "full": 20}
SCALE = {"tiny": "small", "quick": "small", "full": "large"}


def run(report: Report, *, size: str, device: str) -> None:
    table = report.table(
        "ms per call (energy, forces, stress), float32, median (min-max) after 2 warm-ups",
        ["model", "atoms", "mlipd MD step", "mlipd rebuilding", "package",
         "package / mlipd rebuilding", "package / mlipd MD step",
         "mlipd vs package (same call)"])
    workdir = Path(tempfile.mkdtemp(prefix="mlipd-bench-latency-"))
    try:
        for model, deadline in report.deadline.shares(MODELS[size]):
            try:
                case = make_case(model, scale=SCALE[size], workdir=workdir)
            except ImportError as e:
                table.notes.append(f"{model}: not run ({e})")
                continue
            table.notes.append(f"{model}: {case.description}; package: {case.package}")
            plot = report.plot(f"Latency, {model}", "atoms", "ms per call")
            curves = {k: plot.curve(k) for k in contenders.SIDE_BY_SIDE}
            for n in SIZES[size]:
                if deadline.passed:
                    table.notes.append(f"{model} from {n} atoms: not run (deadline)")
                    break
                t, same = contenders.side_by_side(case, n, device=device,
                                                  repeats=REPEATS[size],
                                                  deadline=deadline)
                for k, c in curves.items():
                    c.add(n, 1e3 * t[k].median)
                md, rb, pk = t["mlipd MD step"], t["mlipd rebuilding"], t["package"]
                table.add(model, n, md.cell(1e-3, 1), rb.cell(1e-3, 1), pk.cell(1e-3, 1),
                          rb.ratio(pk), md.ratio(pk), same)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table.notes.append("MD step: the neighbour list is built once and reused while atoms "
                       "move less than half the 0.5 Å skin (what a warm `mlipd drive` "
                       "step does); rebuilding: a fresh list and topology every call, as "
                       "the packages' calculators build their graphs every call.")
