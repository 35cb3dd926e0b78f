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
import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path

from mlipd.bench import contenders
from mlipd.bench.report import Report
from mlipd.bench.timing import ContenderFailed, Deadline, interleaved
from mlipd.bench.workers import Worker, setup_all
from mlipd.bench.zoo import make_case

REQUIRES = ("chgnet", "mace", "matgl")
DESCRIPTION = "growing systems until out of memory or a time limit: mlipd vs each package"
BUDGET_S = {"tiny": 300.0, "quick": 120.0, "full": 4 * 3600.0}
GPU_BUDGET_S = {"full": 170.0}  # one GPU session: all suites in ~9 min
MODELS = {"tiny": ("chgnet", "mace"), "quick": ("chgnet", "mace", "tensornet"),
          "full": ("chgnet", "mace", "tensornet")}
SCALE = {"tiny": "small", "quick": "small", "full": "large"}
SIZES = {
    "cpu": {"tiny": [8, 64], "quick": [64, 216],
            "full": [64, 216, 512, 1000, 2000, 4096, 8000, 17576, 32768, 64000, 125000]},
    "cuda": {"tiny": [64, 216], "quick": [1000, 4096, 8000],
             "full": [1000, 4096, 8000, 17576, 32768, 64000, 125000, 216000, 343000]},
}
SLOW_S = {"cpu": {"tiny": 60.0, "quick": 15.0, "full": 600.0},
          "cuda": {"tiny": 60.0, "quick": 20.0, "full": 30.0}}
MEMORY_GIB = {"tiny": 2.0, "quick": 3.0, "full": float("inf")}
MEMORY_SHARE = 0.75  # of the available memory at the start, per contender (one computes at a time)
REPEATS = 3
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


def contenders_of(case) -> dict[str, tuple]:
    """{contender: (recipe, case)}: mlipd and the package; for CHGNet also mlipd with
    activations recomputed block by block (``recompute=1``, what ``recompute=auto``
    switches to when memory runs short)."""
    out = {"mlipd": (contenders.rebuilding, case)}
    if case.name == "chgnet":
        out["mlipd recompute=1"] = (contenders.rebuilding,
                                    dataclasses.replace(case, spec="chgnet:,recompute=1"))
    out["package"] = (contenders.package_call, case)
    return out


def run(report: Report, *, size: str, device: str) -> None:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    limit = memory_limit(report)
    slow = SLOW_S[kind][size]
    mem = "GPU MiB (peak allocated)" if kind == "cuda" else "MiB (peak RSS)"
    table = report.table(
        "Capacity and step time, float32 (s per call, median (min-max) of 3 after a warm-up)",
        ["model", "atoms", "contender", "s/step", mem, "step KiB/atom",
         "package / this: time", "package / this: step memory"])
    times = report.plot("Capacity: step time (energy, forces, stress)", "atoms", "s per step")
    memory = report.plot("Capacity: memory of the step (peak minus before)", "atoms",
                         "MiB" if kind == "cpu" else "GPU MiB")
    workdir = Path(tempfile.mkdtemp(prefix="mlipd-bench-capacity-"))
    try:
        for model, deadline in report.deadline.shares(MODELS[size]):
            if report.deadline.passed:
                table.notes.append(f"{model}: not run (the suite's deadline had passed)")
                continue
            names = ["mlipd", *(["mlipd recompute=1"] if model == "chgnet" else []),
                     "package"]
            workers = {name: Worker(f"{model}-{name}", device=device, threads=report.threads,
                                    memory_limit=limit, call_timeout=3 * slow)
                       for name in names}
            try:  # the model's file, written where its package is imported anyway
                case = workers["mlipd"].run(make_case, model, scale=SCALE[size],
                                            workdir=workdir)
            except ContenderFailed as e:
                table.notes.append(f"{model}: not run ({e})")
                for w in workers.values():
                    w.close()
                continue
            table.notes.append(f"{model}: {case.description}; package: {case.package}")
            try:
                _grow(table, times, memory, case, contenders_of(case), workers, slow=slow,
                      limit=limit, sizes=SIZES[kind][size], deadline=deadline,
                      cuda=kind == "cuda")
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
         + (f"{limit / 2**30:.1f} GiB of resident memory (sampled every 20 ms while it "
            "computes, and its peak checked after each size); glibc's default malloc in "
            "every process. CHGNet's recompute=auto decides from the machine's free memory, "
            "not from this limit." if limit else
            "the GPU's memory (out-of-memory errors caught per size).")),
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


def _grow(table, times, memory, case, recipes: dict[str, tuple], workers: dict[str, Worker],
          *, slow: float, limit: float | None, sizes: list[int], deadline: Deadline,
          cuda: bool) -> None:
    stopped: dict[str, str] = {}
    largest: dict[str, int] = {}
    curves = {k: (times.curve(f"{case.name} {k}"), memory.curve(f"{case.name} {k}"))
              for k in recipes}
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
        failed = setup_all({w: (functools.partial(recipes[k][0], recipes[k][1], "oxide",
                                                  atoms),) for k, w in alive.items()},
                           timeout=max(60.0, deadline.left()))
        for k, w in alive.items():
            try:
                if w in failed:
                    raise ContenderFailed(failed[w])
                w.reset_peak()
            except ContenderFailed as e:
                stopped[k] = f"{e} (at {atoms} atoms)"
        alive = {k: w for k, w in alive.items() if k not in stopped}
        t = _time(alive, cuda=cuda)
        peaks = {}
        for k, w in alive.items():
            if t[k].ok:
                try:
                    peaks[k] = w.peak()
                except ContenderFailed as e:
                    stopped[k] = f"{e} (at {atoms} atoms)"
        pkg = t.get("package")
        for k in recipes:
            if k not in alive:
                continue
            if not t[k].ok or k not in peaks:
                stopped.setdefault(k, f"{t[k].failed} (at {atoms} atoms)")
                table.add(case.name, atoms, k, t[k].failed or stopped[k], "-", "-", "-", "-")
                continue
            m = peaks[k]
            ok_pkg = pkg is not None and pkg.ok and "package" in peaks
            table.add(case.name, atoms, k, t[k].cell(), f"{m.peak / MIB:.0f}",
                      f"{m.step / 1024 / atoms:.1f}", t[k].ratio(pkg) if ok_pkg else "-",
                      f"{peaks['package'].step / max(m.step, 1):.2f}" if ok_pkg else "-")
            largest[k] = atoms
            curves[k][0].add(atoms, t[k].median)
            curves[k][1].add(atoms, m.step / MIB)
            if limit is not None and m.peak > limit:
                stopped[k] = f"peak over the memory limit (at {atoms} atoms)"
            elif t[k].median > slow:
                stopped[k] = f"a step took > {slow:.0f} s (at {atoms} atoms)"
    for k in recipes:
        table.notes.append(f"{case.name} {k}: largest {largest.get(k, 'none')} atoms; "
                           f"stopped: {stopped.get(k, 'sizes exhausted')}")
