"""The engine's one step at P = 1 with and without a process group, and what a warm
step uploads: ``DistributedEngine(ranks=1)`` vs ``SingleRankEngine`` (the same step; the
ratio is the cost of the group's collectives), host-to-device bytes per warm step and
per rebuild, and on a GPU ranks sharing it (gloo, host-staged) against P = 1."""

from __future__ import annotations

import torch

from mlipd.bench.report import Report
from mlipd.bench.systems import Jiggle, oxide, silicon
from mlipd.bench.timing import interleaved

REQUIRES = ("chgnet",)
DESCRIPTION = "DistributedEngine(ranks=1) vs SingleRankEngine; host-to-device bytes per step"
BUDGET_S = {"tiny": 90.0, "quick": 30.0, "full": 1800.0}
GPU_BUDGET_S = {"full": 25.0}  # one GPU session: all suites in ~9 min
SIZES = {  # (model, structure, atoms) per size
    "tiny": [("reference", silicon, 216), ("chgnet", oxide, 64)],
    "quick": [("reference", silicon, 1728), ("chgnet", oxide, 64)],
    "full": [("reference", silicon, 10_000), ("chgnet", oxide, 1000)],
}
GPU_FULL = [("reference", silicon, 10_000), ("chgnet", oxide, 4096)]
REPEATS = {"tiny": 2, "quick": 3, "full": 5}


def run(report: Report, *, size: str, device: str) -> None:
    from mlipd.engine.distributed import DistributedEngine
    from mlipd.engine.single_rank import SingleRankEngine
    from mlipd.models.registry import load_model

    dev = torch.device(device)
    cases = GPU_FULL if dev.type == "cuda" and size == "full" else SIZES[size]
    ratio = report.table("One step at P = 1: the same step with and without a process group "
                         "(s per warm MD step, median (min-max))",
                         ["model", "atoms", "dtype", "SingleRankEngine",
                          "DistributedEngine(ranks=1)", "ratio"])
    upload = report.table("Host-to-device bytes",
                          ["model", "atoms", "rebuild", "warm step", "positions + cells"])
    for model, build, n in cases:
        if report.deadline.passed:
            ratio.notes.append(f"{model}: not run (the suite's deadline had passed)")
            continue
        md = Jiggle(build(n))
        local = SingleRankEngine(load_model(model), device=dev, dtype=torch.float32)
        dist = DistributedEngine(model, device=device, ranks=1, dtype=torch.float32)
        try:
            t = interleaved({"local": lambda k, e=local, m=md: e.compute([m.structure(k)]),
                             "dist": lambda k, e=dist, m=md: e.compute([m.structure(k)])},
                            repeats=REPEATS[size], deadline=report.deadline,
                            label=f"{model}, {n} atoms")
        finally:
            dist.close()
        atoms = md.base.n_atoms
        ratio.add(model, atoms, "float32", t["local"].cell(), t["dist"].cell(),
                  f"{t['dist'].median / t['local'].median:.3f}")
        h2d = local.step.h2d
        local.compute([md.structure(0)])  # warm: what this step uploaded
        warm = h2d.step_bytes
        upload.add(model, atoms, f"{h2d.bytes - warm:,}", f"{warm:,}", f"{atoms * 24 + 72:,}")
    ratio.notes.append("Both run `mlipd.engine.step.Step`; positions move ~0.01 Å per call, "
                       "so neighbour lists are reused (warm MD steps). Goal: ratio <= 1.1.")
    upload.notes.append("'rebuild' counts every upload before the warm step (topology, "
                        "halo plan, first positions); a warm step uploads positions and "
                        "cells only (float64).")
    if dev.type == "cuda":
        _shared_gpu(report, size=size, device=device)


def _shared_gpu(report: Report, *, size: str, device: str) -> None:
    """P = 1, 2, 4 ranks on one GPU (gloo, host-staged), float64 against P = 1."""
    import numpy as np

    from mlipd.engine.distributed import DistributedEngine

    n = {"tiny": 216, "quick": 512, "full": 2000}[size]
    md = Jiggle(oxide(n))
    table = report.table("Ranks sharing one GPU (gloo, rows staged through the host): "
                         "CHGNet, float64",
                         ["P", "s per warm step", "halo atoms per rank (max)",
                          "max |F - F(P=1)| eV/Å", "|E - E(P=1)| / |E|"])
    ref = None
    for p in (1, 2, 4):
        if report.deadline.passed:
            table.notes.append(f"P = {p}: not run (the suite's deadline had passed)")
            break
        with DistributedEngine("chgnet", device=device, ranks=p, backend="gloo",
                               dtype=torch.float64) as eng:
            s = md.base
            (r,) = eng.compute([s])
            ref = ref or r
            t = interleaved({"step": lambda k, e=eng: e.compute([md.structure(k)])},
                            repeats=REPEATS[size], deadline=report.deadline,
                            label=f"chgnet at P={p}")
            table.add(p, t["step"].cell(), int(eng.last_stats[:, 2].max()),
                      f"{np.abs(r.forces - ref.forces).max():.2e}",
                      f"{abs(r.energy - ref.energy) / abs(ref.energy):.2e}")
