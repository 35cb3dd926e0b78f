"""Every ``mlipd bench`` suite starts and writes its table with every contender, at its
tiny size (the figures themselves are the suites' job, not the tests'); and the
pieces the suites trust: interleaved timing, deadlines, contender processes and their
limits, structures of the asked size."""

from __future__ import annotations

import re
import time

import pytest

from mlipd.bench.suites import SUITES
from mlipd.bench.systems import Jiggle, oxide, repetitions, silicon
from mlipd.bench.timing import ContenderFailed, Deadline, Measured, interleaved
from mlipd.bench.workers import Worker
from mlipd.cli import main

CONTENDERS = {  # what each suite's tables must hold (contenders, columns, models)
    "engine": ["SingleRankEngine", "DistributedEngine(ranks=1)", "warm step"],
    "capacity": ["| chgnet | 64 | mlipd |", "| chgnet | 64 | mlipd recompute=1 |",
                 "| chgnet | 64 | package |", "| mace | 64 | mlipd |", "| mace | 64 | package |"],
    "latency": ["mlipd MD step", "mlipd rebuilding", "| package |", "| chgnet | 8 |",
                "| mace | 8 |"],
    "beads": ["| mlipd batched, MD step |", "| mlipd batched, rebuilding |",
              "| mlipd one by one, MD step |", "| package batched (predict_structure) |",
              "| package one by one (CHGNetCalculator) |", "| one at a time |",
              "| one client per bead, at once |", "| one batch request |"],
    "ipi": ["| mlipd drive, MD step |", "| mlipd drive, rebuilding |", "| i-PI driver |",
            "| chgnet |", "| mace |"],
    "scaling": ["| P=1 |", "| P=2 |", "| P=4 |"],
    "partition": ["| slab |", "| rcb |", "| metis |"],
    "overhead": ["| ipi-dummy |", "| mlipd-zero |", "| mlipd-lj |", "| mlipd-zero-compiled |",
                 "| mlipd-zero-compiled-busy |", "| mlipd-lj-compiled-busy |", "| zmq-client |",
                 "| zmq-ase |", "| ase-socket |", "| ipi (per MD step) |",
                 "| protocol path |"],
    "models": ["| tensornet | 64 |", "| mace | 64 |", "mlipd rebuilding", "| package |"],
    "esen": ["| esen | 64 |", "mlipd rebuilding", "| package |"],
    "sevennet": ["mlipd s/step", "sevenn s/step", "mlipd peak MiB", "sevenn peak MiB",
                 "mlipd halo", "ghosts 1 cutoff", "ghosts 25 Å"],
    "soak": ["| 8 |", "| 2 atoms 1e6 Å apart (open) |", "| overlapping atoms |",
             "| not msgpack |", "bad_input"],
    "clients": ["| C |", "| Fortran |", "| Python |", "| 8 |", "| LAMMPS + mlipd |",
                "| ASE + MlipdCalculator |", "| ASE + CHGNetCalculator |"],
    "mace": ["MACECalculator", "mlipd stored", "mlipd chunked", "mlipd recomputed",
             "mlipd recomputed+chunked", "MiB per atom", "s per MD step (list reused)",
             "s per call rebuilding (package: always)"],
    "gpu": ["| chgnet | 8 |", "| reference | 64 | 2 |", "| yes |", "CUDA sync warnings"],
}
E3NN_SUITES = {"esen", "sevennet"}  # their packages live in .venv-e3nn (tests/conftest.py)
FAILED = re.compile(r"failed|not run|out of memory|limit|died|deadline|\bnan\b", re.IGNORECASE)


@pytest.mark.parametrize("suite", [pytest.param(s, marks=pytest.mark.e3nn) if s in E3NN_SUITES
                                   else s for s in SUITES])
def test_suite_writes_its_table(suite, tmp_path, one_torch_thread):
    assert main(["bench", suite, "--size", "tiny", "--device", "cpu", "--out",
                 str(tmp_path)]) == 0
    text = (tmp_path / f"{suite}-cpu.md").read_text()
    for word in ["- commit:", "- machine:", "- command:", "- versions:", "load average"]:
        assert word in text, word
    assert "failed" not in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln]
    for word in CONTENDERS[suite]:
        assert any(word in ln for ln in rows), word  # in a table, not only in the notes
    titles = [ln for ln in text.splitlines() if ln.startswith("### ")]
    assert len(rows) >= 2 * len(titles)  # a header and at least one row per table
    bad = [ln for ln in rows if FAILED.search(ln)]
    assert not bad, bad  # every contender of every row has its figure


@pytest.mark.parametrize(("skin", "rebuilds"), [(None, 1), ("0", 3)])
def test_drive_skin_option_sets_the_engine_skin(skin, rebuilds):
    """The ``ipi`` suite's two mlipd columns differ only by ``mlipd drive --skin``:
    the default reuses the list within its skin, ``--skin 0`` rebuilds at every call."""
    from mlipd import cli
    from mlipd.engine_options import engine_from_args
    from mlipd.errors import SetupError
    from mlipd.types import Structure

    argv = ["drive", "--address", "unix:x", "--species", "Ar", "--model", "lj",
            "--dtype", "float64", "--device", "cpu"] + (["--skin", skin] if skin else [])
    engine = engine_from_args(cli.parse(argv))
    try:
        md = Jiggle(silicon(8))
        for k in range(3):
            engine.compute([Structure.from_atoms(md.atoms(k))])
        assert engine.rebuilds == rebuilds
    finally:
        engine.close()
    with pytest.raises(SetupError, match="--skin"):
        engine_from_args(cli.parse([*argv, "--skin", "-1"]))


def test_interleaved_takes_turns_and_drops_a_failed_contender():
    order = []

    def ok(k):
        order.append(("ok", k))

    def fails_at_1(k):
        order.append(("bad", k))
        if k == 1:
            raise ContenderFailed("out of memory")

    t = interleaved({"ok": ok, "bad": fails_at_1}, warmup=1, repeats=4)
    assert order[:6] == [("ok", -1), ("bad", -1), ("ok", 0), ("bad", 0), ("ok", 1),
                         ("bad", 1)]
    assert [k for who, k in order if who == "bad"] == [-1, 0, 1]  # dropped after failing
    assert len(t["ok"].seconds) == 4
    assert t["ok"].ok
    assert not t["bad"].ok
    assert t["bad"].cell() == "out of memory"


def test_interleaved_uses_measured_seconds_and_stops_at_the_deadline():
    t = interleaved({"x": lambda k: Measured(0.25)}, warmup=0, repeats=100,
                    deadline=Deadline(0.0), min_repeats=3)
    assert t["x"].seconds == (0.25, 0.25, 0.25)  # min_repeats, then the deadline
    assert t["x"].cell() == "0.250 (0.250-0.250)"


def test_structures_have_the_asked_size_and_moves_are_shared():
    assert repetitions(250) == (5, 5, 10)
    assert [len(oxide(n)) for n in (8, 64, 2000, 8000)] == [8, 64, 2000, 8000]
    assert len(silicon(64)) == 64
    a, b = Jiggle(oxide(64)), Jiggle(oxide(64))
    assert (a.structure(3).positions == b.atoms(3).positions).all()  # same call, same atoms
    assert (a.structure(3).positions != a.structure(4).positions).any()


def _allocate(mib, *, device):
    import numpy as np

    def call(k):
        buf = np.ones(mib * 2**20 // 8)
        return float(buf.sum())

    return call


def _sleep(seconds, *, device):
    return lambda k: time.sleep(seconds)


def test_worker_reports_its_peak_and_is_stopped_at_its_limits():
    with Worker("alloc", memory_limit=2**40) as w:
        w.setup(_allocate, 200)
        w.reset_peak()
        assert isinstance(w(0), Measured)
        m = w.peak()
        assert 150 * 2**20 < m.step < 400 * 2**20  # the 200 MiB buffer, not the imports
    with Worker("hog") as w:
        w.setup(_allocate, 50)
        w.reset_peak()
        w.memory_limit = w.peak().baseline + 300 * 2**20
        w(0)  # 50 MiB: under the limit
        w.setup(_allocate, 2000)
        with pytest.raises(ContenderFailed, match="memory limit"):
            w(1)
        with pytest.raises(ContenderFailed):  # stays failed
            w(2)
    with Worker("slow", call_timeout=0.5) as w:
        w.setup(_sleep, 30)
        t0 = time.monotonic()
        with pytest.raises(ContenderFailed, match="time limit"):
            w(0)
        assert time.monotonic() - t0 < 25
