"""Capacity: growing (Mn,Ni)O boxes until out of memory or a time limit, per model,
mlipd against the package's own calculator (CHGNet vs ``CHGNetCalculator``, a random
ScaleShiftMACE vs ``MACECalculator``, TensorNet vs matgl's ``PESCalculator``).

Each contender lives in its own process (``workers.Worker``) for the whole model, so
its peak memory is its own: on CPU the peak resident set, reset before each size; on
CUDA torch's peak allocation, an out-of-memory error caught per size. Both
processes stay alive: on CPU they are called in turn (interleaved), so only one
computes at a time; on a GPU one after the other, the idle one's cached memory handed
back first. One warm-up, three timed calls per size. A contender stops growing at its first
failure (out of memory, over the memory limit, over the time limit per call) or once
its step takes longer than the size's slow limit; the suite stops at its deadline.

mlipd rebuilds its neighbour list and topology in every call here (skin 0), as the
calculators build their graphs: the same work in the timed region.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
from pathlib import Path

from mlipd.bench import contenders
from mlipd.bench.report import Report
from mlipd.bench.timing import ContenderFailed, Deadline, interleaved
from mlipd.bench.workers import Worker, setup_all
from mlipd.bench.zoo import make_case

DESCRIPTION = "growing systems until out of memory or a time limit: mlipd vs each package"
BUDGET_S = {"tiny": 300.0, "quick": 150.0, "full": 6 * 3600.0}
GPU_BUDGET_S = {"full": 200.0}  # one GPU session: all suites in ~9 min
MODELS = {"tiny": ("chgnet", "mace"), "quick": ("chgnet", "mace", "tensornet"),
          "full": ("chgnet", "mace", "tensornet")}
SCALE = {"tiny": "small", "quick": "small", "full": "large"}
SIZES = {
    "cpu": {"tiny": [8, 64], "quick": [64, 216, 512],
            "full": [64, 216, 512, 1000, 2000, 4096, 8000, 17576, 32768, 64000, 125000]},
    "cuda": {"tiny": [64, 216], "quick": [1000, 4096, 8000],
             "full": [1000, 4096, 8000, 17576, 32768, 64000, 125000, 216000, 343000]},
}
SLOW_S = {"cpu": {"tiny": 60.0, "quick": 15.0, "full": 600.0},
          "cuda": {"tiny": 60.0, "quick": 20.0, "full": 30.0}}
MEMORY_GIB = {"tiny": 2.0, "quick": 3.0, "full": float("inf")}
MEMORY_SHARE = 0.75  # of the available memory at the start, per contender (one computes at a time)
REPEATS = 3
RECIPES = {"mlipd": contenders.rebuilding, "package": contenders.package_call}
MIB = 2**20


def memory_limit(report: Report) -> float | None:
    """Bytes per contender process on CPU; None on CUDA (the device's own limit)."""
    if report.device.startswith("cuda"):
        return None
    import torch

    from mlipd.memory import available_bytes

    free = available_bytes(torch.device("cpu")) or float("inf")
    gib = report.memory_limit_gib or MEMORY_GIB[report.size]
    return min(gib * 2**30, MEMORY_SHARE * free)


def run(report: Report, *, size: str, device: str) -> None:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    limit = memory_limit(report)
    slow = SLOW_S[kind][size]
    mem_unit = "GPU MiB (peak allocated)" if kind == "cuda" else "MiB (peak RSS)"
    table = report.table(
        "Capacity and step time, float32: mlipd vs the package's calculator "
        "(s per call, median (min-max) of 3 after a warm-up)",
        ["model", "atoms", "mlipd s/step", f"mlipd {mem_unit}", "mlipd step KiB/atom",
         "package s/step", f"package {mem_unit}", "package step KiB/atom",
         "time package/mlipd", "step memory package/mlipd"])
    times = report.plot("Capacity: step time (energy, forces, stress)", "atoms", "s per step")
    memory = report.plot("Capacity: memory of the step (peak minus before)", "atoms",
                         "MiB" if kind == "cpu" else "GPU MiB")
    workdir = Path(tempfile.mkdtemp(prefix="mlipd-bench-capacity-"))
    try:
        for model, deadline in report.deadline.shares(MODELS[size]):
            if report.deadline.passed:
                table.notes.append(f"{model}: not run (the suite's deadline had passed)")
                continue
            workers = {name: Worker(f"{model}-{name}", device=device, threads=report.threads,
                                    memory_limit=limit, call_timeout=3 * slow)
                       for name in RECIPES}
            try:  # the model's file is written where its package is imported anyway
                case = workers["mlipd"].run(make_case, model, scale=SCALE[size],
                                            workdir=workdir)
                table.notes.append(f"{model}: {case.description}; package: {case.package}")
                _grow(report, table, times, memory, case, workers, slow=slow,
                      sizes=SIZES[kind][size], deadline=deadline)
            except ContenderFailed as e:
                table.notes.append(f"{model}: not run ({e})")
            finally:
                for w in workers.values():
                    w.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table.notes += [
        "mlipd rebuilds its neighbour list and topology in every call (skin 0), as the "
        "calculators build their graphs in every call; positions move ~0.01 Å per call.",
        "Step memory = peak minus what the process held before the size (model, torch, the "
        "structure); KiB/atom divides it by the atom count.",
        ("Memory limit per contender process: "
         + (f"{limit / 2**30:.1f} GiB of resident memory (sampled every 20 ms, and the "
            "peak checked after each call); glibc's default malloc in both processes. "
            "CHGNet's recompute=auto decides from the machine's free memory, not from "
            "this limit." if limit else "the GPU's memory (OOM caught per size).")),
        f"A contender stops growing at its first failure or once a step takes > {slow:.0f} s.",
    ]


def _time(alive: dict[str, Worker], *, cuda: bool):
    """Interleaved on CPU (one computes at a time; load changes hit both alike). On a
    GPU one contender after the other, the idle one's cached memory handed back first:
    two caching allocators would otherwise share the device's memory."""
    if not cuda:
        return interleaved(alive, warmup=1, repeats=REPEATS)
    out = {}
    for k, w in alive.items():
        for other in alive.values():
            if other is not w and other.failed is None:
                with contextlib.suppress(ContenderFailed):
                    other.release()
        out.update(interleaved({k: w}, warmup=1, repeats=REPEATS))
    return out


def _grow(report: Report, table, times, memory, case, workers: dict[str, Worker], *,
          slow: float, sizes: list[int], deadline: Deadline) -> None:
    stopped: dict[str, str] = {}
    largest: dict[str, int] = {}
    curves = {name: (times.curve(f"{case.name} {name}"), memory.curve(f"{case.name} {name}"))
              for name in RECIPES}
    for n in sizes:
        alive = {k: w for k, w in workers.items() if k not in stopped}
        if not alive:
            break
        if deadline.passed:
            for k in alive:
                stopped[k] = "the suite's deadline"
            break
        atoms = len(contenders.STRUCTURES["oxide"](n))
        for w in alive.values():
            w.call_timeout = max(30.0, min(3 * slow, deadline.left()))
        failed = setup_all({w: (functools.partial(RECIPES[k], case, "oxide", atoms),)
                            for k, w in alive.items()},
                           timeout=max(60.0, deadline.left()))
        for k, w in alive.items():
            try:
                if w in failed:
                    raise ContenderFailed(failed[w])
                w.reset_peak()
            except ContenderFailed as e:
                stopped[k] = f"{e} (at {atoms} atoms)"
        alive = {k: w for k, w in alive.items() if k not in stopped}
        t = _time(alive, cuda=report.device.startswith("cuda"))
        cells, mem = {}, {}
        for k in RECIPES:
            if k not in alive:
                cells[k] = ("-", "-", "-")
                continue
            if not t[k].ok:
                stopped[k] = f"{t[k].failed} (at {atoms} atoms)"
                cells[k] = (t[k].failed, "-", "-")
                continue
            m = alive[k].peak()
            mem[k] = m
            largest[k] = atoms
            cells[k] = (t[k].cell(), f"{m.peak / MIB:.0f}", f"{m.step / 1024 / atoms:.1f}")
            curves[k][0].add(atoms, t[k].median)
            curves[k][1].add(atoms, m.step / MIB)
            if t[k].median > slow:
                stopped[k] = f"a step took > {slow:.0f} s (at {atoms} atoms)"
        both = "mlipd" in mem and "package" in mem
        table.add(case.name, atoms, *cells["mlipd"], *cells["package"],
                  t["mlipd"].ratio(t["package"]) if both else "-",
                  f"{mem['package'].step / max(mem['mlipd'].step, 1):.2f}" if both else "-")
    for k in RECIPES:
        table.notes.append(f"{case.name} {k}: largest {largest.get(k, 'none')} atoms; "
                           f"stopped: {stopped.get(k, 'sizes exhausted')}")
