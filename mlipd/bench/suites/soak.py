"""A bounded soak of `mlipd serve`: many concurrent clients, random sizes, bad requests
mixed in, every answer checked.

One real server process (Lennard-Jones, so the engine is cheap and the server's own
handling dominates); ``clients`` threads, each with its own ``mlipd.client.Client`` and
a raw DEALER socket, send ``requests`` each. About 85% are valid structures, most of 4 to
108 atoms and ``LARGE_SHARE`` of them 864 to 48,668 atoms (sizes log-uniform between
1,000 and 50,000); after the run, each answer is compared with a direct evaluation in
this process: a difference is a *mismatch*. The rest are faults from ``FAULTS``
(geometry the guards or the memory budget refuse, frames the decoder refuses), each
with the error code it must get.
A request with no answer is *lost*. The server's resident memory is read *at rest*
after the warm-up, after each quarter of every client's requests and at the end: the
clients pause (none has a request in flight), one 4-atom structure is computed (the
engine keeps the last structure's neighbour lists for reuse: ~600 MB after a 48k-atom
step, so the reading would depend on which came last) and the reading is taken
``REST_S`` later, past the server's idle give-back (``mlipd.server.worker.IDLE_TRIM_S``):
what the server kept, which grows if anything leaks. A reading while clients send can
fall inside a large step (its working memory, ~1.5 GB at 48k atoms), so RSS is also
sampled every ``RSS_EVERY_S`` while they send: each quarter's median and maximum.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from mlipd.bench.report import Report

DESCRIPTION = "concurrent clients, random sizes, faults mixed in: lost, mismatched, memory"
SIZES = {"tiny": (8, 12), "quick": (8, 400), "full": (10, 1100)}  # clients, requests each
FAULT_SHARE = 0.15
LARGE_SHARE = 0.03  # of the valid structures: 864 to 48,668 atoms
RSS_EVERY_S = 0.1
REST_S = 3.0  # > mlipd.server.worker.IDLE_TRIM_S: the idle give-back has run


def _argon(n_rep: tuple[int, int, int], rng: np.random.Generator):
    from ase.build import bulk

    from mlipd.types import Structure

    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(n_rep)
    atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
    return Structure.from_atoms(atoms)


def _bad(positions, cell, pbc):
    from mlipd.types import Structure

    positions = np.asarray(positions, dtype=float)
    return Structure(numbers=np.full(len(positions), 18), positions=positions,
                     cell=np.asarray(cell, dtype=float), pbc=np.broadcast_to(pbc, 3))


def _frame(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _small_structure() -> dict:
    from mlipd.protocols import zmq_msgs

    return zmq_msgs.pack_structure(_bad([[0, 0, 0], [2, 2, 2]], np.eye(3) * 6, True))


# fault name: (how it is sent: "structure" through the Client or "frame" raw, the
# structure or frame maker, the error code it must get)
FAULTS: dict[str, tuple[str, Callable, str]] = {
    "2 atoms 1e6 Å apart (open)": (
        "structure", lambda rng: _bad([[0, 0, 0], [1e6, 0, 0]], np.zeros((3, 3)), False),
        "bad_input"),
    "cell 12 x 12 x 2e20 Å": (
        "structure", lambda rng: _bad([[0, 0, 0]], np.diag([12, 12, 2e20]), True), "bad_input"),
    "nearly singular cell": (
        "structure", lambda rng: _bad([[0, 0, 0]], [[12, 0, 0], [8.6e9, 12, 0], [0, 0, 12]],
                                      True), "bad_input"),
    "1 atom in a 0.05 Å cell": (
        "structure", lambda rng: _bad([[0, 0, 0]], np.eye(3) * 0.05, True), "bad_input"),
    "4000 atoms in a 3 Å box": (
        "structure", lambda rng: _bad(rng.uniform(0, 3, (4000, 3)), np.eye(3) * 3, True),
        "too_large"),
    "overlapping atoms": (
        "structure", lambda rng: _bad([[0, 0, 0], [0, 0, 0], [4, 4, 4]], np.eye(3) * 12, True),
        "bad_input"),
    "op sent as a list": (
        "frame", lambda rng: _frame({"v": 1, "id": 1, "op": ["compute"]}), "bad_input"),
    "op sent as a map": (
        "frame", lambda rng: _frame({"v": 1, "id": 1, "op": {"x": 1}}), "bad_input"),
    "nested empty maps (1.6 MB)": (
        "frame", lambda rng: _frame({"v": 1, "id": 1, "op": "batch",
                                     "structures": [[{}] * 4096] * 400}), "protocol"),
    "not msgpack": ("frame", lambda rng: b"\xc1" + rng.bytes(64), "protocol"),
    # issue 22: over the memory budget before anything is allocated (LJ's estimate 5.0 GiB,
    # 1.0e7 edges, against 3 GiB that the largest valid structure's 1.8 GiB passes), and an
    # oversized batch
    "512 atoms 0.5 Å apart in a 4 Å cell": (
        "structure", lambda rng: _bad(0.5 * np.stack(np.meshgrid(*[np.arange(8)] * 3,
                                                                  indexing="ij"),
                                                      -1).reshape(-1, 3),
                                      np.eye(3) * 4.0, True), "too_large"),
    "4,097 structures in one batch": (
        "frame", lambda rng: _frame({"v": 1, "id": 1, "op": "batch",
                                     "structures": [_small_structure()] * 4097}), "too_large"),
    "unknown key": (
        "frame", lambda rng: _frame({"v": 1, "id": 1, "op": "ping", "evil": 1}), "bad_input"),
}


@dataclass
class Tally:
    """What the clients saw (merged across threads under ``lock``)."""

    sent: int = 0
    ok: int = 0
    codes: Counter = field(default_factory=Counter)
    lost: int = 0
    mismatched: int = 0
    faults: dict[str, Counter] = field(default_factory=dict)
    answers: list = field(default_factory=list)  # (structure, result) to check afterwards
    largest: int = 0  # atoms of the largest valid structure sent
    lock: threading.Lock = field(default_factory=threading.Lock)


def run(report: Report, *, size: str, device: str) -> None:
    from mlipd.server.testing import running_server

    clients, per_client = SIZES[size]
    log = Path(f"/tmp/mlipd-soak-{time.monotonic_ns()}.log")
    args = ["--model", "lj", "--dtype", "float64", "--device", device,
            "--zmq", "tcp://127.0.0.1:0", "--max-request-atoms", "60000",
            # a budget the dense fault exceeds (LJ: 1.0e7 edges x 512 B) and no valid one
            # does (48,668 atoms: 3.8e6 edges, 1.8 GiB)
            "--max-request-memory", "3G"]
    tally = Tally()
    # one torch thread in the server: on a small shared machine OpenMP's spinning threads
    # slow a small step by far more than its arithmetic
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with running_server(args, log=log, env=env) as srv:
        _warm_up(srv.address)
        rss = [_at_rest(srv)]  # at rest: 0, 25, 50, 75 and 100% of the requests
        samples: list[list[float]] = [[] for _ in range(4)]  # every RSS_EVERY_S, by quarter
        quarters = [(threading.Barrier(clients + 1), threading.Event()) for _ in range(3)]
        t0 = time.monotonic()
        threads = [threading.Thread(target=_client,
                                    args=(srv.address, k, per_client, tally, quarters))
                   for k in range(clients)]
        for t in threads:
            t.start()
        for q in range(4):
            if q < 3:  # wait until every client is at the pause, sampling meanwhile
                _sample_until(lambda q=q: quarters[q][0].n_waiting == clients
                              or quarters[q][0].broken
                              or not any(t.is_alive() for t in threads),
                              srv.proc.pid, samples[q])
            else:
                _sample_until(lambda: not any(t.is_alive() for t in threads),
                              srv.proc.pid, samples[q])
            rss.append(_at_rest(srv))
            if q < 3:
                with contextlib.suppress(threading.BrokenBarrierError):
                    quarters[q][0].wait(timeout=60)
                quarters[q][1].set()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        alive = srv.proc.poll() is None
        exit_code = srv.stop()
    log.unlink(missing_ok=True)
    tally.mismatched += _check(tally.answers)
    answered = tally.ok + sum(tally.codes.values())
    summary = report.table(
        "Soak: every request answered, every answer checked",
        ["clients", "sent", "answered", "ok", "errors by code", "lost", "mismatched",
         "server RSS at rest at 0/25/50/75/100% (MB)", "RSS median by quarter (MB)",
         "RSS max by quarter (MB)", "last quarter's growth", "wall (s)", "requests/s",
         "alive, exit"])
    medians = [float(np.median(q)) if q else float("nan") for q in samples]
    wall -= 4 * REST_S  # the pauses
    summary.add(clients, tally.sent, answered, tally.ok,
                ", ".join(f"{c} {n}" for c, n in sorted(tally.codes.items())) or "none",
                tally.lost, tally.mismatched, " / ".join(f"{x:.0f}" for x in rss),
                " / ".join(f"{x:.0f}" for x in medians),
                " / ".join(f"{max(q):.0f}" if q else "-" for q in samples),
                f"{rss[4] / rss[3] - 1:+.1%} at rest, {medians[3] / medians[2] - 1:+.1%} "
                "median",
                f"{wall:.1f}", f"{tally.sent / wall:.0f}",
                f"{'yes' if alive else 'NO'}, {exit_code}")
    summary.notes.append(
        f"{1 - FAULT_SHARE:.0%} valid structures (fcc argon, rattled, LJ float64: 4-108 "
        f"atoms, {LARGE_SHARE:.0%} of them 864-48,668; largest sent "
        f"{tally.largest} atoms) compared with a direct evaluation (energy rel 1e-9, "
        "forces 1e-9 eV/Å): a difference is a mismatch; faults must get their code. "
        "Lost: no answer at all. "
        f"Run with {clients} client threads in one process, {per_client} requests each. "
        f"RSS at rest: every client paused after each quarter of its requests, one "
        f"4-atom structure computed (the engine keeps the last structure's lists), read "
        f"{REST_S:g} s later (past the server's idle heap give-back): what it kept. "
        f"Median and maximum: sampled every {RSS_EVERY_S:g} s while clients send (a "
        "reading inside a large step holds its working memory). Last quarter's growth: "
        "at rest 75% -> 100%, and the 4th quarter's median over the 3rd's. The server "
        "gives its heap back after a batch of a quarter of the atoms of the largest "
        "since the last give-back, or when idle (`mlipd.server.worker`); wall time "
        "excludes the pauses.")
    faults = report.table("Inputs and faults: outcome of each",
                          ["input", "sent", "expected", "outcomes", "as expected"])
    for name, (_, _, expected) in FAULTS.items():
        seen = tally.faults.get(name, Counter())
        faults.add(name, sum(seen.values()), expected,
                   ", ".join(f"{c} {n}" for c, n in sorted(seen.items())) or "-",
                   "yes" if set(seen) <= {expected} else "NO")


def _check(answers: list) -> int:
    """Mismatches among the valid answers, against a direct evaluation."""
    import torch

    from mlipd.engine import make_engine

    reference = make_engine("lj", dtype="float64")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: more threads only spin (see run)
    bad = 0
    try:
        for s, got in answers:
            (ref,) = reference.compute([s])
            good = (abs(got.energy - ref.energy) <= 1e-9 * max(1.0, abs(ref.energy))
                    and np.allclose(got.forces, ref.forces, rtol=1e-9, atol=1e-9))
            bad += 0 if good else 1
    finally:
        torch.set_num_threads(threads)
    return bad


def _warm_up(address: str) -> None:
    from mlipd.client import Client

    rng = np.random.default_rng(0)
    with Client(address) as c:
        for n in range(1, 5):
            c.compute(_argon((n, n, n), rng))


def _valid_reps(rng: np.random.Generator) -> tuple[int, int, int]:
    """Cubic cells per axis of a valid structure: mostly 1-3 (4-108 atoms), a
    ``LARGE_SHARE`` of 1,000 to 50,000 atoms, log-uniform (4 n^3 atoms)."""
    if rng.random() < LARGE_SHARE:
        n = round((np.exp(rng.uniform(np.log(1_000), np.log(50_000))) / 4) ** (1 / 3))
        return (n, n, n)
    return tuple(int(x) for x in rng.integers(1, 4, 3))


def _at_rest(srv) -> float:
    """The server's RSS (MB) with a small structure computed last, ``REST_S`` later."""
    from mlipd.client import Client

    with Client(srv.address) as c:
        c.compute(_argon((1, 1, 1), np.random.default_rng(0)))
    time.sleep(REST_S)
    return _rss_mb(srv.proc.pid)


def _sample_until(done: Callable[[], bool], pid: int, into: list[float]) -> None:
    """Read ``pid``'s RSS into ``into`` every ``RSS_EVERY_S`` until ``done()``."""
    next_sample = 0.0
    while not done():
        if time.monotonic() >= next_sample:
            next_sample = time.monotonic() + RSS_EVERY_S
            into.append(_rss_mb(pid))
        time.sleep(0.01)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _client(address: str, k: int, count: int, tally: Tally, quarters: list) -> None:
    import zmq

    from mlipd.client import Client
    from mlipd.errors import MlipdError, ServerUnavailable
    from mlipd.protocols import zmq_msgs

    rng = np.random.default_rng(1000 + k)
    names = list(FAULTS)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(address)
    try:
        with Client(address, heartbeat_s=20, timeout_s=300) as client:
            for i in range(count):
                for q, (arrived, resume) in enumerate(quarters):
                    if i == (q + 1) * count // 4:  # pause: RSS at rest (see run)
                        with contextlib.suppress(threading.BrokenBarrierError):
                            arrived.wait(timeout=600)
                        resume.wait(timeout=600)
                with tally.lock:
                    tally.sent += 1
                if rng.random() < FAULT_SHARE:
                    name = names[int(rng.integers(len(names)))]
                    how, make, _ = FAULTS[name]
                    code = _send_fault(client, raw, how, make(rng), zmq_msgs, MlipdError)
                    with tally.lock:
                        tally.faults.setdefault(name, Counter())[code] += 1
                        if code == "lost":
                            tally.lost += 1
                        else:
                            tally.codes[code] += 1
                    continue
                s = _argon(_valid_reps(rng), rng)
                with tally.lock:
                    tally.largest = max(tally.largest, s.n_atoms)
                try:
                    got = client.compute(s)
                except ServerUnavailable:
                    with tally.lock:
                        tally.lost += 1
                    continue
                except MlipdError as e:
                    with tally.lock:
                        tally.codes[e.code] += 1
                        tally.mismatched += 1  # a valid structure must be computed
                    continue
                with tally.lock:
                    tally.ok += 1
                    tally.answers.append((s, got))
    finally:
        raw.close(0)
        ctx.term()


def _send_fault(client, raw, how: str, payload, zmq_msgs, error_type) -> str:
    """The error code the fault got, "ok" if it was computed, "lost" without answer."""
    if how == "structure":
        try:
            client.compute(payload)
        except error_type as e:
            return "lost" if e.code == "unavailable" else e.code
        return "ok"
    raw.send(payload)
    if not raw.poll(60_000):
        return "lost"
    msg = zmq_msgs.loads(raw.recv())
    return "ok" if msg.get("ok") else str(msg["error"]["code"])
