"""The engine's one step: the same results, extras and uploads at every number of ranks,
device and backend choices, and the launchers' view of the job."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from fault_models import ExtrasModel

from mlipd.engine import make_engine
from mlipd.engine.devices import pick_backend, resolve_device
from mlipd.engine.distributed import DistributedEngine
from mlipd.engine.single_rank import SingleRankEngine
from mlipd.errors import SetupError
from mlipd.launch import detect_world, first_host
from mlipd.models.reference import ReferenceMP
from mlipd.testing import tolerances as tol
from mlipd.testing.hostreads import warm_step_reads
from mlipd.testing.systems import cases
from mlipd.types import Structure


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Intra-op threads fight over the 2 shared cores: this module runs on one."""


def _batch() -> list[Structure]:
    c = cases()
    return [c["triclinic"], c["slab"], c["molecule"], c["sparse"]]


def _same(got, want, structures, *, exact: bool = False) -> None:
    """Results of the same model: bit for bit (``exact``), or within the float64 bound of
    ``mlipd.testing.tolerances`` (summed by rank, the halo's edge vectors built by other
    operations: the stiffness measured), each atom's energy and every extra included."""
    engine = SingleRankEngine(ExtrasModel(), dtype=torch.float64, skin=0.0)
    for g, w, s in zip(got, want, structures, strict=True):
        # per-atom energies: each atom's term from its owner, summing to the energy
        assert g.energies.shape == (len(w.forces),)
        assert abs(g.energies.sum() - g.energy) <= (tol.roundings(s.n_atoms)
                                                    * np.abs(g.energies).sum())
        assert (g.virial is None) == (w.virial is None)
        assert set(g.extras) == set(w.extras)
        for k, v in w.extras.items():
            assert np.shape(g.extras[k]) == np.shape(v), k
        if exact:
            assert g.energy == w.energy
            for a, b in [(g.forces, w.forces), (g.energies, w.energies),
                         (g.virial, w.virial), *((g.extras[k], v) for k, v in w.extras.items())]:
                np.testing.assert_array_equal(a, b)
            continue
        ours = dataclasses.replace(g, extras={**g.extras, "energies": g.energies})
        theirs = dataclasses.replace(w, extras={**w.extras, "energies": w.energies})
        tol.assert_within(ours, theirs, s, tol.measured_float64(engine, s, theirs),
                          "P ranks vs one")


def test_extras_of_any_shape_reach_the_caller_alike_at_p1_and_p3():
    batch = _batch()
    local = SingleRankEngine(ExtrasModel(), dtype=torch.float64).compute(batch)
    first = 0
    for s, r in zip(batch, local, strict=True):
        assert np.shape(r.extras["charge"]) == (s.n_atoms,)
        assert np.shape(r.extras["dipole"]) == (s.n_atoms, 3)
        assert np.shape(r.extras["quadrupole"]) == (s.n_atoms, 2, 3)
        # the atom's batch-global id, in the caller's order: rows were put back in place
        assert [d[1] for d in r.extras["dipole"]] == pytest.approx(first + np.arange(s.n_atoms))
        first += s.n_atoms
    with DistributedEngine(ExtrasModel, ranks=3, dtype=torch.float64) as engine:
        _same(engine.compute(batch), local, batch)
        for s in batch:  # alone: every structure split over the three ranks
            _same(engine.compute([s]), SingleRankEngine(ExtrasModel(), dtype=torch.float64)
                  .compute([s]), [s])


def test_local_and_distributed_at_one_rank_agree():
    batch = _batch()
    want = SingleRankEngine(ExtrasModel(), dtype=torch.float64).compute(batch)
    with DistributedEngine(ExtrasModel, ranks=1, dtype=torch.float64) as engine:
        got = engine.compute(batch)
        assert engine.world_size == 1
    _same(got, want, batch, exact=True)  # one rank: the same operations


def test_warm_step_uploads_positions_and_cells_only():
    """Host-to-device bytes of a warm step: positions (N, 3) and cells (B, 3, 3) in
    float64, nothing of the topology (counted where every upload goes through)."""
    engine = SingleRankEngine(ExtrasModel(), dtype=torch.float64)
    s = cases()["bulk"]
    engine.compute([s])
    rebuild_bytes = engine.step.h2d.step_bytes
    moved = Structure(s.numbers, s.positions + 0.01, s.cell, s.pbc)
    engine.compute([moved])
    assert engine.rebuilds == 1
    assert engine.step.h2d.step_bytes == s.n_atoms * 3 * 8 + 9 * 8
    assert rebuild_bytes > 10 * engine.step.h2d.step_bytes  # the topology went up once


def test_distributed_reports_its_devices_and_dtype():
    with DistributedEngine(functools.partial(ExtrasModel, "layers=1"), ranks=2,
                           dtype=torch.float32) as engine:
        assert engine.device == torch.device("cpu")
        assert engine.devices == ("cpu", "cpu")
        assert engine.dtype == torch.float32
        assert engine.backend == "gloo"


def test_device_names_fail_in_one_line():
    assert resolve_device("auto") == torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SetupError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(SetupError, match="use --device cpu"):
            make_engine("lj", device="cuda")
        with pytest.raises(SetupError, match="use --device cpu"):
            make_engine("lj", devices=["cpu", "cuda:1"], ranks=2)


def test_backend_follows_gpus_per_rank():
    assert pick_backend("auto", ["cpu"], 4) == "gloo"
    assert pick_backend("auto", ["cuda:0", "cuda:1"], 2) == "nccl"
    assert pick_backend("auto", ["cuda:0"], 2) == "gloo"  # two ranks share the GPU
    assert pick_backend("gloo", ["cuda:0", "cuda:1"], 2) == "gloo"
    with pytest.raises(SetupError, match="one GPU per rank"):
        pick_backend("nccl", ["cuda:0"], 2)
    with pytest.raises(SetupError, match="backend 'mpi'"):
        pick_backend("mpi", ["cpu"], 1)


def test_launchers_are_read_from_their_own_variables():
    assert detect_world({}) is None
    assert detect_world({"RANK": "0", "WORLD_SIZE": "1"}) is None
    w = detect_world({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                      "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "29511"})
    assert (w.rank, w.size, w.local_rank, w.local_size, w.host, w.port) == (
        3, 8, 1, 2, "n1", 29511)
    # sbatch's own shell (no srun step) is not a job of several ranks
    assert detect_world({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) is None
    w = detect_world({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
                      "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "123456",
                      "SLURM_STEP_NODELIST": "gpu[07-08]"})
    assert (w.rank, w.size, w.local_rank, w.local_size, w.host) == (5, 8, 1, 4, "gpu07")
    assert w.port == 20000 + 123456 % 20000
    assert first_host("a1,b[2-3]") == "a1"
    assert first_host("node[009,011-012]") == "node009"


@pytest.mark.parametrize("ranks", [1, 2])
def test_warm_step_of_the_engine_reads_nothing_back(ranks):
    """The engine's own part of a warm step (edges beyond the cutoff, forces, virial,
    packing) makes no data-dependent host read with a ``masked_edges`` model in the
    fixed-shape step a GPU runs; one that selects its edges costs exactly one (the
    selection's ``nonzero``)."""
    s = cases()["triclinic"]
    for reads in warm_step_reads(ReferenceMP, s, ranks):
        assert reads.total == 0, reads.report()
    for reads in warm_step_reads(SelectingReference, s, 1):
        assert reads.counts == {"nonzero": 1}, reads.report()


class SelectingReference(ReferenceMP):
    """The reference model without ``masked_edges``: the engine selects its edges."""

    def __init__(self) -> None:
        super().__init__()
        self.spec = dataclasses.replace(self.spec, masked_edges=False)


def test_step_headers_are_fixed_size_tensors():
    """What rank 0 broadcasts each step: HEADER_WORDS int64 numbers (no pickling), and on
    a rebuild the structures' sizes and pbc as a (B, 4) table."""
    from mlipd.engine.rank_loop import (
        HEADER_WORDS,
        STEP,
        StepHeader,
        decode_structures,
        encode_header,
        encode_structures,
    )

    h = StepHeader(cmd=STEP, counts=(3, 5), pbc=((True, True, True), (True, True, False)),
                   virial=False, rebuild=True)
    words = encode_header(h)
    assert words.dtype == torch.long
    assert words.tolist() == [0, 0, 1, 2, 8]
    assert len(words) == HEADER_WORDS
    back = decode_structures(encode_structures(h))
    assert (back.counts, back.pbc) == (h.counts, h.pbc)
