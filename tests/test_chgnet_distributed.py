"""Distributed CHGNet: P real gloo processes equal P = 1 to float64 round-off.

Each rank runs the engine's own per-rank step (``mlipd.engine.step.RankStep``) on the
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
from mlipd.engine.step import Frame, RankStep
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
    model = for_inference(CHGNetModel(), torch.device("cpu"), torch.float64)  # as build_model
    step = RankStep(model, Comm(), device=torch.device("cpu"), dtype=torch.float64, skin=0.0)
    out = []
    for s in structures:
        frame = _frame(s, world_size)
        step.rebuild(frame)
        r = step.run(frame, virial=True)
        out.append({"energy": r.energies.numpy(), "virial": r.virials.numpy(),
                    "rows": r.rows.numpy(), "ids": r.owned_ids, "counters": dict(model.counters)})
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
        n = structures[name].n_atoms
        energy = sum(float(r[k]["energy"][0]) for r in per_rank)
        virial = sum(r[k]["virial"][0] for r in per_rank)
        rows = np.full((n, 4), np.nan)
        for r in per_rank:
            rows[r[k]["ids"]] = r[k]["rows"]
        scale_f = np.abs(ref.forces).max()
        assert abs(energy - ref.energy) <= 1e-10 * abs(ref.energy), name
        np.testing.assert_allclose(rows[:, :3], ref.forces, rtol=0, atol=1e-10 * scale_f,
                                   err_msg=name)
        np.testing.assert_allclose(virial, ref.virial, rtol=0,
                                   atol=1e-10 * np.abs(ref.virial).max(), err_msg=name)
        np.testing.assert_allclose(rows[:, 3], ref.extras["magmoms"], rtol=0,
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
