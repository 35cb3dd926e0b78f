"""The distributed engine equals the single-device engine on real gloo ranks.

One spawn of 8 processes serves every P in {2, 3, 4, 8} (process subgroups), running
the same front end and rank loop that ``DistributedEngine`` runs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers.server import rank_pids

from mlipd.engine.comm import Comm
from mlipd.engine.coordinator import Coordinator
from mlipd.engine.rank_loop import RankLoop
from mlipd.engine.single_rank import SingleRankEngine
from mlipd.engine.step import Step
from mlipd.models.lj import LennardJones
from mlipd.models.reference import ReferenceMP
from mlipd.testing import run_on_ranks
from mlipd.testing import tolerances as tol
from mlipd.testing.systems import cases
from mlipd.types import Structure

P_VALUES = (2, 3, 4, 8)
MODELS = {"reference": lambda: ReferenceMP("layers=3,features=16,cutoff=5"),
          "lj": lambda: LennardJones("epsilon=0.4,sigma=2.3,cutoff=5")}


def _edge_keys(step: Step) -> np.ndarray:
    g = step.last_graph
    gid = g.global_ids
    keys = torch.cat([gid[g.receivers, None], gid[g.senders, None], g.images], 1)
    return (keys if g.edge_mask is None else keys[g.edge_mask]).numpy()  # r < cutoff


class RecordingStep(Step):
    """Keeps, per step, what this rank computed: owned ids, edge keys, layer counts."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.records = []

    def run(self, positions, cells, *, virial):
        out = super().run(positions, cells, virial=virial)
        counts = [(a, int(m)) for a, m in getattr(self.model, "last_counts", [])]
        g = self.last_graph
        self.records.append((g.global_ids[: g.n_owned].numpy().copy(), _edge_keys(self),
                             counts))
        return out


def _configs(p: int) -> list[tuple[str, str, bool]]:
    """(model, partition method, also as one batch) run at P = p: everything at rcb,
    slabs and METIS at P = 3 and 8 (they share all code after the owner array)."""
    out = [("reference", "rcb", True), ("lj", "rcb", False)]
    if p in (3, 8):
        out += [("reference", "slab", False), ("reference", "metis", False)]
    return out


def _on_rank(rank: int, world: int, systems: dict) -> tuple[dict, dict]:
    """Every P, model, method and system; rank 0 of each subgroup returns results,
    every rank its records of what it computed (reference model, rcb)."""
    out: dict = {}
    records: dict = {}
    for p in P_VALUES:
        group = dist.new_group(list(range(p)))
        if rank >= p:
            continue
        comm = Comm(group=group)
        for model_name, method, as_batch in _configs(p):
            step = RecordingStep(MODELS[model_name](), comm, device=torch.device("cpu"),
                                 dtype=torch.float64, skin=0.5)
            loop = RankLoop(step)
            if (model_name, method) == ("reference", "rcb"):
                records[p] = step.records
            if rank != 0:
                loop.follow()
                continue
            front = Coordinator(loop, skin=0.5, partition=method)
            for name, s in systems.items():
                (out[(p, model_name, method, name)],) = front.compute([s], virial=True)
            if as_batch:
                out[(p, model_name, method, "batch")] = front.compute(list(systems.values()),
                                                                      virial=True)
            front.stop()
    return out, records



@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Intra-op threads fight over the 2 shared cores: this module runs on one."""

@pytest.fixture(scope="module")
def systems():
    return cases()


@pytest.fixture(scope="module")
def reference_results(systems):
    out = {}
    for model_name, make in MODELS.items():
        eng = SingleRankEngine(make(), dtype=torch.float64)
        for name, s in systems.items():
            (out[(model_name, name)],) = eng.compute([s])
    return out


@pytest.fixture(scope="module")
def distributed_results(systems):
    return run_on_ranks(_on_rank, max(P_VALUES), systems, timeout_s=600)


_STIFFNESS_ENGINES: dict = {}


def _close(got, want, what, s: Structure, *, make=ReferenceMP, bound=None) -> dict:
    """``got`` equals ``want`` within two float64 computations whose edge vectors are
    built by other operations (a rank's halo images): ``tol.measured_float64``, the
    stiffness measured with a float64 engine of ``make`` (``bound``: already known)."""
    if want.virial is None:
        assert got.virial is None, what
    if bound is None:
        if make not in _STIFFNESS_ENGINES:
            _STIFFNESS_ENGINES[make] = tol.float64_engine(make)
        bound = tol.measured_float64(_STIFFNESS_ENGINES[make], s, want)
    return tol.assert_within(got, want, s, bound, str(what))


@pytest.fixture(scope="module")
def bounds(reference_results, systems):
    """Per (model, system): two float64 computations whose edge vectors are built by
    other operations (a rank's halo images): ``tol.measured_float64``."""
    engines = {m: tol.float64_engine(make) for m, make in MODELS.items()}
    return {(m, name): tol.measured_float64(engines[m], s, reference_results[(m, name)])
            for m in MODELS for name, s in systems.items()}


@pytest.mark.timeout(900)
def test_equals_single_device(distributed_results, reference_results, systems, bounds):
    worst: dict[str, float] = {}

    def check(got, want, what):
        (_, model_name, _, name) = what
        ratios = _close(got, want, what, systems[name], bound=bounds[(model_name, name)])
        for k, v in ratios.items():
            worst[k] = max(worst.get(k, 0.0), v)

    n = 0
    for (p, model_name, method, name), got in distributed_results[0][0].items():
        if name == "batch":
            for s_name, r in zip(systems, got, strict=True):
                check(r, reference_results[(model_name, s_name)], (p, model_name, method, s_name))
        else:
            check(got, reference_results[(model_name, name)], (p, model_name, method, name))
        n += 1
    assert n == sum(len(systems) * len(_configs(p)) + sum(c[2] for c in _configs(p))
                    for p in P_VALUES)
    print("distributed vs one rank, float64 error / bound (worst)",
          {k: f"{v:.2g}" for k, v in worst.items()})


def _key_set(keys: np.ndarray) -> np.ndarray:
    """Edge keys (E, 5) as sorted unique rows (lexicographic), duplicates kept."""
    return keys[np.lexsort(keys.T[::-1])]


def test_zero_redundancy(distributed_results, systems):
    """Each atom updated and each edge's message computed on exactly one rank."""
    from mlipd.engine.neighbors import neighbor_list

    model = MODELS["reference"]()
    engine = SingleRankEngine(model)
    for k, (name, s) in enumerate(systems.items()):
        engine.compute([s])
        single_counts = [(a, int(m)) for a, m in model.last_counts]
        e = neighbor_list(s, model.spec.cutoff)
        full = _key_set(np.column_stack([e.centers, e.neighbors, e.shifts]))
        for p in P_VALUES:
            per_rank = [recs[p] for _, recs in distributed_results[:p]]
            owned = np.concatenate([r[k][0] for r in per_rank])
            assert np.array_equal(np.sort(owned), np.arange(s.n_atoms)), (p, name)
            keys = _key_set(np.concatenate([r[k][1] for r in per_rank]))
            assert np.array_equal(keys, full), (p, name)  # same edges, none twice
            for layer, want in enumerate(single_counts):
                atoms = sum(r[k][2][layer][0] for r in per_rank)
                msgs = sum(r[k][2][layer][1] for r in per_rank)
                assert (atoms, msgs) == want, (p, name, layer)


# --- the engine object: API, partition reuse in MD, failures -----------------------

@pytest.fixture(scope="module")
def trigger(tmp_path_factory):
    return tmp_path_factory.mktemp("faults") / "fail"


@pytest.fixture(scope="module")
def engine(trigger):
    import functools

    from fault_models import FaultyModel

    from mlipd.engine.distributed import DistributedEngine

    eng = DistributedEngine(functools.partial(FaultyModel, trigger=str(trigger), rank=1),
                            ranks=2, skin=0.3, timeout_s=60)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def local():
    return SingleRankEngine(ReferenceMP())


def test_engine_api(engine, local, systems):
    assert engine.world_size == 2
    assert engine.spec.name == "reference"
    assert engine.compute([]) == []
    calls = engine.calls
    batch = [systems["triclinic"], systems["molecule"], systems["slab"]]
    for s, got, want in zip(batch, engine.compute(batch), local.compute(batch), strict=True):
        _close(got, want, "batch", s)
    assert engine.calls == calls + 1
    (r,) = engine.compute([systems["triclinic"]], virial=False)
    assert r.virial is None
    assert engine.last_stats.shape == (2, 3)


def _md(compute, s, steps, dt=2.0):
    """Velocity Verlet (Å, eV, amu; dt in fs); returns the positions of every step."""
    from ase.units import fs

    rng = np.random.default_rng(5)
    mass = 63.5
    v = rng.normal(scale=np.sqrt(0.1 / mass), size=s.positions.shape)  # ~1000 K
    x, f = s.positions.copy(), compute(s).forces
    traj = []
    for _ in range(steps):
        v += 0.5 * dt * fs * f / mass
        x = x + dt * fs * v
        cur = Structure(s.numbers, x, s.cell, s.pbc)
        f = compute(cur).forces
        v += 0.5 * dt * fs * f / mass
        traj.append(x)
    return np.array(traj)


def test_md_with_partition_reuse_equals_rebuild_every_step(engine):
    from mlipd.testing.systems import bulk_box

    s = bulk_box(repeat=3)
    before = engine.rebuilds
    reuse = _md(lambda st: engine.compute([st])[0], s, 50)
    rebuilt = engine.rebuilds - before
    fresh_engine = SingleRankEngine(ReferenceMP(), skin=0.0)  # a new list at every call
    fresh = _md(lambda st: fresh_engine.compute([st])[0], s, 50)
    assert fresh_engine.rebuilds == 51
    assert 2 <= rebuilt <= 25  # reused most steps, and rebuilt when atoms moved skin/2
    np.testing.assert_allclose(reuse, fresh, rtol=0, atol=1e-9)


@pytest.mark.timeout(300)
def test_failures_become_errors_and_the_next_request_succeeds(engine, local, trigger, systems):
    import os
    import signal
    import time

    from mlipd.errors import CalculationFailed, ValidationError

    s = systems["slab"]
    want = local.compute([s])[0]
    for action in ("raise", "exit"):
        trigger.write_text(action)
        t0 = time.monotonic()
        with pytest.raises(CalculationFailed, match="rank 1"):
            engine.compute([s])
        assert time.monotonic() - t0 < 30  # an error reply, not a collective timeout
        _close(engine.compute([s])[0], want, f"after {action}", s)
    os.kill(engine._procs.pid(1), signal.SIGKILL)  # a rank dies between requests
    engine._procs.wait(10.0)
    _close(engine.compute([s])[0], want, "after a dead rank", s)
    bad = Structure(s.numbers, s.positions.copy(), s.cell, s.pbc)
    bad.positions[1] = bad.positions[0]  # r = 0: refused on rank 0 before any collective
    restarts = engine.restarts
    with pytest.raises(ValidationError, match="apart"):
        engine.compute([bad])
    assert engine.restarts == restarts  # the ranks were never involved (issue 13)
    _close(engine.compute([s])[0], want, "after overlapping atoms", s)


# --- launchers: `mlipd serve --ranks N`, and torchrun -------------------------------

@pytest.mark.timeout(180)
def test_serve_with_ranks_from_the_cli(tmp_path, local, systems):
    from mlipd.client import Client
    from mlipd.server.testing import running_server

    s = systems["triclinic"]
    args = ["--model", "reference", "--dtype", "float64", "--ranks", "2", "--zmq", "tcp://127.0.0.1:0"]
    with running_server(args, log=tmp_path / "serve.log") as srv, Client(srv.address) as c:
        got = c.compute(s)
        info = c.info()
    _close(got, local.compute([s])[0], "serve --ranks 2", s)
    assert (info["ranks"], info["device"], info["devices"], info["dtype"]) == (
        2, "cpu", ["cpu", "cpu"], "float64")


@pytest.mark.timeout(300)
def test_torchrun_launch(tmp_path, local, systems):
    """``torchrun ... -m mlipd.launch serve ...``: rank 0 serves, rank 1 follows."""
    import socket
    import subprocess
    import sys

    from mlipd.client import Client
    from mlipd.server.testing import read_ready

    with socket.socket() as probe:  # torchrun's static rendezvous cannot take port 0
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "torchrun.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "mlipd.launch",
           "serve", "--model", "reference", "--dtype", "float64", "--zmq", "tcp://127.0.0.1:0"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    try:
        (address,) = read_ready(proc, timeout_s=120, log=log)
        s = systems["slab"]
        with Client(address) as c:
            got = c.compute(s)
        _close(got, local.compute([s])[0], "torchrun", s)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.timeout(300)
def test_slurm_launch(tmp_path, local, systems, processes):
    """Two ``mlipd serve`` processes with srun's variables (loopback rendezvous) form
    one engine: rank 0 serves, rank 1 follows, and the result equals P = 1."""
    import socket
    import subprocess
    import sys

    from mlipd.client import Client
    from mlipd.server.testing import read_ready

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "mlipd", "serve", "--model", "reference", "--dtype", "float64",
           "--zmq", "tcp://127.0.0.1:0"]
    env = dict(SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2", SLURM_JOB_ID="7",
               SLURM_STEP_NODELIST="127.0.0.1", MASTER_PORT=str(port))
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = []
    for r in range(2):
        with open(logs[r], "wb") as err:
            procs.append(processes.start(cmd, stdout=subprocess.PIPE, stderr=err,
                                         env={**env, "SLURM_PROCID": str(r),
                                              "SLURM_LOCALID": str(r)}))
    (address,) = read_ready(procs[0], timeout_s=120, log=logs[0])
    s = systems["slab"]
    with Client(address) as c:
        got = c.compute(s)
        assert c.info()["ranks"] == 2
    _close(got, local.compute([s])[0], "srun", s)


# --- the generic communicator API (used by models with bond graphs) ----------------

def _wants(r: int, p: int) -> list[tuple[int, int]]:
    """Keys (owner, k) rank r asks for: two from its right neighbour, one (twice) from
    the next one, so scatter-adds accumulate."""
    return [((r + 1) % p, 0), ((r + 1) % p, 2), ((r + 2) % p, 1), ((r + 2) % p, 1)]


def _comm_check(rank: int, world: int) -> dict:
    from mlipd.errors import CalculationFailed

    comm = Comm()
    owned_keys = torch.tensor([[rank, k] for k in range(4)])
    wanted = _wants(rank, world)
    plan = comm.plan_from_keys(owned_keys, torch.tensor(wanted),
                               torch.tensor([o for o, _ in wanted]))
    x = (10.0 * rank + torch.arange(4, dtype=torch.float64)).repeat(2, 1).T.contiguous()
    x.requires_grad_(True)
    got = comm.exchange(plan, x)
    weights = torch.arange(1.0, 1.0 + got.numel(), dtype=torch.float64).view_as(got)
    (grad,) = torch.autograd.grad((got * weights).sum(), x)
    want_grad = torch.zeros(4, 2, dtype=torch.float64)
    for q in range(world):  # every rank's request pattern is known: expected grads
        for row, (o, k) in enumerate(_wants(q, world)):
            if o == rank:
                want_grad[k] += torch.arange(1.0 + 2 * row, 3.0 + 2 * row)
    partial_owned = torch.ones(4, 1, dtype=torch.float64)
    partial_wanted = torch.full((len(wanted), 1), 2.0, dtype=torch.float64)
    # an item held by its owner and others: every holder gets the sum of all partials
    total_owned = partial_owned + comm.scatter_home(plan, partial_wanted)
    total_wanted = comm.exchange(plan, total_owned)
    y = torch.full((3,), float(rank + 1), dtype=torch.float64, requires_grad=True)
    (gy,) = torch.autograd.grad((comm.all_reduce_sum(y) * (rank + 1)).sum(), y)
    bad_owner = torch.tensor([0]) if rank == 1 else torch.zeros(0, dtype=torch.long)
    bad_keys = torch.tensor([[0, 99]]) if rank == 1 else torch.zeros(0, 2, dtype=torch.long)
    try:
        comm.plan_from_keys(owned_keys, bad_keys, bad_owner)
        missing = None
    except CalculationFailed as e:
        missing = str(e)
    return {"got": got.detach(), "want": torch.tensor(
                [[10.0 * o + k] * 2 for o, k in wanted]),
            "grad": grad, "want_grad": want_grad, "total_owned": total_owned,
            "total_wanted": total_wanted, "gy": gy, "missing": missing}


def test_comm_exchange_adjoint_replicas_allreduce():
    p = 3
    results = run_on_ranks(_comm_check, p, timeout_s=120)
    for rank, r in enumerate(results):
        assert torch.equal(r["got"], r["want"])
        assert torch.equal(r["grad"], r["want_grad"])  # scatter-add of duplicates included
        # key (rank, k) is held by its owner (1) and asked by others (2 per request row)
        asks = [sum(1 for q in range(p) for o, kk in _wants(q, p) if (o, kk) == (rank, k))
                for k in range(4)]
        assert r["total_owned"].view(-1).tolist() == [1.0 + 2.0 * a for a in asks]
        for row, (o, k) in enumerate(_wants(rank, p)):
            assert r["total_wanted"][row, 0] == results[o]["total_owned"][k, 0]
        assert torch.equal(r["gy"], torch.full((3,), float(sum(range(1, p + 1))),
                                                dtype=torch.float64))
        assert (r["missing"] is not None) == (rank == 0)
    assert "does not own" in results[0]["missing"]


def _rank_children() -> list[int]:
    """This process's children that are rank processes (``mlipd.engine.rank_main``)."""
    return rank_pids(os.getpid())


def test_bad_model_fails_before_any_rank_starts():
    from mlipd.engine import make_engine
    from mlipd.errors import UnknownModel

    before = _rank_children()
    with pytest.raises(UnknownModel):
        make_engine("no-such-model", ranks=2)
    assert _rank_children() == before



# each case runs in a fresh process (torch.distributed's state is per process): its
# prologue, then two ranks that must give one rank's energy
_TWO_RANKS_EQUAL_ONE = """
from mlipd.engine import make_engine
from mlipd.testing.systems import bulk_box

s = bulk_box(repeat=2)
(want,) = make_engine("lj", dtype="float64").compute([s])
engine = make_engine("lj", dtype="float64", ranks=2, timeout_s=30)
(got,) = engine.compute([s])
engine.close()
assert abs(got.energy - want.energy) <= 1e-9 * abs(want.energy), (got.energy, want.energy)
print("ok")
"""


def _two_ranks_after(tmp_path, prologue: str, **env: str):
    """Run ``prologue`` then ``_TWO_RANKS_EQUAL_ONE`` in a new interpreter; its output."""
    import subprocess
    import sys

    script = tmp_path / "two_ranks.py"
    script.write_text(prologue + _TWO_RANKS_EQUAL_ONE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=150, env=dict(os.environ, OMP_NUM_THREADS="1", **env))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok"), done.stdout
    return done


_FAILED_JOIN = """
import datetime, sys
import torch.distributed as dist
from mlipd.engine.ranks import init_process_group

store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False,
                      timeout=datetime.timedelta(seconds=10))
try:  # rank 1 never comes: the join fails, as when a rank dies between its key and it
    init_process_group(backend="gloo", rank=0, world_size=2, timeout_s=10, store=store,
                       connect_timeout_s=0.5)
except RuntimeError:
    pass
else:
    sys.exit("a join without rank 1 succeeded")
"""


@pytest.mark.timeout(180)
def test_a_failed_join_does_not_spoil_the_next_start(tmp_path):
    """A rank killed between its announcement and its connection fails that start;
    the next start of the same process must work (it once waited on the wrong keys
    for ever, so every later request got 'could not restart ranks')."""
    _two_ranks_after(tmp_path, _FAILED_JOIN)


# loaded by every Python process started with this directory on PYTHONPATH: the first
# rank process to join sleeps between announcing itself and connecting, alive
_SLOW_RANK_SITECUSTOMIZE = """
import os

with open("/proc/self/cmdline", "rb") as f:  # sys.argv is not set yet
    rank_process = b"mlipd.engine.rank_main" in f.read()
if os.environ.get("SLOW_JOIN_MARKER") and rank_process:
    import time
    import torch.distributed as dist

    plain = dist.init_process_group

    def slow(*args, **kwargs):
        marker = os.environ["SLOW_JOIN_MARKER"]
        if not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(4.0)
        return plain(*args, **kwargs)

    dist.init_process_group = slow
"""


@pytest.mark.timeout(180)
def test_ranks_slow_to_connect_are_started_again(tmp_path):
    """A rank alive but slower to connect than the connection bound (a loaded machine)
    is not an error: the ranks are started once more (a dead rank is, at once)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SLOW_RANK_SITECUSTOMIZE)
    marker = tmp_path / "slept"
    done = _two_ranks_after(
        tmp_path, "import logging, sys\nlogging.basicConfig(level=logging.WARNING, "
        "stream=sys.stdout)\n", SLOW_JOIN_MARKER=str(marker),
        PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    assert marker.exists()  # the first rank did sleep
    assert "did not connect within" in done.stdout, done.stdout
    assert "starting the ranks again" in done.stdout, done.stdout
