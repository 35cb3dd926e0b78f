"""MACE memory and step time: mlipd (activations stored, recomputed, recomputed with edge
chunks) against mace's own ``MACECalculator``, same model object, same structure, float32.

Each contender lives in its own process (spawned), so its peak memory is its own: the
peak resident set (CPU; ``ru_maxrss``) or ``torch.cuda.max_memory_allocated`` (GPU),
minus what the process held before its first step. The processes take MD-like steps in
turn (interleaved, one warm-up step each, excluded), and between steps give freed heap
memory back to the system (``malloc_trim``) so that idle contenders do not crowd the
machine. A contender that runs out of memory (each process is capped below the
machine's free memory) is reported as such; the others go on.

Like for like: MACECalculator builds its graph at every call; every mlipd contender is
timed twice at each step, in the same process: its MD step (neighbour list reused within
the 0.5 Å skin, what ``mlipd drive`` does) and a call that rebuilds its list and topology
(``skin=0``, the package's graph work). Both columns are in the table, as in the
``latency`` suite; memory is the peak over both.

Model (``full`` and ``quick``): the random ScaleShiftMACE of issue 12 (128x0e+128x1o,
max_ell 3, correlation 3, 2 residual interactions, r_max 6 Å, ~700k parameters);
``tiny`` uses 8x0e+8x1o, max_ell 2, correlation 2, r_max 4.5 Å. Structure: (Mn,Ni)O
rocksalt (``mlipd.bench.systems.oxide``), ~83 neighbours per atom within 6 Å.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import mlipd.models.mace  # noqa: F401  (mace before e3nn, see the adapter)
from mlipd.bench.report import Report
from mlipd.bench.timing import Timing

REQUIRES = ("mace",)
BUDGET_S = {"tiny": 240.0, "quick": 900.0, "full": 7200.0}
DESCRIPTION = ("MACE peak memory per atom and step time: mlipd stored/recomputed/chunked vs "
               "MACECalculator")
SIZES = {"tiny": [64], "quick": [216], "full": [1000, 2000, 8000]}
REPEATS = {"tiny": 1, "quick": 3, "full": 3}
CONTENDERS = {  # name -> mlipd options (None: MACECalculator)
    "MACECalculator": None,
    "mlipd stored": "recompute=0,chunk=0",
    "mlipd chunked": "recompute=0,chunk=auto",
    "mlipd recomputed": "recompute=1,chunk=0",
    "mlipd recomputed+chunked": "recompute=1,chunk=auto",
}
STEP_TIMEOUT_S = 3600.0


def build_model(size: str) -> torch.nn.Module:
    """The suite's random ScaleShiftMACE, float32 (see the module docstring)."""
    import numpy as np
    from e3nn import o3  # after mlipd.models.mace (imported above): mace before e3nn
    from mace import modules

    small = size == "tiny"
    torch.manual_seed(0)
    z = [8, 12, 14, 25, 28]
    residual = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    prior = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = modules.ScaleShiftMACE(
            r_max=4.5 if small else 6.0, num_bessel=10, num_polynomial_cutoff=5,
            max_ell=2 if small else 3, interaction_cls=residual, interaction_cls_first=residual,
            num_interactions=2, num_elements=len(z),
            hidden_irreps=o3.Irreps("8x0e+8x1o" if small else "128x0e+128x1o"),
            MLP_irreps=o3.Irreps("16x0e"), gate=torch.nn.functional.silu,
            atomic_energies=np.array([-1.0, -2.0, -3.0, -4.0, -5.0]), avg_num_neighbors=40.0,
            atomic_numbers=z, correlation=2 if small else 3, pair_repulsion=False,
            atomic_inter_scale=1.0, atomic_inter_shift=0.0)
    finally:
        torch.set_default_dtype(prior)
    return model.float().eval()


@dataclass(frozen=True)
class Job:
    """What a contender's process needs."""

    model_path: str
    options: str | None
    n_atoms: int
    device: str
    threads: int
    memory_cap: int | None  # bytes of address space, CPU only


def run(report: Report, *, size: str, device: str) -> None:
    dev = torch.device(device)
    table = report.table(
        "MACE, float32: peak memory of a step per atom and step time (median (min-max) of "
        f"{REPEATS[size]} MD-like steps after one warm-up, contenders interleaved)",
        ["atoms", "edges", "contender", "MiB per atom", "s per MD step (list reused)",
         "s per call rebuilding (package: always)", "memory / package",
         "time rebuilding / package", "time MD step / package"])
    mem_plot = report.plot("MACE peak memory per atom", "atoms", "MiB per atom")
    time_plot = report.plot("MACE step time", "atoms", "s per step")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mace.model"
        torch.save(build_model(size), path)
        package = None  # (atoms, bytes per atom) of the package's largest measured size
        for n in SIZES[size]:
            if report.deadline.passed:
                table.notes.append(f"{n} atoms and beyond: not run (the suite's deadline)")
                break
            rows = _measure(str(path), n, size=size, dev=dev)
            _add_rows(table, n, rows, package)
            ref = rows.get("MACECalculator")
            if ref is not None and ref[4] is None:
                package = (n, ref[1] / n)
            for name, (_, mem, md, rebuilding, err) in rows.items():
                if err is None:
                    _point(mem_plot, name, n, mem / n / 2**20)
                    _point(time_plot, f"{name}, rebuilding" if md else name, n,
                           rebuilding.median)
                    if md is not None:
                        _point(time_plot, f"{name}, MD step", n, md.median)
    table.notes += [
        "MD step: mlipd's neighbour list is built once and reused while atoms move less "
        "than half the 0.5 Å skin (what a warm `mlipd drive` step does); rebuilding: a "
        "fresh list and topology every call (skin=0), as MACECalculator builds its graph "
        "every call. Each mlipd process takes both kinds of step in turn.",
        "Memory: the process's peak resident set during its steps minus its resident set "
        "before them (GPU: torch.cuda.max_memory_allocated), divided by the atoms.",
        "mlipd stored: recompute=0,chunk=0 (activations stored, all edges at once); chunked: "
        "chunk=auto (receivers' edges, messages and products a range of rows at a time: on "
        "a CPU ~1,200 edges, on a GPU ~256 MiB of per-edge tensors); recomputed: "
        "recompute=1 (activation checkpointing: pieces run again in backward). Goal "
        "(issue 12): memory <= 0.5x the package at <= 1.5x its time.",
        "Every process runs glibc's default malloc (mlipd drive/serve raise its mmap "
        "threshold, see mlipd/malloc.py; set MLIPD_KEEP_FREED_MEMORY=0 for memory-bound "
        "runs).",
        f"Load: {_loads()} (other sessions share this machine; steps are interleaved so "
        "a load change hits every contender alike).",
    ]


def _point(plot, name: str, x: float, y: float) -> None:
    from mlipd.bench.report import Curve

    curve = next((c for c in plot.curves if c.label == name), None)
    if curve is None:
        curve = Curve(name, [], [])
        plot.curves.append(curve)
    curve.x.append(x)
    curve.y.append(y)


def _loads() -> str:
    try:
        return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        return "unknown"


def _add_rows(table, n: int, rows: dict, package: tuple[int, float] | None) -> None:
    """One row per contender; ratios against the package at the same size, or, where the
    package could not run, memory against its per-atom memory at its largest measured
    size (marked: activations grow with the edges, so per atom it stays about flat)."""
    ref = rows.get("MACECalculator")
    measured = ref is not None and ref[4] is None
    for name, (edges, mem, md, rebuilding, err) in rows.items():
        if err is not None:
            table.add(n, edges or "-", name, err, "-", "-", "-", "-", "-")
            continue
        mem_ratio = rebuild_ratio = md_ratio = "-"
        if measured and name != "MACECalculator":
            mem_ratio = f"{mem / ref[1]:.2f}"
            rebuild_ratio = f"{rebuilding.median / ref[3].median:.2f}"
            md_ratio = f"{md.median / ref[3].median:.2f}"
        elif package is not None and name != "MACECalculator":
            mem_ratio = f"{mem / n / package[1]:.2f} (vs its MiB/atom at {package[0]})"
        table.add(n, edges, name, f"{mem / n / 2**20:.3f}", md.cell() if md else "-",
                  rebuilding.cell(), mem_ratio, rebuild_ratio, md_ratio)


def _predicted_bytes(name: str, model: torch.nn.Module, n_edges: int) -> int:
    """A contender's activations by estimate (``mace_memory``; this suite's `MiB per
    atom` column is the measurement to compare with): all of them stored, one
    interaction's at a time (recomputed), or one chunk's (recomputed+chunked: small)."""
    from mlipd.models.mace_memory import edge_floats, stored_activation_bytes

    if CONTENDERS[name] is None or "recompute=0" in CONTENDERS[name]:
        return stored_activation_bytes(model, n_edges, torch.float32)
    if "chunk=0" in CONTENDERS[name]:
        return int(1.2 * 4 * n_edges * max(edge_floats(model)))
    return 0


def _too_big(model_path: str, n: int, dev: torch.device) -> dict[str, str]:
    """Contenders whose estimated memory exceeds 80% of what the device has free now:
    skipped with a note (on a shared machine, running them would only end in its OOM
    killer or in swapping for everyone)."""
    from mlipd.bench.systems import oxide
    from mlipd.engine.neighbors import neighbor_list
    from mlipd.memory import available_bytes
    from mlipd.types import Structure

    free = available_bytes(dev)
    if free is None:
        return {}
    model = torch.load(model_path, map_location="cpu", weights_only=False)
    edges = len(neighbor_list(Structure.from_atoms(oxide(n)), float(model.r_max)))
    out = {}
    for name in CONTENDERS:
        need = _predicted_bytes(name, model, edges)
        if need > 0.8 * free:
            out[name] = (f"skipped: needs ~{need / 2**30:.0f} GiB by estimate, "
                         f"{free / 2**30:.0f} GiB free")
    return out


def _measure(model_path: str, n: int, *, size: str, dev: torch.device) -> dict:
    """{contender: (edges, peak bytes, MD step Timing (None for the package), rebuilding
    Timing, error or None)} for ``n`` atoms."""
    ctx = mp.get_context("spawn")
    cap = _memory_cap(len(CONTENDERS)) if dev.type == "cpu" else None
    errors: dict[str, str] = _too_big(model_path, n, dev)
    workers = {}
    for name, options in CONTENDERS.items():
        if name in errors:
            continue
        parent, child = ctx.Pipe()
        job = Job(model_path, options, n, str(dev), torch.get_num_threads(), cap)
        proc = ctx.Process(target=_worker, args=(child, job), daemon=True, name=f"bench-{name}")
        proc.start()
        workers[name] = (proc, parent)
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    md_times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    edges: dict[str, int] = {}
    try:
        for k in range(-1, REPEATS[size]):  # k = -1: the warm-up step
            for name, (_, conn) in workers.items():
                if name in errors:
                    continue
                reply = _ask(conn, ("step", k))
                if reply[0] == "error":
                    errors[name] = reply[1]
                elif k >= 0:
                    times[name].append(reply[1])
                    if reply[3] is not None:
                        md_times[name].append(reply[3])
                    edges[name] = reply[2]
        out = {}
        for name in CONTENDERS:
            if name in errors:
                out[name] = (edges.get(name), None, None, None, errors[name])
                continue
            reply = _ask(workers[name][1], ("peak", 0))
            md = Timing(tuple(md_times[name])) if md_times[name] else None
            out[name] = (edges[name], reply[1], md, Timing(tuple(times[name])), None)
        return out
    finally:
        for proc, conn in workers.values():
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("stop", 0))
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _ask(conn, message) -> tuple:
    try:
        conn.send(message)
        if not conn.poll(STEP_TIMEOUT_S):
            return ("error", f"no reply in {STEP_TIMEOUT_S:.0f} s")
        return conn.recv()
    except (EOFError, OSError, BrokenPipeError):
        return ("error", "process died (out of memory?)")


def _memory_cap(n_processes: int) -> int | None:
    """Address-space cap per process: its share-free view of the machine's available
    memory plus room for libraries' mappings, so a contender that needs more fails with
    an error instead of waking the kernel's OOM killer."""
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    idle = 1 << 30  # what each idle contender keeps resident (interpreter, torch, model)
    return int(kb * 1024 * 0.85) - (n_processes - 1) * idle + (8 << 30)


def _worker(conn, job: Job) -> None:
    """One contender's process: set up, then answer ("step", k) / ("peak", 0) / ("stop", 0).
    A step's reply: ("step", seconds rebuilding (the package: its call), edges, seconds of
    the MD step or None)."""
    import resource

    if job.memory_cap is not None:
        resource.setrlimit(resource.RLIMIT_AS, (job.memory_cap, job.memory_cap))
    torch.set_num_threads(job.threads)
    try:
        step, md_step, edges = _setup(job)
    except Exception as e:  # noqa: BLE001 - reported as the contender's result
        conn.send(("error", f"set-up failed: {type(e).__name__}: {e}"))
        return
    baseline = _rss()
    dev = torch.device(job.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    while True:
        cmd, k = conn.recv()
        if cmd == "stop":
            return
        if cmd == "peak":
            peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline)
            conn.send(("peak", peak))
            continue
        try:
            seconds = [_timed(step, k, dev)]
            if md_step is not None:
                seconds.append(_timed(md_step, k, dev))
            conn.send(("step", seconds[0], edges(), seconds[1] if md_step else None))
        except (RuntimeError, MemoryError) as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            conn.send(("error", "out of memory" if "alloc" in text.lower() or isinstance(
                e, MemoryError) else f"{type(e).__name__}: {text[:120]}"))
            return
        _trim()


def _timed(step, k: int, dev: torch.device) -> float:
    t0 = time.perf_counter()
    step(k)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def _setup(job: Job):
    """(step(k) rebuilding its graph, MD step(k) reusing its list or None, edges()) for
    the job's contender."""
    from mlipd.bench.systems import Jiggle, oxide

    md = Jiggle(oxide(job.n_atoms))
    model = torch.load(job.model_path, map_location="cpu", weights_only=False)
    if job.options is None:
        from ase import Atoms
        from mace.calculators import MACECalculator

        calc = MACECalculator(models=model, device=job.device, default_dtype="float32")
        last = {"edges": 0}

        def package_step(k: int) -> None:
            s = md.structure(k)
            atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
            calc.calculate(atoms, ["energy", "forces", "stress"], ["positions"])

        def package_edges() -> int:
            from mlipd.engine.neighbors import neighbor_list

            if not last["edges"]:
                last["edges"] = len(neighbor_list(md.base, float(model.r_max)))
            return last["edges"]

        return package_step, None, package_edges
    from mlipd.bench.contenders import MD_SKIN
    from mlipd.engine.single_rank import SingleRankEngine
    from mlipd.models.mace import MaceModel

    def engine(skin: float) -> SingleRankEngine:
        return SingleRankEngine(MaceModel(f"{job.model_path},{job.options}"),
                                device=job.device, dtype=torch.float32, skin=skin)

    rebuilding, md_step = engine(0.0), engine(MD_SKIN)
    return ((lambda k: rebuilding.compute([md.structure(k)])),
            (lambda k: md_step.compute([md.structure(k)])),
            (lambda: int(rebuilding.last_stats[0, 1])))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name is not None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)
