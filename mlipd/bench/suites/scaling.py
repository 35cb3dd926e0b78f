"""Scaling: one structure partitioned over P ranks (``DistributedEngine``): step time,
peak memory per rank and halo rows per rank at P = 1, 2, 4 on CPU (gloo); on a GPU,
P ranks sharing it (gloo, rows staged through the host) and, with several GPUs, one
rank per GPU (NCCL).

Every configuration is a ``DistributedEngine`` in a process of its own
(``workers.Worker``), so rank 0's peak and every rank's are that configuration's own:
on CPU all alive at once and called in turn (interleaved, one warm-up); on a GPU one
after the other (together they would not fit in its memory). Memory per rank on
CPU is each rank process's peak resident set; on CUDA, rank 0's peak allocation and,
where NVML is available, what each rank process holds on the GPU at the end.
Steps are MD steps (lists reused within the skin); rank processes and rank 0 use
mlipd's malloc tuning, as ``mlipd serve`` does.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

from mlipd.bench import workers
from mlipd.bench.report import Report
from mlipd.bench.systems import Jiggle, oxide, silicon
from mlipd.bench.timing import ContenderFailed, Deadline, Timing, interleaved
from mlipd.bench.workers import Worker, setup_all
from mlipd.bench.zoo import make_case

REQUIRES = ("chgnet", "mace")
DESCRIPTION = "P ranks: step time, peak memory per rank, halo rows per rank"
BUDGET_S = {"tiny": 150.0, "quick": 60.0, "full": 2 * 3600.0}
GPU_BUDGET_S = {"full": 90.0}  # one GPU session: all suites in ~9 min
CASES = {  # (model, structure, atoms)
    "cpu": {"tiny": [("reference", "silicon", 216)],
            "quick": [("chgnet", "oxide", 216)],
            "full": [("chgnet", "oxide", 4096), ("mace", "oxide", 2000),
                     ("tensornet", "oxide", 8000), ("esen", "oxide", 2000),
                     ("reference", "silicon", 8000)]},
    "cuda": {"tiny": [("reference", "silicon", 216)],
             "quick": [("chgnet", "oxide", 4096), ("reference", "silicon", 32768)],
             "full": [("chgnet", "oxide", 32768), ("mace", "oxide", 8000)]},
}
RANKS = (1, 2, 4)
REPEATS = {"tiny": 3, "quick": 3, "full": 5}
SCALE = {"tiny": "small", "quick": "small", "full": "large"}
STRUCTURES = {"oxide": oxide, "silicon": silicon}
MIB = 2**20


class Partitioned:
    """A ``DistributedEngine`` on one structure, run in a worker; ``inspect`` reports
    per-rank statistics of the last step and per-rank memory since set-up."""

    def __init__(self, spec: str, structure: str, n_atoms: int, ranks: int, backend: str,
                 shared: bool, threads: int, *, device: str) -> None:
        import torch

        from mlipd.engine.distributed import DistributedEngine
        from mlipd.malloc import keep_freed_memory

        keep_freed_memory()
        self.device = device
        self.engine = DistributedEngine(
            spec, device=device, devices=[device] * ranks if shared else None,
            backend=backend, ranks=ranks, dtype=torch.float32, threads_per_rank=threads)
        self.md = Jiggle(STRUCTURES[structure](n_atoms))
        self.first_s: float | None = None
        self.pids = [os.getpid(), *(c.pid for c in mp.active_children())]
        self.baseline = [workers.rss_bytes(p) for p in self.pids]
        for p in self.pids:  # peaks from here on (Linux; lifetime peaks elsewhere)
            try:
                with open(f"/proc/{p}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def __call__(self, k: int) -> None:
        t0 = time.perf_counter()
        self.engine.compute([self.md.structure(k)], virial=True)
        if self.first_s is None:  # partition, lists and halo plan built in this call
            self.first_s = time.perf_counter() - t0

    def inspect(self) -> dict:
        import torch

        stats = self.engine.last_stats
        out = {"halo": stats[:, 2].tolist(), "edges": stats[:, 1].tolist(),
               "first_s": self.first_s,
               "peak": [workers.peak_rss_bytes(p) for p in self.pids],
               "baseline": self.baseline}
        if self.device.startswith("cuda"):
            out["gpu_peak_rank0"] = int(torch.cuda.max_memory_allocated())
            out["gpu_held"] = _nvml_used(self.pids)
        return out


def _nvml_used(pids: list[int]) -> list[int] | None:
    """Bytes each process holds on any GPU (NVML), or None without pynvml."""
    try:
        import pynvml

        pynvml.nvmlInit()
        used: dict[int, int] = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                used[proc.pid] = used.get(proc.pid, 0) + (proc.usedGpuMemory or 0)
        return [used.get(p, 0) for p in pids]
    except Exception:  # noqa: BLE001 - NVML is optional: no column then
        return None


def configurations(device: str) -> dict[str, tuple[int, str, bool]]:
    """{label: (ranks, backend, ranks share one device)}."""
    if not device.startswith("cuda"):
        return {f"P={p}": (p, "gloo", False) for p in RANKS}
    import torch

    out = {f"P={p} sharing the GPU (gloo)": (p, "gloo", True) for p in RANKS}
    for p in RANKS[1:]:
        if p <= torch.cuda.device_count():
            out[f"P={p}, one GPU each (NCCL)"] = (p, "nccl", False)
    return out


def run(report: Report, *, size: str, device: str) -> None:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    table = report.table(
        "Step time and memory per rank vs P (float32, MD steps), median (min-max)",
        ["model", "atoms", "ranks", "s/step", "P=1 / this", "first call s",
         "peak MiB/rank (max)",
         "step MiB/rank (max)", "halo atoms/rank max (mean)", "edges/rank max/mean"])
    times = report.plot("Scaling: step time vs ranks", "ranks", "s per step")
    memory = report.plot("Scaling: step memory per rank (max) vs ranks", "ranks", "MiB")
    workdir = Path(tempfile.mkdtemp(prefix="mlipd-bench-scaling-"))
    try:
        for (model, structure, n), deadline in report.deadline.shares(CASES[kind][size]):
            if report.deadline.passed:
                table.notes.append(f"{model}: not run (the suite's deadline had passed)")
                continue
            if model == "reference":  # mlipd's own cheap message-passing model
                spec = "reference"
                table.notes.append("reference: mlipd's reference message passing model "
                                   "(3 layers, cutoff 5 Å)")
            else:
                try:
                    case = make_case(model, scale=SCALE[size], workdir=workdir)
                except ImportError as e:
                    table.notes.append(f"{model}: not run ({e})")
                    continue
                spec = case.spec
                table.notes.append(f"{model}: {case.description}")
            _one(report, table, times, memory, spec, structure, n, device=device, size=size,
                 deadline=deadline)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cores = os.cpu_count() or 1
    table.notes += [
        "first call: the warm-up step, in which the partition, neighbour lists and halo "
        "plan are built (later steps reuse them).",
        "peak MiB/rank: the largest peak resident set among the ranks (rank 0 included); "
        "step MiB/rank: the largest (peak - resident set after start-up).",
        f"Threads: {report.threads or 'cores / P'} per rank on this {cores}-core machine: "
        "where P x threads exceeds the cores, ranks time-share them and step times show "
        "the cost of partitioning, not a speed-up.",
    ]
    if kind == "cuda":
        table.notes.append("On CUDA the memory columns are rank 0's peak allocation and, "
                           "with NVML, the most any rank process holds on a GPU at the end.")


def _one(report: Report, table, times, memory, spec: str, structure: str, n: int, *,
         device: str, size: str, deadline: Deadline) -> None:
    model = spec.split(":")[0]
    atoms = len(STRUCTURES[structure](n))
    configs = configurations(device)
    cores = os.cpu_count() or 1
    threads = {label: report.threads or max(1, cores // p) for label, (p, _, _) in configs.items()}
    recipes = {label: functools.partial(Partitioned, spec, structure, atoms, p, backend, shared,
                                        threads[label])
               for label, (p, backend, shared) in configs.items()}
    # CPU: every configuration alive, called in turn. GPU: one after the other (all of them
    # at once would not fit in its memory), each process gone before the next starts
    groups = [list(configs)] if not device.startswith("cuda") else [[c] for c in configs]
    results: dict[str, tuple] = {}
    for group in groups:
        if deadline.passed and results:
            break
        ws = {label: Worker(f"scaling-{model}-{label}", device=device, daemon=False,
                            threads=threads[label]) for label in group}
        try:
            failed = setup_all({w: (recipes[label],) for label, w in ws.items()},
                               timeout=max(120.0, deadline.left()))
            alive = {label: w for label, w in ws.items() if w not in failed}
            results.update({label: (failed[w], None) for label, w in ws.items() if w in failed})
            t = interleaved(alive, warmup=1, repeats=REPEATS[size], deadline=deadline,
                            label=f"{model}, {atoms} atoms")
            for label, w in alive.items():
                try:
                    results[label] = (t[label], w.inspect())
                except ContenderFailed as e:
                    results[label] = (str(e), None)
        finally:
            for w in ws.values():
                w.close()
    ref = results.get(next(iter(configs)), (None,))[0]
    tc, mc = times.curve(f"{model} {atoms}"), memory.curve(f"{model} {atoms}")
    for label in configs:
        timing, info = results.get(label, ("not run (the suite's deadline)", None))
        if info is None:
            table.add(model, atoms, label, timing, "-", "-", "-", "-", "-", "-")
            continue
        peak, step = _memory(info)
        halo, edges = info["halo"], info["edges"]
        mean_edges = sum(edges) / len(edges)
        table.add(model, atoms, label, timing.cell(),
                  timing.ratio(ref) if isinstance(ref, Timing) else "-",
                  f"{info['first_s']:.2f}", f"{peak / MIB:.0f}", f"{step / MIB:.0f}",
                  f"{max(halo):.0f} ({sum(halo) / len(halo):.0f})",
                  f"{max(edges) / mean_edges:.3f}" if mean_edges else "-")
        if timing.ok and configs[label][1] != "nccl":
            tc.add(configs[label][0], timing.median)
            mc.add(configs[label][0], step / MIB)


def _memory(info: dict) -> tuple[float, float]:
    """(peak, step) bytes of the rank that needs the most."""
    if "gpu_peak_rank0" in info:
        held = info.get("gpu_held")
        peak = max(held) if held else info["gpu_peak_rank0"]
        return peak, info["gpu_peak_rank0"]
    steps = [max(0, a - b) for a, b in zip(info["peak"], info["baseline"], strict=True)]
    return max(info["peak"]), max(steps)
