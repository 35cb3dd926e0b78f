"""CHGNet on CPU: step time and peak memory per rank, mlipd at P = 1, 2, 4 (gloo)
against the ``chgnet`` package's own ``CHGNetCalculator`` at P = 1, side by side.

System: (Mn,Ni)O rocksalt (a = 4.40 Å, rattled 0.08 Å), n = 8·k³ atoms. Everything
runs in float32 (the package's precision), one torch thread per process: P = 2 uses
both cores of a 2-core machine, P = 4 oversubscribes it (time per step then shows
the cost of the extra exchanges, not a speed-up). Every configuration runs in fresh
processes (``mlipd.testing.ranks.run_on_ranks``), so peak RSS (``ru_maxrss``) is
that configuration's own: model weights, torch, graph and activations.
A step = energy, forces and stress of one structure; mlipd's per-rank step is the
engine's ``RankStep.run`` (graph, model, autograd, halo gradients home), rebuilt
(neighbour list + partition + halo plan) before the first timed step only.

    python benchmarks/bench_chgnet.py [--sizes 1000 1728 8000] [--steps 2] [--no-package]

Writes benchmarks/results/chgnet_cpu.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk

from mlipd.malloc import keep_freed_memory
from mlipd.testing.ranks import run_on_ranks
from mlipd.types import Structure

RESULTS = Path(__file__).parent / "results"


def oxide(n_atoms: int, seed: int = 0):
    k = round((n_atoms / 8) ** (1 / 3))
    rng = np.random.default_rng(seed)
    atoms = bulk("MnO", "rocksalt", a=4.40, cubic=True).repeat((k, k, k))
    cations = np.flatnonzero(atoms.numbers == 25)
    atoms.numbers[rng.permutation(cations)[: len(cations) // 2]] = 28
    atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
    return atoms


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _mlipd_rank(rank, world_size, structure, steps, recompute):
    keep_freed_memory()
    from mlipd.engine.comm import Comm
    from mlipd.engine.local import for_inference
    from mlipd.engine.partition import Geometry, partition_batch
    from mlipd.engine.step import Frame, RankStep
    from mlipd.models.chgnet import CHGNetModel

    cpu = torch.device("cpu")
    model = for_inference(CHGNetModel(f"0.3.0,recompute={recompute}"), cpu, torch.float32)
    step = RankStep(model, Comm(), device=cpu, dtype=torch.float32, skin=0.0)
    owner = partition_batch([Geometry(structure.positions, structure.cell, structure.pbc)],
                            world_size, radius=model.spec.cutoff)
    frame = Frame(numbers=structure.numbers, positions=structure.positions,
                  cells=structure.cell[None], pbc=structure.pbc[None],
                  offsets=np.array([0, structure.n_atoms]), owner=owner)
    step.rebuild(frame)
    step.run(frame, virial=True)  # warm-up
    times, cpu = [], []
    for _ in range(steps):
        torch.distributed.barrier()
        t, c = time.perf_counter(), time.process_time()
        step.run(frame, virial=True)
        cpu.append(time.process_time() - c)
        torch.distributed.barrier()
        times.append(time.perf_counter() - t)
    return {"time": float(np.median(times)), "cpu": float(np.median(cpu)), "rss": _peak_mib(),
            "counters": model.counters}


def _package_rank(rank, world_size, structure, steps):
    keep_freed_memory()
    from chgnet.model.dynamics import CHGNetCalculator

    from mlipd.models.chgnet import load_chgnet

    atoms = structure.to_atoms()
    atoms.calc = CHGNetCalculator(model=load_chgnet(), use_device="cpu")
    times, cpu = [], []
    for k in range(steps + 1):  # the first call is the warm-up
        atoms.calc.reset()
        t, c = time.perf_counter(), time.process_time()
        atoms.get_forces()
        atoms.get_stress()
        if k:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return {"time": float(np.median(times)), "cpu": float(np.median(cpu)), "rss": _peak_mib()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 1728])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=2,
                    help="timed steps (median); one above --many-steps-max atoms")
    ap.add_argument("--many-steps-max", type=int, default=10000)
    ap.add_argument("--recompute", nargs="+", default=["0", "1"], choices=["0", "1"],
                    help="CHGNet's recompute option: 0 stores activations, 1 recomputes")
    ap.add_argument("--malloc", choices=["keep", "default"], default="keep",
                    help="keep: mlipd.malloc.keep_freed_memory() in every process (what "
                    "mlipd's processes do; faster, more memory); default: glibc's default")
    ap.add_argument("--out", default="chgnet_cpu.md", help="table file in results/")
    ap.add_argument("--stored-max", type=int, default=8000,
                    help="largest size run with recompute=0 (~1.5 MiB/atom in float32)")
    ap.add_argument("--no-package", action="store_true", help="skip the chgnet calculator")
    ap.add_argument("--package-max", type=int, default=1000,
                    help="largest size for the chgnet calculator (its peak RSS is ~12 MiB/atom)")
    args = ap.parse_args(argv)
    # read by keep_freed_memory() in the spawned processes
    os.environ["MLIPD_KEEP_FREED_MEMORY"] = "1" if args.malloc == "keep" else "0"

    rows = []
    for n in args.sizes:
        s = Structure.from_atoms(oxide(n))
        steps = args.steps if s.n_atoms <= args.many_steps_max else 1
        pkg = None
        if not args.no_package and s.n_atoms <= args.package_max:
            (pkg,) = run_on_ranks(_package_rank, 1, s, steps, timeout_s=3600)
            print(f"{s.n_atoms:6d} atoms  chgnet calculator      {pkg['time']:8.2f} s  "
                  f"cpu {pkg['cpu']:8.2f} s  {pkg['rss']:7.0f} MiB", flush=True)
        for mode in args.recompute:
            if mode == "0" and s.n_atoms > args.stored_max:
                continue
            row = {"n": s.n_atoms, "mode": mode, "package": pkg, "steps": steps}
            for p in args.ranks:
                out = run_on_ranks(_mlipd_rank, p, s, steps, mode, timeout_s=3600)
                row[p] = {"time": max(o["time"] for o in out),
                          "rss": max(o["rss"] for o in out),
                          "cpu": max(o["cpu"] for o in out),
                          "halo": max(o["counters"]["halo_atoms"] for o in out),
                          "owned": max(o["counters"]["atoms"] for o in out),
                          "atom_rows": max(o["counters"]["atom_rows_received"] for o in out),
                          "bond_rows": max(o["counters"]["bond_rows_received"] for o in out)}
                q = row[p]
                print(f"{s.n_atoms:6d} atoms  recompute={mode} P={p}  {q['time']:8.2f} s  "
                      f"cpu {q['cpu']:8.2f} s  {q['rss']:7.0f} MiB/rank  "
                      f"(max owned {q['owned']}, max halo {q['halo']})", flush=True)
            rows.append(row)
            # after every row: a size that runs out of memory keeps the rows before it
            write_table(rows, args, sys.argv[1:] if argv is None else argv)
    return 0


def write_table(rows, args, argv_text) -> None:
    ranks = args.ranks
    head = ["atoms", "recompute", "steps"]
    if not args.no_package:
        head += ["chgnet calc s/step (cpu s)", "calc peak MiB"]
    for p in ranks:
        head += [f"mlipd P={p} s/step (cpu s/rank)", f"P={p} peak MiB/rank",
                 f"P={p} max halo/owned", f"P={p} rows received: atom, bond"]
    if not args.no_package:
        head += [f"calc / mlipd P={p} (wall, cpu/rank)" for p in ranks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["n"]), r["mode"], str(r["steps"])]
        pkg = r.get("package")
        if not args.no_package:
            cells += ([f"{pkg['time']:.2f} ({pkg['cpu']:.2f})", f"{pkg['rss']:.0f}"] if pkg
                      else ["-", "-"])
        for p in ranks:
            q = r[p]
            cells += [f"{q['time']:.2f} ({q['cpu']:.2f})", f"{q['rss']:.0f}",
                      f"{q['halo']}/{q['owned']}", f"{q['atom_rows']}, {q['bond_rows']}"]
        if not args.no_package:
            cells += [f"{pkg['time'] / r[p]['time']:.2f}x, {pkg['cpu'] / r[p]['cpu']:.2f}x"
                      if pkg else "-" for p in ranks]
        lines.append("| " + " | ".join(cells) + " |")
    text = (
        "# CHGNet on CPU: mlipd vs the chgnet package\n\n"
        f"`python benchmarks/bench_chgnet.py {' '.join(argv_text)}`. "
        "float32, 1 torch thread per process, median of "
        "`steps` timed steps after a warm-up; (Mn,Ni)O rocksalt. recompute=1 is CHGNet's "
        "activation checkpointing (`chgnet:,recompute=1`), 0 stores activations; the "
        "calculator columns repeat on both rows. s/step is energy + forces + "
        "stress of one structure (for P > 1 the slowest rank, between barriers); cpu s is "
        "the process CPU time of that step (the slowest rank's), which the other work on "
        "the machine does not inflate as much as wall time. Rows received: feature rows "
        "that arrived at the busiest rank in one forward (atom halo; CHGNet's bond "
        "traffic, see mlipd/models/chgnet_comm.py), 64 floats each. Peak MiB "
        "is each process's maximum RSS (model, torch and the step). malloc: "
        + ("every process, the package's included, runs with "
           "`mlipd.malloc.keep_freed_memory()` (as mlipd's own processes do). "
           if args.malloc == "keep" else
           "glibc's default (`--malloc default`, i.e. `MLIPD_KEEP_FREED_MEMORY=0`). ")
        + f"Machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end "
        "(other work shares the cores: with a load above the core count, P > 1 cannot "
        "get its cores and times are noisy).\n\n"
        + "\n".join(lines) + "\n"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
