"""Beads per second: 32 beads of a 108-atom system through one `mlipd serve`.

Three ways to send the beads of one PIMD step, measured side by side on one server:

* one-at-a-time: one client, 32 sequential ``compute`` requests (one engine call each)
* concurrent:    32 clients (threads), one bead each, at once: the scheduler packs them
* batch op:      one client, one ``batch`` request of 32 structures

The ratio concurrent / one-at-a-time is what the batching scheduler buys.

    python benchmarks/bench_beads.py [--models lj reference chgnet] [--steps 5]

Writes benchmarks/results/beads.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from ase.build import bulk

from mlipd.client import Client
from mlipd.server.testing import running_server
from mlipd.types import Structure

NBEADS = 32  # --beads
RESULTS = Path(__file__).parent / "results"
SYSTEMS = {  # 108 atoms each: species the model knows
    "lj": lambda: bulk("Ar", "fcc", a=5.26, cubic=True).repeat(3),
    "reference": lambda: bulk("Ar", "fcc", a=5.26, cubic=True).repeat(3),
    "chgnet": lambda: bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3),
}
SMALL = {"chgnet": lambda: bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 4))}  # 64


def beads(model: str, *, small: bool = False) -> list[Structure]:
    rng = np.random.default_rng(0)
    out = []
    make = SMALL.get(model, SYSTEMS[model]) if small else SYSTEMS[model]
    for _ in range(NBEADS):
        atoms = make()
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        out.append(Structure.from_atoms(atoms))
    return out


def one_at_a_time(client: Client, structures) -> None:
    for s in structures:
        client.compute(s)


class Concurrent:
    """32 threads with a client each; ``step()`` releases them together and waits."""

    def __init__(self, address: str, structures) -> None:
        self.structures = structures
        self.start = threading.Barrier(NBEADS + 1)
        self.done = threading.Barrier(NBEADS + 1)
        self.stop = False
        self.threads = [threading.Thread(target=self._work, args=(address, k), daemon=True)
                        for k in range(NBEADS)]
        for t in self.threads:
            t.start()

    def _work(self, address: str, k: int) -> None:
        with Client(address, timeout_s=600) as c:
            while True:
                self.start.wait()
                if self.stop:
                    return
                c.compute(self.structures[k])
                self.done.wait()

    def step(self) -> None:
        self.start.wait()
        self.done.wait()

    def close(self) -> None:
        self.stop = True
        self.start.wait()
        for t in self.threads:
            t.join(timeout=30)


def measure(model: str, steps: int, tmp: Path, *, max_batch_atoms: int,
            small: bool = False) -> dict:
    structures = beads(model, small=small)
    with running_server(["--model", model, "--zmq", "tcp://127.0.0.1:0",
                         "--max-batch-atoms", str(max_batch_atoms)],
                        log=tmp / f"{model}.log") as srv, \
            Client(srv.address, timeout_s=600) as client:
        conc = Concurrent(srv.address, structures)
        try:
            ways = {"one-at-a-time": lambda: one_at_a_time(client, structures),
                    "concurrent": conc.step,
                    "batch op": lambda: client.batch(structures)}
            for way in ways.values():
                way()  # warm up
            times = {name: [] for name in ways}
            calls = {name: 0 for name in ways}
            for _ in range(steps):  # take turns, so a busy machine slows all alike
                for name, way in ways.items():
                    before = client.stats()["engine_calls"]
                    t0 = time.perf_counter()
                    way()
                    times[name].append(time.perf_counter() - t0)
                    calls[name] += client.stats()["engine_calls"] - before
        finally:
            conc.close()
    row = {"model": model, "atoms": structures[0].n_atoms, "max_batch_atoms": max_batch_atoms}
    for name in ways:
        t = float(np.median(times[name]))
        row[name] = {"beads_per_s": NBEADS / t, "step_s": t, "engine_calls_per_step":
                     calls[name] / steps}
    return row


def main(argv=None) -> int:
    global NBEADS  # the module's bead count, set once from --beads
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["lj", "reference", "chgnet"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--beads", type=int, default=NBEADS)
    p.add_argument("--small", action="store_true", help="64-atom chgnet system (CPU time)")
    p.add_argument("--out", default="beads.md", help="file name under benchmarks/results")
    p.add_argument("--max-batch-atoms", type=int, default=200_000,
                   help="server option; bounds the memory of one engine call")
    args = p.parse_args(argv)
    NBEADS = args.beads
    RESULTS.mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlipd-beads-") as tmp:
        for model in args.models:
            row = measure(model, args.steps, Path(tmp), max_batch_atoms=args.max_batch_atoms,
                          small=args.small)
            rows.append(row)
            one, conc = row["one-at-a-time"], row["concurrent"]
            print(f"{model:>10}: one-at-a-time {one['beads_per_s']:8.1f} beads/s, concurrent "
                  f"{conc['beads_per_s']:8.1f} ({conc['beads_per_s'] / one['beads_per_s']:.2f}x, "
                  f"{conc['engine_calls_per_step']:.1f} engine calls/step), batch op "
                  f"{row['batch op']['beads_per_s']:8.1f}", flush=True)
    lines = [f"# Beads per second: {NBEADS} beads, one `mlipd serve`, CPU (median of steps)", "",
             "| model | atoms | max batch atoms | one-at-a-time | concurrent (scheduler) | "
             "batch op | concurrent / one-at-a-time | engine calls per step (concurrent) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        one, conc, bat = r["one-at-a-time"], r["concurrent"], r["batch op"]
        lines.append(f"| {r['model']} | {r['atoms']} | {r['max_batch_atoms']} | "
                     f"{one['beads_per_s']:.3g} | "
                     f"{conc['beads_per_s']:.3g} | {bat['beads_per_s']:.3g} | "
                     f"{conc['beads_per_s'] / one['beads_per_s']:.2f} | "
                     f"{conc['engine_calls_per_step']:.1f} |")
    lines += ["", f"Machine: {os.cpu_count()} CPUs (shared), python {sys.version.split()[0]}, "
              f"load average at the end {os.getloadavg()[0]:.1f} (a shared box: "
              "ratios measured side by side, absolute times noisy)."]
    (RESULTS / args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
