"""Partitioner, bin grid, per-rank graph construction and the rebuild policy (no ranks)."""

from __future__ import annotations

import numpy as np
import pytest

from mlipd.engine.bins import BinGrid
from mlipd.engine.neighbors import neighbor_list
from mlipd.engine.partition import Geometry, partition_batch, partition_structure
from mlipd.engine.topology import build_topology
from mlipd.engine.verlet import RebuildPolicy
from mlipd.errors import SetupError
from mlipd.testing.systems import bulk_box, cases
from mlipd.types import Structure

CUTOFF = 5.0


def geometry(s: Structure) -> Geometry:
    return Geometry(s.positions, s.cell, s.pbc)


def halo_sizes(s: Structure, owner: np.ndarray, n_parts: int) -> np.ndarray:
    e = neighbor_list(s, CUTOFF)
    cut = owner[e.centers] != owner[e.neighbors]
    pairs = np.unique(np.column_stack([owner[e.centers[cut]], e.neighbors[cut]]), axis=0)
    return np.bincount(pairs[:, 0], minlength=n_parts)


@pytest.mark.parametrize("method", ["rcb", "slab", "metis"])
@pytest.mark.parametrize("n_parts", [2, 3, 8])
def test_partition_covers_and_balances(method, n_parts):
    s = bulk_box(repeat=6)
    owner = partition_structure(geometry(s), n_parts, radius=CUTOFF, method=method)
    counts = np.bincount(owner, minlength=n_parts)
    assert owner.shape == (s.n_atoms,)
    assert counts.sum() == s.n_atoms
    assert set(np.unique(owner)) == set(range(n_parts))
    assert counts.max() / counts.mean() < 1.1


def test_rcb_and_metis_halo_beat_slabs():
    s = bulk_box(repeat=10)  # 4000 atoms, 36 Å: 16 slabs are thinner than the cutoff
    halo = {m: halo_sizes(s, partition_structure(geometry(s), 16, radius=CUTOFF, method=m), 16)
            for m in ("slab", "rcb", "metis")}
    assert halo["rcb"].sum() < 0.8 * halo["slab"].sum()
    assert halo["metis"].sum() < 0.8 * halo["slab"].sum()


def test_unknown_method():
    with pytest.raises(SetupError, match="partition method"):
        partition_structure(geometry(bulk_box(repeat=2)), 2, radius=CUTOFF, method="bogus")


@pytest.mark.parametrize("name", ["bulk", "triclinic", "slab", "molecule", "sparse"])
def test_candidates_are_a_superset(name):
    s = cases()[name]
    rng = np.random.default_rng(0)
    e = neighbor_list(s, CUTOFF)
    grid = BinGrid(s.positions, s.cell, s.pbc, radius=CUTOFF)
    for _ in range(5):
        mask = rng.random(s.n_atoms) < 0.1
        mask[rng.integers(s.n_atoms)] = True
        cand = grid.candidates(mask)
        need = np.zeros(s.n_atoms, bool)
        need[e.neighbors[mask[e.centers]]] = True
        assert cand[mask].all()
        assert cand[need].all()


@pytest.mark.parametrize("n_parts", [1, 2, 3, 8])
@pytest.mark.parametrize("name", ["bulk", "triclinic", "slab", "molecule", "sparse"])
def test_topologies_partition_the_edge_list(name, n_parts):
    """Across ranks every edge (r < radius) exists once, received by an owned atom."""
    s = cases()[name]
    owner = partition_structure(geometry(s), n_parts, radius=CUTOFF)
    keys, owned = [], []
    for r in range(n_parts):
        t = build_topology(positions=s.positions, cells=s.cell[None], pbc=s.pbc[None],
                           offsets=np.array([0, s.n_atoms]), owner=owner, rank=r, radius=CUTOFF)
        assert (t.receivers < t.n_owned).all()
        assert (t.local_owner[: t.n_owned] == r).all()
        assert (t.local_owner[t.n_owned:] != r).all()
        assert len(np.unique(t.local_ids)) == t.n_local  # images of an atom: one halo row
        ids = t.local_ids
        keys.append(np.column_stack([ids[t.receivers], ids[t.senders], t.images]))
        owned.append(ids[: t.n_owned])
    keys = np.concatenate(keys)
    e = neighbor_list(s, CUTOFF)
    full = np.column_stack([e.centers, e.neighbors, e.shifts])
    # the subset lists may hold pairs at r == radius within round-off: compare within
    vec = lambda k: (s.positions[k[:, 1]] - s.positions[k[:, 0]] + k[:, 2:] @ s.cell)  # noqa: E731
    keys = keys[np.linalg.norm(vec(keys), axis=1) < CUTOFF]
    assert len(np.unique(keys, axis=0)) == len(keys)
    assert np.array_equal(np.unique(keys, axis=0), np.unique(full, axis=0))
    assert np.array_equal(np.sort(np.concatenate(owned)), np.arange(s.n_atoms))


def test_batch_packs_whole_structures_when_balanced():
    s = [cases()["molecule"]] * 4
    owner = partition_batch([geometry(x) for x in s], 2, radius=CUTOFF)
    per = owner.reshape(4, -1)
    assert all(len(set(row)) == 1 for row in per)
    assert set(owner) == {0, 1}
    big = [bulk_box(repeat=3), cases()["molecule"]]  # unbalanced: split each
    owner = partition_batch([geometry(x) for x in big], 2, radius=CUTOFF)
    assert set(owner[:108]) == {0, 1}


def test_rebuild_policy():
    s = bulk_box(repeat=2)
    pol = RebuildPolicy(skin=0.4)
    assert pol.decide([s])
    moved = Structure(s.numbers, s.positions + np.array([0.19, 0, 0]), s.cell, s.pbc)
    assert not pol.decide([moved])
    far = s.positions + np.array([0.21, 0, 0])
    assert pol.decide([Structure(s.numbers, far, s.cell, s.pbc)])
    assert pol.decide([Structure(s.numbers, far, s.cell * 1.001, s.pbc)])
    z = s.numbers.copy()
    z[0] = 1
    assert pol.decide([Structure(z, s.positions + np.array([0.21, 0, 0]), s.cell * 1.001, s.pbc)])
    assert pol.decide([s, s])
    pol.report_load([100, 100])
    assert not pol.decide([s, s])
    pol.report_load([190, 10])
    assert pol.decide([s, s])
    never = RebuildPolicy(skin=0.0)
    assert never.decide([s])
    assert never.decide([s])
