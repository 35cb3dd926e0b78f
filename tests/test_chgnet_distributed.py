"""Distributed CHGNet: P real gloo processes equal P = 1 to float64 round-off, with no
work done twice.

Each rank runs the engine's own step (``Coordinator`` and ``RankLoop``) on the partition
the engine chooses, so the model code, halo plans and exchanges are the production ones;
``mlipd.testing.check_zero_redundancy`` measures every rank's forward and backward (per
aten op: FLOPs, elements; rows moved by each exchange) against P = 1's. One test goes
through ``make_engine(ranks=2)`` end to end.
"""

import numpy as np
import pytest
import torch
from ase.build import bulk
from model_cases import as_structures, check_float32
from test_chgnet import molecule, slab, triclinic

from mlipd.engine import make_engine
from mlipd.engine.single_rank import SingleRankEngine
from mlipd.models.chgnet import CHGNetModel, load_chgnet
from mlipd.testing import check_zero_redundancy
from mlipd.testing import tolerances as tol
from mlipd.testing.work import Work, measure_runs
from mlipd.types import Structure

pytestmark = pytest.mark.timeout(600)


def oxide(repeat=3, seed=0):
    """(Mn,Ni)O rocksalt, repeat³ conventional cells (216 atoms at 3, 13.2 Å), rattled."""
    rng = np.random.default_rng(seed)
    atoms = bulk("MnO", "rocksalt", a=4.40, cubic=True).repeat((repeat,) * 3)
    cations = np.flatnonzero(atoms.numbers == 25)
    atoms.numbers[rng.permutation(cations)[: len(cations) // 2]] = 28
    atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
    return atoms


# bulk split 8 ways (27 owned, ~185 halo atoms per rank), 4 atoms (ranks without
# atoms at P = 8), an open slab and an isolated cluster
CASES = {"bulk": oxide, "triclinic": triclinic, "slab": lambda: slab(pbc_z=False),
         "molecule": molecule}


@pytest.fixture(scope="module")
def structures():
    return as_structures({name: f() for name, f in CASES.items()})


F64, F32 = torch.float64, torch.float32
RUNS = [(1, F64), (2, F64), (4, F64), (8, F64), (4, F32)]


@pytest.fixture(scope="module")
def runs(structures):
    """Every P, float64, and float32 at P = 4: one spawn of 8 ranks, each run measured."""
    return measure_runs(CHGNetModel, list(structures.values()), RUNS)


@pytest.fixture(scope="module")
def reference(structures, runs):
    """P = 1, float64: the same step at one rank."""
    return {name: m.result for name, m in zip(structures, runs[(1, F64)], strict=True)}


def bond_traffic(blocks: int):
    """CHGNet's own exchanges besides the atom halo: bond embeddings and weights spread
    once, then per block the replicas' partial sums home and the new bond features
    back; rows: every replica per spread, every short replica per sum."""

    def expected(works: list[Work]) -> tuple[int, int]:
        replicas = sum(w.info["bond_replicas"] for w in works)
        short = sum(w.info["short_replicas"] for w in works)
        return 1 + 2 * blocks, (1 + blocks) * replicas + blocks * short

    return expected


# Elements and FLOPs exact per op, forward and backward. No atom, bond or angle is computed
# twice: a cut bond's features are computed by its owner (the replica's partial sum sent
# home and completed there, the new features sent back: ``comm.sum_home`` and
# ``comm.extend``, data movement as ``graph.exchange`` is). Declared, each measured
# exactly (tests/test_chgnet_distributed.py at P = 2, 4 and 8 on four structures):
# - per rank, on a rank owning nothing too: every linear layer and layer norm reads its
#   weights (mm, addmm, native_layer_norm and its backward; mm's 18 FLOPs: a 3-vector
#   times the cell per structure), and small per-structure constants (mul, sub, add,
#   select_backward, max, min, sqrt, reciprocal); and on a rank holding atoms, the range
#   of its bond keys (min, max and the span: sub, add; ``chgnet_graph._unique_rows``);
# - per halo atom: autograd's sums of the gradients of its rows (its position, 9; its
#   features, 6 adds of a 64-wide row) and its embedding looked up from its
#   species (sub, embedding: a table row, no arithmetic, in place of an exchange);
# - per replica bond (the model's ``bond_replicas``): autograd's sums of the gradients of
#   the [owned | replica] bond tensors (18 adds of a 64-wide row: the bond features of
#   three blocks and the two bond weights, read by every block), and the build of its
#   identity and plan once per topology (its keys renumbered: sort, _to_copy,
#   bitwise_not, index_put_, remainder, sum; its owner, keys and nearness gathered:
#   index, nonzero, _unique2);
# - per short replica (``short_replicas``): its row in the sum-home plan (index,
#   nonzero, _unique2).
CHGNET_DECLARED = dict(
    per_rank=("mm", "addmm", "native_layer_norm", "native_layer_norm_backward", "mul", "sub",
              "add", "select_backward", "max", "min", "sqrt", "reciprocal"),
    per_rank_holding_atoms={"min": (6, 0), "max": (6, 0), "sub": (12, 0), "add": (6, 0)},
    per_halo_row={"add": 1161, "sub": 2, "embedding": 129},
    per_counted_row={
        "bond_replicas": {"add": (3456, 0), "sort": (3, 0), "_to_copy": (2, 0),
                          "bitwise_not": (2, 0), "index_put_": (3, 0), "remainder": (2, 0),
                          "sum": (1, 0), "index": (47, 0), "nonzero": (1, 0),
                          "_unique2": (1, 0)},
        "short_replicas": {"index": (15, 0), "nonzero": (1, 0), "_unique2": (2, 0)}},
    reason="weights read once per rank; a rank's bond keys' range; autograd's sums of the "
           "gradients of halo atom and replica bond rows; halo atoms' embeddings looked up; "
           "replica bonds' plans built")


@pytest.mark.parametrize("ranks", [2, 4, 8, pytest.param(3, marks=pytest.mark.slow)])
def test_ranks_equal_single_process_without_redundancy(structures, runs, ranks):
    blocks = load_chgnet().n_conv - 1
    got = check_zero_redundancy(CHGNetModel, structures, (ranks,),
                                runs=runs if (ranks, F64) in runs else None,
                                model_traffic=bond_traffic(blocks), **CHGNET_DECLARED)
    got = got[(ranks, F64)]
    for name, one, many in zip(structures, runs[(1, F64)], got, strict=True):
        # bonds and angles (graph sizes) each on one rank
        for key in ("bonds", "angles"):
            assert sum(w.info[key] for w in many.work) == one.work[0].info[key], (name, key)
        assert all(w.atom_exchanges == blocks for w in many.work), name
    assert sum(w.info["short_replicas"] for w in got[0].work) > 0  # bulk: cut bonds' sums


def test_float32_on_four_ranks(structures, runs):
    """The default precision, distributed, against float64 at P = 1: within the bounds
    P = 1 float32 meets (test_chgnet.test_float32_equals_package_calculator; measured
    here: <= 8e-8 eV/atom, 1e-5 eV/Å on the triclinic cell's 17 eV/Å forces, 3e-7
    eV/Å³, 1.4e-6 μB)."""
    ratios = check_float32(CHGNetModel, structures, 4, runs=runs,
                           extras_scale={"magmoms": 1.0})  # as in test_chgnet
    print("CHGNet P = 4 float32 error / bound:", ratios)


def float64_bound(s: Structure, ref, engine: SingleRankEngine):
    """Two float64 computations of CHGNet at ``s`` (``tol.measured_float64``: edge vectors
    built by other operations, the stiffness measured with ``engine``; magnetic moments
    read out of ~1 μB terms as in test_chgnet)."""
    return tol.measured_float64(engine, s, ref, extras_scale={"magmoms": 1.0})


@pytest.fixture(scope="module")
def bounds(structures, reference):
    engine = SingleRankEngine(CHGNetModel(), dtype=torch.float64)
    return {name: float64_bound(s, reference[name], engine) for name, s in structures.items()}


def test_distributed_one_rank_equals_local(structures, reference, bounds):
    """``DistributedEngine(ranks=1)`` runs the same step as ``SingleRankEngine``: a batch with
    magnetic moments agrees within the float64 bound."""
    from mlipd.engine.distributed import DistributedEngine

    names = list(structures)
    with DistributedEngine("chgnet", ranks=1, dtype=torch.float64) as engine:
        results = engine.compute([structures[n] for n in names])
    for name, r in zip(names, results, strict=True):
        ratios = tol.assert_within(r, reference[name], structures[name], bounds[name], name)
        print(f"{name}, P = 1: float64 error / bound", {k: f"{v:.2g}" for k, v in ratios.items()})


@pytest.mark.parametrize("model", ["chgnet", "chgnet:0.3.0,recompute=1"])
def test_make_engine_two_ranks(structures, reference, bounds, model):
    """The product path: ``make_engine("chgnet", ranks=2)`` on a batch; with
    recomputation in backward, the forces are the same."""
    names = ["triclinic", "slab"]
    with make_engine(model, ranks=2, dtype="float64") as engine:
        results = engine.compute([structures[n] for n in names])
    for name, r in zip(names, results, strict=True):
        ratios = tol.assert_within(r, reference[name], structures[name], bounds[name], name)
        print(f"{name}, P = 2: float64 error / bound", {k: f"{v:.2g}" for k, v in ratios.items()})


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
    fresh = SingleRankEngine(CHGNetModel(), dtype=torch.float64, skin=0.0)
    reuse = SingleRankEngine(CHGNetModel(), dtype=torch.float64, skin=0.5)
    probe = SingleRankEngine(CHGNetModel(), dtype=torch.float64)  # stiffness, its own lists
    built = pruned = 0
    worst = 0.0
    with make_engine("chgnet", ranks=2, dtype="float64") as two:
        for s in steps:
            (want,) = fresh.compute([s])
            (got,) = reuse.compute([s])
            built += reuse.model.counters["bond_graph_built"]
            g = reuse.step.last_graph  # candidates beyond the cutoff now: dropped or masked
            pruned += g.edge_ids is not None or (g.edge_mask is not None
                                                 and not bool(g.edge_mask.all()))
            (got2,) = two.compute([s])
            bound = float64_bound(s, want, probe)
            for r in (got, got2):
                worst = max(worst, *tol.assert_within(r, want, s, bound, "step").values())
        assert two.rebuilds < len(steps)
    assert fresh.rebuilds == len(steps)
    assert built == reuse.rebuilds < len(steps) // 2
    assert pruned >= len(steps) - reuse.rebuilds  # pairs beyond the cutoff were masked
    print("reused lists and P = 2: float64 error / bound (worst)", f"{worst:.2g}")
