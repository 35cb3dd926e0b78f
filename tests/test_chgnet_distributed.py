"""Distributed CHGNet: P real gloo processes equal P = 1 to float64 round-off.

Each rank runs the engine's own per-rank step (``mlipd.engine.step.Step``) on the
partition the engine would choose, so the model code, halo plans and exchanges are
the production ones; the test additionally reads every rank's model counters (which
the engine does not gather) to check that atoms, directed edges and angles are each
computed on exactly one rank. One test goes through ``make_engine(ranks=2)`` end to end.
"""

import numpy as np
import pytest
import torch
from ase.build import bulk
from test_chgnet import slab, triclinic

from mlipd.engine import make_engine
from mlipd.engine.comm import Comm
from mlipd.engine.local import LocalEngine, for_inference
from mlipd.engine.partition import Geometry, partition_batch
from mlipd.engine.results import assemble
from mlipd.engine.step import Frame, Step
from mlipd.models.chgnet import CHGNetModel
from mlipd.testing.ranks import run_on_ranks
from mlipd.types import Structure

pytestmark = pytest.mark.timeout(600)


def oxide512(seed=0):
    """(Mn,Ni)O rocksalt, 4x4x4 conventional cells (512 atoms, 17.6 Å), rattled."""
    rng = np.random.default_rng(seed)
    atoms = bulk("MnO", "rocksalt", a=4.40, cubic=True).repeat((4, 4, 4))
    cations = np.flatnonzero(atoms.numbers == 25)
    atoms.numbers[rng.permutation(cations)[: len(cations) // 2]] = 28
    atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
    return atoms


CASES = {"oxide512": oxide512, "triclinic": triclinic, "slab": slab}


def _frame(structure: Structure, world_size: int) -> Frame:
    owner = partition_batch([Geometry(structure.positions, structure.cell, structure.pbc)],
                            world_size, radius=6.0)
    return Frame(numbers=structure.numbers, positions=structure.positions,
                 cells=structure.cell[None], pbc=structure.pbc[None],
                 offsets=np.array([0, structure.n_atoms]), owner=owner)


def _rank_fn(rank, world_size, structures):
    """On every rank: each structure partitioned over all ranks, one step each."""
    model = for_inference(CHGNetModel(), torch.device("cpu"), torch.float64)  # as rank_step
    step = Step(model, Comm(), device=torch.device("cpu"), dtype=torch.float64, skin=0.0)
    out = []
    for s in structures:
        frame = _frame(s, world_size)
        step.rebuild(frame)
        packed = step.run(torch.as_tensor(s.positions), torch.as_tensor(s.cell[None]),
                          virial=True)
        g = step.last_graph
        out.append({"packed": packed.numpy(), "ids": g.global_ids[: g.n_owned].numpy(),
                    "layout": step.layout, "counters": dict(model.counters)})
    return out


@pytest.fixture(scope="module")
def structures():
    return {name: Structure.from_atoms(f()) for name, f in CASES.items()}


@pytest.fixture(scope="module")
def reference(structures):
    """P = 1 (the single-process engine) and its counters."""
    engine = LocalEngine(CHGNetModel(), dtype=torch.float64)
    out = {}
    for name, s in structures.items():
        (r,) = engine.compute([s])
        out[name] = (r, dict(engine.model.counters))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_equal_single_process(structures, reference, world_size):
    names = list(structures)
    per_rank = run_on_ranks(_rank_fn, world_size, [structures[n] for n in names],
                            timeout_s=500)
    for k, name in enumerate(names):
        ref, ref_counts = reference[name]
        (got,), _ = assemble([structures[name]], [r[k]["packed"] for r in per_rank],
                             [r[k]["ids"] for r in per_rank], per_rank[0][k]["layout"],
                             virial=True)
        scale_f = np.abs(ref.forces).max()
        assert abs(got.energy - ref.energy) <= 1e-10 * abs(ref.energy), name
        np.testing.assert_allclose(got.forces, ref.forces, rtol=0, atol=1e-10 * scale_f,
                                   err_msg=name)
        np.testing.assert_allclose(got.virial, ref.virial, rtol=0,
                                   atol=1e-10 * np.abs(ref.virial).max(), err_msg=name)
        np.testing.assert_allclose(got.extras["magmoms"], ref.extras["magmoms"], rtol=0,
                                   atol=1e-10 * max(ref.extras["magmoms"]), err_msg=name)

        # zero redundancy: every atom, directed edge, bond and angle on exactly one rank
        counts = {key: sum(r[k]["counters"][key] for r in per_rank) for key in ref_counts}
        for key in ("atoms", "directed_edges", "bonds", "angles"):
            assert counts[key] == ref_counts[key], (name, key)
        # exchanges per rank: 3 atom halos; bond embeddings spread once, then per block
        # replicas' partial sums home and new bond features back; exactly those rows
        blocks = ref_counts["atom_exchanges"]
        assert blocks == 3
        assert counts["atom_rows_received"] == blocks * counts["halo_atoms"]
        assert counts["bond_exchanges"] == (1 + 2 * blocks) * world_size
        assert counts["bond_rows_received"] == (
            (1 + blocks) * counts["bond_replicas"] + blocks * counts["short_replicas"])
        if world_size == 1:
            assert counts["halo_atoms"] == counts["bond_replicas"] == 0
        else:
            assert counts["halo_atoms"] > 0, name
            assert counts["short_replicas"] > 0, name

def test_distributed_one_rank_equals_local(structures, reference):
    """``DistributedEngine(ranks=1)`` runs the same step as ``LocalEngine``: a batch with
    magnetic moments agrees to 1e-12."""
    from mlipd.engine.distributed import DistributedEngine

    names = list(structures)
    with DistributedEngine("chgnet", ranks=1, dtype=torch.float64) as engine:
        results = engine.compute([structures[n] for n in names])
    for name, r in zip(names, results, strict=True):
        ref = reference[name][0]
        assert r.energy == pytest.approx(ref.energy, rel=1e-12)
        np.testing.assert_allclose(r.forces, ref.forces, rtol=0,
                                   atol=1e-12 * np.abs(ref.forces).max())
        np.testing.assert_allclose(r.virial, ref.virial, rtol=0,
                                   atol=1e-12 * np.abs(ref.virial).max())
        np.testing.assert_allclose(r.extras["magmoms"], ref.extras["magmoms"], rtol=0,
                                   atol=1e-12 * max(ref.extras["magmoms"]))


@pytest.mark.parametrize("model", ["chgnet", "chgnet:0.3.0,recompute=1"])
def test_make_engine_two_ranks(structures, reference, model):
    """The product path: ``make_engine("chgnet", ranks=2)`` on a batch; with
    recomputation in backward, the forces are the same."""
    names = ["triclinic", "slab"]
    with make_engine(model, ranks=2, dtype="float64") as engine:
        results = engine.compute([structures[n] for n in names])
    for name, r in zip(names, results, strict=True):
        ref = reference[name][0]
        assert r.energy == pytest.approx(ref.energy, rel=1e-10)
        np.testing.assert_allclose(r.forces, ref.forces, rtol=0, atol=1e-9)
        np.testing.assert_allclose(r.virial, ref.virial, rtol=0, atol=1e-9)
        np.testing.assert_allclose(r.extras["magmoms"], ref.extras["magmoms"], atol=1e-10)


def test_md_with_reused_bond_graph_equals_fresh_lists():
    """Positions drift over 12 steps: edges and angles enter and leave the cutoffs while
    the topology (and with it the bond graph, built once per rebuild) is reused at
    P = 1 and P = 2; every step equals a fresh neighbour list (skin 0)."""
    from test_chgnet import oxide

    rng = np.random.default_rng(11)
    s0 = Structure.from_atoms(oxide(seed=3))
    steps, x = [], s0.positions.copy()
    for _ in range(12):
        x = x + rng.normal(scale=0.04, size=x.shape)
        steps.append(Structure(s0.numbers, x.copy(), s0.cell, s0.pbc))
    fresh = LocalEngine(CHGNetModel(), dtype=torch.float64, skin=0.0)
    reuse = LocalEngine(CHGNetModel(), dtype=torch.float64, skin=0.5)
    built = pruned = 0
    with make_engine("chgnet", ranks=2, dtype="float64") as two:
        for s in steps:
            (want,) = fresh.compute([s])
            (got,) = reuse.compute([s])
            built += reuse.model.counters["bond_graph_built"]
            pruned += reuse.step.last_graph.edge_ids is not None
            (got2,) = two.compute([s])
            for r in (got, got2):
                assert r.energy == pytest.approx(want.energy, rel=1e-12)
                np.testing.assert_allclose(r.forces, want.forces, rtol=0, atol=1e-10)
                np.testing.assert_allclose(r.virial, want.virial, rtol=0, atol=1e-9)
                np.testing.assert_allclose(r.extras["magmoms"], want.extras["magmoms"],
                                           atol=1e-11)
        assert two.rebuilds < len(steps)
    assert fresh.rebuilds == len(steps)
    assert built == reuse.rebuilds < len(steps) // 2
    assert pruned >= len(steps) - reuse.rebuilds  # pairs beyond the cutoff were dropped
