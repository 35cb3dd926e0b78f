"""i-PI: the real i-PI running path-integral MD (32 beads of 64-atom Si at full size,
PILE thermostat, i-PI's batched socket mode with ``batch_size`` = beads) driven by
``mlipd drive`` vs by i-PI's own Python driver with the same model:

- MACE: ``i-pi-py_driver -m mace`` (i-PI's batched MACE driver, ``ipi/pes/_mace.py``:
  MACECalculator's model on a batch of all beads);
- CHGNet: i-PI's ASE driver (``ipi/pes/_ase.py``) with ``CHGNetCalculator``, bead by
  bead (``mlipd/bench/ipi_ase_driver.py``; i-PI has no CHGNet driver of its own).

Both clients get the same i-PI input and model file; runs alternate between them
(``ROUNDS``), and each step's wall time is read from i-PI's properties file
(``ipi_runs``). i-PI's drivers rebuild their graphs at every step; mlipd drive is run
twice, as in the ``latency`` suite: its MD step (``--skin 0.5``, the default: neighbour
lists reused across steps within the skin) and rebuilding at every step (``--skin 0``,
the package's graph work, like for like).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mlipd.bench import ipi_runs
from mlipd.bench.contenders import MD_SKIN
from mlipd.bench.report import Report
from mlipd.bench.systems import silicon
from mlipd.bench.timing import Deadline, Timing
from mlipd.bench.zoo import make_case

REQUIRES = ("chgnet", "mace", "ipi")
DESCRIPTION = "i-PI PIMD: mlipd drive vs i-PI's own Python driver, same model"
BUDGET_S = {"tiny": 150.0, "quick": 60.0, "full": 3600.0}
GPU_BUDGET_S = {"full": 60.0}  # one GPU session: all suites in ~9 min
MODELS = ("chgnet", "mace")
BEADS = {"tiny": 2, "quick": 4, "full": 32}
ATOMS = {"tiny": 8, "quick": 64, "full": 64}
STEPS = {"tiny": 3, "quick": 3, "full": 10}
WARMUP = {"tiny": 1, "quick": 1, "full": 3}
ROUNDS = {"tiny": 1, "quick": 1, "full": 3}
# one i-PI run, start-up included: a hung client ends here (32 beads of the large MACE
# take ~a minute per step on a CPU)
RUN_TIMEOUT_S = {"tiny": 300.0, "quick": 600.0, "full": 3600.0}
SCALE = {"tiny": "small", "quick": "small", "full": "large"}
ASE_DRIVER = str(Path(__file__).resolve().parents[1] / "ipi_ase_driver.py")


MD_STEP, REBUILDING, PACKAGE = "mlipd drive, MD step", "mlipd drive, rebuilding", "i-PI driver"


def clients(case, device: str) -> dict[str, list[str]]:
    dev = device.split(":")[0] if device.startswith("cuda") else device
    mlipd = ipi_runs.mlipd_client(case.spec, device=device)
    out = {MD_STEP: [*mlipd, "--skin", str(MD_SKIN)], REBUILDING: [*mlipd, "--skin", "0"]}
    if case.name == "mace":
        out[PACKAGE] = ipi_runs.ipi_client(
            "mace", param=f"template=init.xyz,model={case.path},device={dev}")
    else:
        out[PACKAGE] = ipi_runs.ipi_client(
            "custom", pes_path=ASE_DRIVER,
            param=f"template=init.xyz,model={case.name},path={case.path},device={dev}")
    return out


def run(report: Report, *, size: str, device: str) -> None:
    nb = BEADS[size]
    atoms = silicon(ATOMS[size])
    table = report.table(
        f"i-PI PIMD, {nb} beads x {len(atoms)} Si atoms: ms per MD step, median (min-max)",
        ["model", "i-PI's driver", MD_STEP, REBUILDING, PACKAGE,
         "i-PI driver / mlipd rebuilding", "i-PI driver / mlipd MD step",
         "steps timed (each)"])
    work = Path(tempfile.mkdtemp(prefix="mlipd-bench-ipi-"))
    try:
        for model, deadline in report.deadline.shares(MODELS):
            if report.deadline.passed:
                table.notes.append(f"{model}: not run (the suite's deadline had passed)")
                continue
            try:
                case = make_case(model, scale=SCALE[size], workdir=work / "models")
            except ImportError as e:
                table.notes.append(f"{model}: not run ({e})")
                continue
            table.notes.append(f"{model}: {case.description}")
            t = _measure(report, case, atoms, device=device, size=size, work=work / model,
                         deadline=deadline)
            what = ("-m mace (batched)" if model == "mace"
                    else "-m custom: ASE driver + CHGNetCalculator, bead by bead")
            md, rb, pk = t[MD_STEP], t[REBUILDING], t[PACKAGE]
            table.add(model, what, md.cell(1e-3, 1), rb.cell(1e-3, 1), pk.cell(1e-3, 1),
                      rb.ratio(pk), md.ratio(pk), min(len(x.seconds) for x in t.values()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table.notes += [
        f"i-PI input: {nb} beads, NVT with the PILE-L thermostat, 1 fs, 300 K, one UNIX "
        f"socket with batch_size {nb} (all beads of a step in one message, for both clients).",
        f"Per run {WARMUP[size]} warm-up steps, then {STEPS[size]} timed steps; "
        f"{ROUNDS[size]} run(s) per client, alternating. A step's time includes i-PI's own "
        "integrator and the socket.",
        f"MD step: `mlipd drive --skin {MD_SKIN}` (its default) builds a neighbour list with "
        "a skin and reuses it while atoms move less than half the skin; rebuilding: "
        "`--skin 0`, a fresh list and topology at every step, as i-PI's drivers build "
        "their graphs at every step.",
    ]


def _measure(report: Report, case, atoms, *, device: str, size: str, work: Path,
             deadline: Deadline) -> dict[str, Timing]:
    argv = clients(case, device)
    times: dict[str, list[float]] = {k: [] for k in argv}
    failed: dict[str, str] = {}
    nb = BEADS[size]
    for r in range(ROUNDS[size]):
        for name, client in argv.items():
            if name in failed or (r and deadline.passed):  # rounds are whole
                continue
            try:
                times[name] += ipi_runs.run(
                    work / f"{name.replace(',', '').replace(' ', '-')}-{r}", atoms, client,
                    steps=STEPS[size],
                    warmup=WARMUP[size], threads=report.threads or 1,
                    timeout=RUN_TIMEOUT_S[size], nbeads=nb, batch_size=nb, thermostat=True)
            except (RuntimeError, TimeoutError) as e:
                failed[name] = f"failed: {str(e).splitlines()[0][:200]}"
                report.note(f"{case.name} {name}: {e}")
    return {k: Timing(tuple(v), failed.get(k)) for k, v in times.items()}
