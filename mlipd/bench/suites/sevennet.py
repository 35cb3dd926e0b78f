"""SevenNet-0 (pretrained, shipped in sevenn): mlipd against sevenn's own ASE calculator,
and mlipd's graph halo against spatial decomposition, SevenNet's own multi-GPU path.

* step: seconds per MD step (energy, forces, stress), the two contenders interleaved in
  one process on the same moving structure, warm-up excluded, float32 both;
* memory: each contender alone in a fresh process (``python -m
  mlipd.bench.suites.sevennet``): peak RSS on CPU, peak allocated on a GPU;
* halo: atoms a rank holds besides its own on the same RCB partition (``mlipd.bench.halo``):
  mlipd's halo (per layer), a spatial ghost shell of one cutoff (exchanged every
  layer, as SevenNet's LAMMPS-parallel model does) and of the receptive field
  n_layers x cutoff (no exchange between layers, the ghosts' messages recomputed).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from mlipd.bench.report import Report
from mlipd.bench.systems import Jiggle, oxide
from mlipd.bench.timing import interleaved

log = logging.getLogger(__name__)

REQUIRES = ("sevenn",)
DESCRIPTION = "SevenNet-0: mlipd vs sevenn's calculator (time, memory); halo vs ghost shell"
SIZES = {"tiny": (64,), "quick": (1000,), "full": (1000, 8000)}  # atoms of (Mn,Ni)O timed
HALO_SIZES = {"tiny": (64,), "quick": (1000, 8000), "full": (1000, 8000, 64_000)}
RANKS = (2, 4, 8)
REPEATS = {"tiny": 1, "quick": 3, "full": 5}
MODEL = "7net-0"


def _mlipd(device: str):
    from mlipd.engine.single_rank import SingleRankEngine
    from mlipd.models.sevennet import SevenNetModel

    engine = SingleRankEngine(SevenNetModel(MODEL), device=torch.device(device),
                              dtype=torch.float32)
    return lambda s: engine.compute([s], virial=True)


def _sevenn(device: str):
    from sevenn.calculator import SevenNetCalculator

    calc = SevenNetCalculator(MODEL, device=device)

    def step(s):
        from ase import Atoms

        atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
        calc.calculate(atoms, ["energy", "forces", "stress"])
        return calc.results

    return step


CONTENDERS = {"mlipd": _mlipd, "sevenn": _sevenn}


def run(report: Report, *, size: str, device: str) -> None:
    from mlipd.errors import SetupError
    from mlipd.models.caches import installed_version

    if installed_version("sevenn") is None:
        raise SetupError("the sevennet suite needs sevenn: pip install 'mlipd[sevennet]' "
                         "(scripts/setup.sh puts it in .venv-e3nn)")
    _timing(report, size=size, device=device)
    _halo(report, size=size)


def _timing(report: Report, *, size: str, device: str) -> None:
    table = report.table(
        f"SevenNet-0 ({MODEL}), float32, one MD step with stress: s per step, median "
        "(min-max); memory per contender in its own process",
        ["atoms", "mlipd s/step", "sevenn s/step", "sevenn / mlipd",
         "mlipd peak MiB", "sevenn peak MiB"])
    for n in SIZES[size]:
        md = Jiggle(oxide(n))
        steps = {name: make(device) for name, make in CONTENDERS.items()}
        t = interleaved({name: lambda k, f=f, m=md: f(m.structure(k))
                         for name, f in steps.items()},
                        repeats=REPEATS[size], label=f"sevennet, {n} atoms")
        del steps
        mem = {name: _peak_memory(name, n, device) for name in CONTENDERS}
        table.add(md.base.n_atoms, t["mlipd"].cell(), t["sevenn"].cell(),
                  f"{t['sevenn'].median / t['mlipd'].median:.2f}",
                  mem["mlipd"], mem["sevenn"])
    what = "peak allocated GPU memory" if device.startswith("cuda") else (
        "peak RSS of the whole process (Python, torch, the model)")
    table.notes.append(f"(Mn,Ni)O rocksalt rattled 0.05 Å, atoms moved ~0.01 Å per call; "
                       f"memory: {what}, after a warm-up and one step.")
    table.notes.append("sevenn's calculator is run as sevenn documents it, without a "
                       "tensor-product accelerator (cuEquivariance/FlashTP need CUDA).")


def _peak_memory(contender: str, n: int, device: str) -> str:
    cmd = [sys.executable, "-m", "mlipd.bench.suites.sevennet", "--contender", contender,
           "--atoms", str(n), "--device", device]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        log.error("%s: %s", " ".join(cmd), done.stderr[-2000:])
        return "failed"
    return f"{json.loads(done.stdout.splitlines()[-1])['peak_mib']:.0f}"


def _halo(report: Report, *, size: str) -> None:
    from mlipd.bench.halo import ghost_atoms, halo_atoms
    from mlipd.engine.partition import Geometry, partition_structure
    from mlipd.types import Structure

    cutoff, layers = 5.0, 5  # SevenNet-0: 5 Å, 5 interaction blocks
    table = report.table(
        f"Atoms a rank holds besides its own, RCB partition, (Mn,Ni)O: mlipd's halo vs a "
        f"spatial ghost shell of {cutoff:g} Å and of the receptive field {layers} x "
        f"{cutoff:g} = {layers * cutoff:g} Å (sum over ranks / max per rank)",
        ["atoms", "P", "mlipd halo", "ghosts 1 cutoff", f"ghosts {layers * cutoff:g} Å",
         "halo / atoms", f"ghosts {layers * cutoff:g} Å / halo"])
    for n in HALO_SIZES[size]:
        s = Structure.from_atoms(oxide(n))
        g = Geometry(s.positions, s.cell, s.pbc)
        for p in RANKS:
            owner = partition_structure(g, p, radius=cutoff)
            halo = halo_atoms(s, owner, cutoff=cutoff, ranks=p)
            near = ghost_atoms(s, owner, shell=cutoff, ranks=p)
            far = ghost_atoms(s, owner, shell=layers * cutoff, ranks=p)
            table.add(s.n_atoms, p, f"{halo.sum():,} / {halo.max():,}",
                      f"{near.sum():,} / {near.max():,}", f"{far.sum():,} / {far.max():,}",
                      f"{halo.sum() / s.n_atoms:.2f}", f"{far.sum() / max(halo.sum(), 1):.1f}")
    table.notes.append("mlipd's halo is exchanged before each of the 4 blocks that read "
                       "neighbours' features (block 0 reads species only); a halo atom is "
                       "one row whatever its periodic images. Ghosts count every periodic "
                       "image in the shell, as a spatial decomposition stores them.")


def _measure(contender: str, n: int, device: str) -> dict:
    """One contender alone: load, warm up, one step; peak memory of this process."""
    step = CONTENDERS[contender](device)
    md = Jiggle(oxide(n))
    step(md.structure(-1))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step(md.structure(0))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _peak_rss_mib()
    return {"contender": contender, "atoms": md.base.n_atoms, "step_s":
            time.perf_counter() - t0, "peak_mib": float(np.round(peak, 1))}


def _peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec. (getrusage's ru_maxrss
    does not: Linux keeps the parent's high-water mark across fork and exec, so a child of
    a large parent would report the parent's peak.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one contender's peak memory (JSON line)")
    ap.add_argument("--contender", choices=sorted(CONTENDERS), required=True)
    ap.add_argument("--atoms", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    sys.stdout.write(json.dumps(_measure(args.contender, args.atoms, args.device)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
