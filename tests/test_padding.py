"""Atom and edge counts padded to buckets (what captured CUDA graphs replay on): the padding
changes no result, and a rebuild whose counts stay in their buckets keeps every shape, so
a captured graph is reused (its tensors overwritten in place). The capture itself needs a
GPU (``mlipd bench gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlipd.engine.cuda_graphs import GraphedRun, check_mode, copy_into, enabled, same_layout
from mlipd.engine.padding import bucket
from mlipd.engine.results import pack
from mlipd.engine.single_rank import SingleRankEngine
from mlipd.errors import SetupError
from mlipd.models.reference import ReferenceMP
from mlipd.testing import tolerances as tol
from mlipd.testing.systems import cases
from mlipd.types import Structure


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Intra-op threads fight over the 2 shared cores: this module runs on one."""


def test_buckets_cover_every_count_with_little_padding():
    last = 0
    for n in range(0, 5000):
        b = bucket(n)
        assert b >= n
        assert b >= last
        assert b - n <= max(n // 16, 0) + 1  # at most ~1/16 of padding
        last = b
    assert len({bucket(n) for n in range(1000, 2000)}) <= 17  # few shapes per octave


def _moves(s: Structure, n: int, seed: int, scale: float = 0.05) -> list[Structure]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pos = s.positions + rng.normal(scale=scale, size=s.positions.shape)
        out.append(Structure(numbers=s.numbers, positions=pos, cell=s.cell, pbc=s.pbc))
    return out


def _check_padding_changes_nothing(factory, batch: list[Structure], *,
                                   extras_scale: dict[str, float] | None = None):
    """Padded and plain batches: the same edges, padding rows and edges masked (zero
    terms in the sums, maybe another order): two float64 computations (``tol.float64``)."""
    plain = SingleRankEngine(factory(), dtype=torch.float64)
    padded = SingleRankEngine(factory(), dtype=torch.float64, pad=True)
    steps = [batch] + [list(t) for t in zip(*[_moves(s, 4, k) for k, s in enumerate(batch)],
                                             strict=True)]
    for structures in steps:
        want = plain.compute(structures)
        got = padded.compute(structures)
        spec = plain.model.spec
        for s, g, w in zip(structures, got, want, strict=True):
            assert (g.virial is None) == (w.virial is None)
            tol.assert_within(g, w, s, tol.float64(w, s, spec.cutoff, layers=spec.n_layers,
                                                       extras_scale=extras_scale),
                              "padded")
    topo = padded.step.topology
    assert topo.n_owned > topo.n_real == sum(s.n_atoms for s in batch)  # really padded
    assert topo.n_edges == bucket(topo.n_edges)
    assert padded.rebuilds < len(steps)  # warm steps ran on the padded topology
    return padded


def test_padding_changes_nothing_reference():
    c = cases()
    _check_padding_changes_nothing(ReferenceMP, [c["triclinic"], c["slab"], c["molecule"]])


def test_padding_changes_nothing_mace():
    from model_cases import molecule, small_triclinic
    from test_mace import ZS, small_mace

    batch = [Structure.from_atoms(a) for a in (small_triclinic(ZS), molecule(ZS))]
    _check_padding_changes_nothing(small_mace, batch)


def test_padding_changes_nothing_chgnet():
    from ase.build import bulk

    from mlipd.models.chgnet import CHGNetModel

    si = bulk("Si", "diamond", a=5.43, cubic=True)
    si.rattle(0.05, seed=1)
    c = cases()
    _check_padding_changes_nothing(CHGNetModel, [Structure.from_atoms(si), c["triclinic"]],
                                   extras_scale={"magmoms": 1.0})  # as in test_chgnet


def test_a_rebuild_within_the_buckets_keeps_every_shape():
    """Two topologies of one structure (moved past the skin: a rebuild) with slightly
    different edge counts: after the first step of each (the model's caches made), the
    second's tensors fit the first's (``same_layout``), and run in them they give the
    second's own results: what adopting a captured graph does."""
    s = cases()["triclinic"]
    moved = _moves(s, 1, 7, scale=0.3)[0]
    first = SingleRankEngine(ReferenceMP(), dtype=torch.float64, pad=True)
    first.compute([s])
    second = SingleRankEngine(ReferenceMP(), dtype=torch.float64, pad=True)
    (want,) = second.compute([moved])
    a, b = first.step.topology, second.step.topology
    assert a.n_owned == b.n_owned
    assert a.n_edges == b.n_edges
    assert not torch.equal(a.receivers, b.receivers)  # different topologies
    assert same_layout(a, b)
    copy_into(a, b)
    a.n_real = b.n_real
    assert torch.equal(a.receivers, b.receivers)
    first.step.topology = a
    x, cell = torch.as_tensor(moved.positions), torch.as_tensor(moved.cell[None])
    packed = pack(first.step.run(x, cell, virial=True))
    ref = pack(second.step.run(x, cell, virial=True))
    assert torch.equal(packed, ref)
    assert np.isfinite(want.energy)


def test_modes():
    cpu = torch.device("cpu")
    assert check_mode("auto") == "auto"
    with pytest.raises(SetupError, match="cuda_graphs"):
        check_mode("yes")
    model = ReferenceMP()
    assert not enabled("auto", cpu, model)
    assert not enabled("1", cpu, model)
    engine = SingleRankEngine(ReferenceMP(), cuda_graphs="1")  # CPU: eager, no padding
    assert engine.graphed is None
    assert not engine.step.pad
    # the runner falls back to the eager step while nothing can be captured
    run = GraphedRun(engine.step)
    run.failed = True
    s = cases()["molecule"]
    engine.compute([s])
    out = run(torch.as_tensor(s.positions), torch.as_tensor(s.cell[None]), virial=False,
              rebuilt=False)
    assert torch.equal(pack(out), pack(engine.step.run(torch.as_tensor(s.positions),
                                                      torch.as_tensor(s.cell[None]),
                                                      virial=False)))
