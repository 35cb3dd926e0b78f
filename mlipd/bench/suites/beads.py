"""Beads: one path-integral MD step's beads (32 x 64-atom Si at full size), CHGNet.

Engine table, in this process, interleaved step by step (every step moves each bead
~0.005 Å, so lists may be reused): mlipd's engine with all beads in one call (MD step:
lists reused; and rebuilding every call, the package's graph work), mlipd one call per
bead, the package's own batched path (``CHGNet.predict_structure`` on a list, with
``batch_size`` = beads, from ASE atoms: the conversion is part of its step) and its
calculator bead by bead.

Server table (``mlipd serve`` in a subprocess, the same beads): one client sending
them one at a time, one client per bead at once (the batching scheduler packs them),
and one ``batch`` request.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from mlipd.bench import contenders
from mlipd.bench.report import Report
from mlipd.bench.systems import silicon
from mlipd.bench.timing import interleaved
from mlipd.bench.zoo import make_case, package_calculator, package_efs
from mlipd.types import Structure

REQUIRES = ("chgnet",)
DESCRIPTION = "beads per second: batched vs one by one vs the package's batched path"
BUDGET_S = {"tiny": 120.0, "quick": 40.0, "full": 1800.0}
GPU_BUDGET_S = {"full": 25.0}  # one GPU session: all suites in ~9 min
BEADS = {"tiny": 2, "quick": 4, "full": 32}
ATOMS = {"tiny": 8, "quick": 64, "full": 64}
REPEATS = {"tiny": 3, "quick": 3, "full": 10}


class Beads:
    """``n`` beads of one structure (each rattled 0.05 Å once), jiggled ~0.005 Å per step."""

    def __init__(self, n: int, atoms_per_bead: int) -> None:
        rng = np.random.default_rng(0)
        base = silicon(atoms_per_bead)
        self.atoms = []
        for _ in range(n):
            a = base.copy()
            a.positions += rng.normal(scale=0.05, size=a.positions.shape)
            self.atoms.append(a)

    def step(self, k: int) -> list:
        rng = np.random.default_rng([7, k + 2**20])
        out = []
        for a in self.atoms:
            b = a.copy()
            b.positions += rng.normal(scale=0.005, size=b.positions.shape)
            out.append(b)
        return out

    def structures(self, k: int) -> list[Structure]:
        return [Structure.from_atoms(a) for a in self.step(k)]


def run(report: Report, *, size: str, device: str) -> None:
    nb, n = BEADS[size], ATOMS[size]
    beads = Beads(nb, n)
    n = len(beads.atoms[0])
    with tempfile.TemporaryDirectory(prefix="mlipd-bench-beads-") as tmp:
        case = make_case("chgnet", scale="small", workdir=Path(tmp))
        _engine_table(report, beads, case, size=size, device=device)
        if report.deadline.passed:
            report.note("server table not run: the suite's deadline had passed")
            return
        _server_table(report, beads, size=size, device=device, tmp=Path(tmp))
    report.note(f"{nb} beads of {n}-atom diamond Si, CHGNet 0.3.0, float32")


def _engine_table(report: Report, beads: Beads, case, *, size: str, device: str) -> None:
    from chgnet.model.model import CHGNet
    from pymatgen.io.ase import AseAtomsAdaptor

    nb = len(beads.atoms)
    md = contenders.engine(case, skin=contenders.MD_SKIN, device=device)
    rebuild = contenders.engine(case, skin=0.0, device=device)
    single = contenders.engine(case, skin=contenders.MD_SKIN, device=device)
    calc = package_calculator(case, device)
    model: CHGNet = calc.model

    def package_batched(k: int) -> None:
        structures = [AseAtomsAdaptor.get_structure(a) for a in beads.step(k)]
        model.predict_structure(structures, task="efs", batch_size=nb)

    calls = {
        "mlipd batched, MD step": lambda k: md.compute(beads.structures(k)),
        "mlipd batched, rebuilding": lambda k: rebuild.compute(beads.structures(k)),
        "mlipd one by one, MD step": lambda k: [single.compute([s])
                                                for s in beads.structures(k)],
        "package batched (predict_structure)": package_batched,
        "package one by one (CHGNetCalculator)": lambda k: [package_efs(calc, a)
                                                            for a in beads.step(k)],
    }
    t = interleaved(calls, warmup=1, repeats=REPEATS[size], deadline=report.deadline,
                    label=f"{nb} beads, engine and package")
    table = report.table(f"{nb} beads per step, engine and package (median (min-max))",
                         ["contender", "s per step", "beads/s", "vs mlipd batched MD step"])
    ref = t["mlipd batched, MD step"]
    for name, timing in t.items():
        table.add(name, timing.cell(), f"{nb / timing.median:.1f}" if timing.ok else "-",
                  ref.ratio(timing))
    table.notes += [
        "MD step: neighbour lists reused while beads move within the skin; rebuilding: a "
        "fresh list every call, the graph work the package does in every call.",
        "The package's batched path converts ASE atoms to pymatgen structures and builds "
        "its crystal graphs inside the timed step, as a PIMD code calling it would.",
        "Last column: how many times longer the contender's step is than mlipd's batched "
        "MD step.",
    ]


def _server_table(report: Report, beads: Beads, *, size: str, device: str,
                  tmp: Path) -> None:
    from mlipd.client import Client
    from mlipd.server.testing import running_server

    nb = len(beads.atoms)
    env = dict(os.environ, OMP_NUM_THREADS=str(report.threads or os.cpu_count() or 1))
    table = report.table(f"{nb} beads per step through one `mlipd serve` (CHGNet)",
                         ["way", "s per step", "beads/s", "engine calls per step"])
    with running_server(["--model", "chgnet", "--device", device, "--zmq",
                         "tcp://127.0.0.1:0"], log=tmp / "serve.log", env=env) as srv, \
            Client(srv.address, timeout_s=600) as client, \
            Client(srv.address, timeout_s=600) as stats:
        pool = _Concurrent(srv.address, nb)
        try:
            calls = {"one at a time": lambda k: [client.compute(s)
                                                 for s in beads.structures(k)],
                     "one client per bead, at once": lambda k: pool.step(beads.structures(k)),
                     "one batch request": lambda k: client.batch(beads.structures(k))}
            counted = {name: _counting(fn, stats) for name, fn in calls.items()}
            t = interleaved(counted, warmup=1, repeats=REPEATS[size],
                            deadline=report.deadline, label=f"{nb} beads through serve")
        finally:
            pool.close()
    for name, timing in t.items():
        engine_calls = counted[name].calls / max(counted[name].steps, 1)
        table.add(name, timing.cell(), f"{nb / timing.median:.1f}" if timing.ok else "-",
                  f"{engine_calls:.1f}")
    table.notes.append("Engine calls per step are counted by the server (`stats`), warm-up "
                       "included; concurrent clients are packed into fewer calls by the "
                       "batching scheduler.")


class _counting:
    """A contender that also counts the server's engine calls it caused."""

    def __init__(self, fn, stats) -> None:
        self.fn, self.stats, self.calls, self.steps = fn, stats, 0, 0

    def __call__(self, k: int) -> None:
        before = self.stats.stats()["engine_calls"]
        self.fn(k)
        self.calls += self.stats.stats()["engine_calls"] - before
        self.steps += 1


class _Concurrent:
    """One client per bead, each in its thread; ``step`` releases them together."""

    def __init__(self, address: str, n: int) -> None:
        from mlipd.client import Client

        self.n, self.work, self.stop = n, [None] * n, False
        self.start, self.done = threading.Barrier(n + 1), threading.Barrier(n + 1)
        self.errors: list[BaseException] = []

        def worker(k: int) -> None:
            with Client(address, timeout_s=600) as c:
                while True:
                    self.start.wait()
                    if self.stop:
                        return
                    try:
                        c.compute(self.work[k])
                    except Exception as e:  # noqa: BLE001 - reported by step()
                        self.errors.append(e)
                    self.done.wait()

        self.threads = [threading.Thread(target=worker, args=(k,), daemon=True)
                        for k in range(n)]
        for th in self.threads:
            th.start()

    def step(self, structures: list[Structure]) -> None:
        self.work[:] = structures
        self.start.wait()
        self.done.wait()
        if self.errors:
            raise RuntimeError(f"a bead failed: {self.errors[0]}")

    def close(self) -> None:
        self.stop = True
        with contextlib.suppress(threading.BrokenBarrierError):
            self.start.wait(timeout=30)
        for th in self.threads:
            th.join(timeout=30)

