"""Every GPU figure in one run (``mlipd bench gpu --device cuda``), sized for one H100 or
H200 session: about 8 minutes, every part under its own deadline, OOM caught per size by
the parts themselves.

Reused suites, their tables prefixed with the suite's name: ``capacity`` (CHGNet and MACE
atoms that fit and s/step vs the packages' calculators), ``latency`` (warm calls vs the
packages), ``beads`` (32 x 64-atom Si batched), ``engine`` (distributed P = 1 / single
device), ``ipi`` (an i-PI PIMD run against i-PI's own driver). Its own parts:

* 64-atom warm-call latency with and without CUDA graphs (``cuda_graphs=1`` vs ``0``);
* 2 and 4 ranks sharing the device (gloo) against one rank, float64: the largest
  relative difference (the contract: <= 1e-10) and the step times;
* host reads per warm step: ``torch.cuda.set_sync_debug_mode`` warnings on CUDA, and the
  dispatch-mode count of ``mlipd.testing.HostReads`` (which also runs on a CPU).

``--size tiny`` (the default tests, on a CPU) runs its own parts at their smallest and
leaves the reused suites to their own tiny tests, so the glue and every own part run
before a GPU session does.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from mlipd.bench.report import Report
from mlipd.bench.systems import Jiggle, silicon
from mlipd.bench.timing import Deadline, interleaved

REQUIRES = ("chgnet", "mace")
DESCRIPTION = "every GPU figure in one run: capacity, latency (CUDA graphs), beads, " \
              "P=1 ratio, ranks sharing a GPU, i-PI, host reads"
BUDGET_S = {"tiny": 150.0, "quick": 480.0, "full": 480.0}
# seconds per part on a GPU (sum 440 s: the whole run stays under 8 minutes with start-up)
PARTS_S = {"capacity": 150.0, "latency": 30.0, "beads": 25.0, "engine": 25.0, "ipi": 60.0,
           "graphs": 40.0, "shared": 90.0, "host reads": 20.0}
REUSED = ("capacity", "latency", "beads", "engine", "ipi")
GRAPH_MODELS = {"tiny": ("chgnet",), "quick": ("chgnet", "mace"), "full": ("chgnet", "mace")}
GRAPH_ATOMS = {"tiny": 8, "quick": 64, "full": 64}
REPEATS = {"tiny": 3, "quick": 10, "full": 20}
SHARED = {"tiny": [("reference", 64, (2,))],
          "quick": [("chgnet", 64, (2, 4)), ("mace", 64, (2, 4))],
          "full": [("chgnet", 512, (2, 4)), ("mace", 512, (2, 4))]}
READ_MODELS = {"tiny": ("chgnet",), "quick": ("chgnet", "mace"), "full": ("chgnet", "mace")}


def run(report: Report, *, size: str, device: str) -> None:
    total = sum(PARTS_S.values())
    budget = report.deadline.left()
    workdir = Path(tempfile.mkdtemp(prefix="mlipd-bench-gpu-"))
    try:
        for part, seconds in PARTS_S.items():
            share = min(seconds * budget / total, report.deadline.left())
            if share <= 0:
                report.note(f"{part}: not run (the suite's deadline had passed)")
                continue
            deadline = Deadline(share)
            if part in REUSED:
                _reused(report, part, size=size, device=device, deadline=deadline)
            elif part == "graphs":
                _graphs(report, size=size, device=device, deadline=deadline, workdir=workdir)
            elif part == "shared":
                _shared(report, size=size, device=device, deadline=deadline, workdir=workdir)
            else:
                _host_reads(report, size=size, device=device, workdir=workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _reused(report: Report, name: str, *, size: str, device: str, deadline: Deadline) -> None:
    """Suite ``name`` under ``deadline``, its tables and plots added to ``report``."""
    if size == "tiny":
        report.note(f"{name}: not run at tiny (`mlipd bench {name} --size tiny` is its own test)")
        return
    suite = importlib.import_module(f"mlipd.bench.suites.{name}")
    sub = Report(name, device, size, command=report.command, deadline=deadline,
                 memory_limit=report.memory_limit_gib, threads=report.threads)
    try:
        suite.run(sub, size=size, device=device)
    except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others
        report.note(f"{name}: **failed**: {type(e).__name__}: {e}")
    for t in sub.tables:
        t.title = f"{name}: {t.title}"
        report.tables.append(t)
    for p in sub.plots:
        p.title = f"{name}: {p.title}"
        report.plots.append(p)
    report.notes.extend(f"{name}: {n}" for n in sub.notes)


def _case_model(name: str, workdir: Path):
    from mlipd.bench.zoo import make_case
    from mlipd.models.registry import load_model

    if name == "reference":
        return load_model("reference")
    return load_model(make_case(name, scale="small", workdir=workdir).spec)


def _graphs(report: Report, *, size: str, device: str, deadline: Deadline,
            workdir: Path) -> None:
    from mlipd.engine.single_rank import SingleRankEngine

    table = report.table(
        f"Warm call, {GRAPH_ATOMS[size]}-atom Si, float32: CUDA graphs on and off "
        "(ms per call, median (min-max))",
        ["model", "atoms", "cuda_graphs=0", "cuda_graphs=1", "speed-up", "graphs captured",
         "replays", "max |dF| (eV/Å)"])
    dev = torch.device(device)
    for name, share in deadline.shares(GRAPH_MODELS[size]):
        if share.passed:
            table.notes.append(f"{name}: not run (deadline)")
            continue
        md = Jiggle(silicon(GRAPH_ATOMS[size]))
        eager = SingleRankEngine(_case_model(name, workdir), device=dev, dtype=torch.float32,
                            cuda_graphs="0")
        graphed = SingleRankEngine(_case_model(name, workdir), device=dev, dtype=torch.float32,
                              cuda_graphs="1")
        t = interleaved({"0": lambda k, e=eager, m=md: e.compute([m.structure(k)]),
                         "1": lambda k, e=graphed, m=md: e.compute([m.structure(k)])},
                        warmup=3, repeats=REPEATS[size], deadline=share)
        (a,) = eager.compute([md.structure(99)])
        (b,) = graphed.compute([md.structure(99)])
        g = graphed.graphed
        table.add(name, md.base.n_atoms, t["0"].cell(1e-3, 2), t["1"].cell(1e-3, 2),
                  t["1"].ratio(t["0"]), 0 if g is None else g.captures,
                  0 if g is None else g.replays, f"{np.abs(a.forces - b.forces).max():.1e}")
    if dev.type != "cuda":
        table.notes.append("Not a GPU: cuda_graphs=1 runs eagerly (the same code as 0).")
    table.notes.append("Each call moves every atom ~0.01 Å (lists reused within the skin); "
                       "the first warm step of a topology runs eagerly, the next captures.")


def _shared(report: Report, *, size: str, device: str, deadline: Deadline,
            workdir: Path) -> None:
    """P ranks on one device (gloo: rows staged through the host) against one rank,
    float64: equal to 1e-10, and their step times."""
    from mlipd.engine.distributed import DistributedEngine
    from mlipd.engine.single_rank import SingleRankEngine

    table = report.table(
        "Ranks sharing one device vs one rank, float64 (s per warm MD step, median (min-max))",
        ["model", "atoms", "ranks", "one rank", "ranks sharing", "one rank / sharing",
         "max rel. difference", "<= 1e-10"])
    dev = torch.device(device)
    for (name, n, ranks), share in deadline.shares(SHARED[size]):
        if share.passed:
            table.notes.append(f"{name}: not run (deadline)")
            continue
        md = Jiggle(silicon(n))
        spec = "reference" if name == "reference" else _spec(name, workdir)
        one = SingleRankEngine(_case_model(name, workdir), device=dev, dtype=torch.float64)
        for p, each in share.shares(ranks):
            if each.passed:
                table.notes.append(f"{name} at {p} ranks: not run (deadline)")
                continue
            try:
                engine = DistributedEngine(spec, device=device, ranks=p, backend="gloo",
                                           dtype=torch.float64)
            except Exception as e:  # noqa: BLE001 - report the case, go on
                table.notes.append(f"{name} at {p} ranks: failed to start ({e})")
                continue
            try:
                t = interleaved({"one": lambda k, o=one, m=md: o.compute([m.structure(k)]),
                                 "p": lambda k, e=engine, m=md: e.compute([m.structure(k)])},
                                warmup=1, repeats=REPEATS[size] // 2 + 1, deadline=each)
                (a,) = one.compute([md.structure(50)])
                (b,) = engine.compute([md.structure(50)])
            finally:
                engine.close()
            diff = max(_rel(b.energy, a.energy), _rel(b.forces, a.forces),
                       _rel(b.virial, a.virial))
            table.add(name, md.base.n_atoms, p, t["one"].cell(), t["p"].cell(),
                      t["p"].ratio(t["one"]), f"{diff:.1e}", "yes" if diff <= 1e-10 else "NO")


def _spec(name: str, workdir: Path) -> str:
    from mlipd.bench.zoo import make_case

    return make_case(name, scale="small", workdir=workdir).spec


def _rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def _host_reads(report: Report, *, size: str, device: str, workdir: Path) -> None:
    """Host reads of one warm step at one rank: CUDA's sync-debug warnings on a GPU, and
    the dispatch-mode count on any device, with the ops it names."""
    from mlipd.engine.single_rank import SingleRankEngine
    from mlipd.testing.hostreads import HostReads

    table = report.table("Host reads per warm step, one rank, 64-atom Si",
                         ["model", "CUDA sync warnings", "counted reads", "ops"])
    dev = torch.device(device)
    for name in READ_MODELS[size]:
        engine = SingleRankEngine(_case_model(name, workdir), device=dev, dtype=torch.float32,
                             cuda_graphs="0")
        md = Jiggle(silicon(64))
        engine.compute([md.structure(0)])  # rebuild
        engine.compute([md.structure(1)])  # the topology's first step: its caches
        s = md.structure(2)
        x = torch.as_tensor(s.positions, dtype=torch.float64, device=dev)
        cell = torch.as_tensor(s.cell[None], dtype=torch.float64, device=dev)
        syncs = "n/a (CPU)"
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    engine.step.run(x, cell, virial=True)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in caught)
        with HostReads() as reads:
            engine.step.run(x, cell, virial=True)
        table.add(name, syncs, reads.total, reads.report())
    table.notes.append("From positions on the device to the packed output (`Step.run`); "
                       "the upload before and the download after are not counted.")
