"""The zero-redundancy check itself (``mlipd.testing.check_zero_redundancy``): it passes
for the plug-in example (examples/plugin), which does no work on halo rows, and fails,
naming the op, for deliberately redundant variants of it that give the same numbers:
a matmul on 1% of the halo rows, element-wise work only, reductions and scatters only,
an edge computed on two ranks, halo work in the backward pass only. All on real gloo
ranks; every variant measured in one spawn."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from model_cases import bulk_box, slab

from mlipd.model_api import LocalGraph, ModelOutput
from mlipd.models.reference import ReferenceMP
from mlipd.testing import check_zero_redundancy
from mlipd.testing.redundancy import work_excess
from mlipd.testing.work import Work, WorkCounter, measure_runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "plugin"))
from mlipd_example_plugin.density import DensityModel

pytestmark = pytest.mark.timeout(300)

SPECIES = (1, 6, 8)
CASES = {"bulk": bulk_box(SPECIES, reps=2), "slab": slab(SPECIES)}
F64 = torch.float64
# autograd's sums of gradients of tensors holding halo rows: the positions (used as
# senders and receivers, 3 columns: 9 elements per row) and the exchanged density (read
# as receivers and senders: 3)
PLUGIN_HALO = {"add": 12}
PLUGIN_REASON = "autograd's gradient sums on halo positions and the exchanged density"


class _Variant(DensityModel):
    """The plug-in with ``extra(graph, rho_local)`` run after its exchange; the extra
    work never changes the result."""

    def forward(self, graph: LocalGraph) -> ModelOutput:
        def exchange(rho):
            return self.extra(graph, graph.exchange(rho))

        return super().forward(dataclasses.replace(graph, exchange=exchange))

    def extra(self, graph: LocalGraph, rho_local: torch.Tensor) -> torch.Tensor:
        return rho_local


class HaloMatmul(_Variant):
    """A readout matmul on 1% of the halo rows (at least one), thrown away."""

    def extra(self, graph, rho_local):
        halo = rho_local[graph.n_owned:]
        k = max(1, halo.shape[0] // 100) if halo.shape[0] else 0
        w = torch.ones(1, 8, dtype=rho_local.dtype)
        _ = halo[:k].unsqueeze(1) @ w
        return rho_local


class HaloElementwise(_Variant):
    """Element-wise arithmetic only (tanh, product) on the halo rows."""

    def extra(self, graph, rho_local):
        _ = torch.tanh(rho_local[graph.n_owned:]) * 2.0
        return rho_local


class HaloReductions(_Variant):
    """Reductions and scatters only: a sum, a norm, a softmax and an index_add over the
    halo rows."""

    def extra(self, graph, rho_local):
        halo = rho_local[graph.n_owned:]
        _ = halo.sum(), torch.linalg.vector_norm(halo), torch.softmax(halo, 0)
        rows = torch.arange(halo.shape[0]) % max(graph.n_owned, 1)
        _ = torch.zeros(graph.n_owned, dtype=halo.dtype).index_add(0, rows, halo)
        return rho_local


class EdgeTwice(_Variant):
    """The pair term of every edge to a halo atom computed again (as the rank that owns
    the halo atom also does), multiplied by zero."""

    def extra(self, graph, rho_local):
        cut = graph.senders >= graph.n_owned
        r = graph.edge_vectors()[cut].norm(dim=-1)
        again = self._smooth(r) * (2.0 * torch.exp(-2.0 * r) - torch.exp(-r))
        return rho_local + 0.0 * again.sum()


class _BackwardHaloWork(torch.autograd.Function):
    """Identity forward; its backward scales the halo rows' gradient by 1 (work on halo
    rows that only the backward pass does)."""

    @staticmethod
    def forward(ctx, rho_local, n_owned):
        ctx.n_owned = n_owned
        return rho_local.view_as(rho_local)

    @staticmethod
    def backward(ctx, grad):
        n = ctx.n_owned
        return torch.cat([grad[:n], grad[n:] * 1.0]), None


class BackwardOnly(_Variant):
    def extra(self, graph, rho_local):
        return _BackwardHaloWork.apply(rho_local, graph.n_owned)


NEGATIVE = {HaloMatmul: "mm", HaloElementwise: "tanh", HaloReductions: "index_add",
            EdgeTwice: "exp", BackwardOnly: "mul"}


@pytest.fixture(scope="module")
def variant_runs():
    """One spawn of 8 ranks: P = 1 and 2 of the plug-in and every redundant variant
    (the plug-in at P = 2, 4, 8: tests/test_plugin.py), and the reference model at
    P = 1, 2, 4, 8."""
    runs = [(p, F64, v) for v in (DensityModel, *NEGATIVE) for p in (1, 2)]
    runs += [(p, F64, ReferenceMP) for p in (1, 2, 4, 8)]
    return measure_runs(DensityModel, list(CASES.values()), runs)


# ReferenceMP: linear layers read their weights once per rank (mm), and it scales its
# basis by a constant; the species embedding of halo rows is looked up locally (a
# gather of 16 features, cheaper than an exchange), and autograd sums the gradients
# of the positions and of the two exchanged feature tensors on halo rows
REFERENCE_DECLARED = dict(per_rank={"mm": (5664, 0), "mul": (16, 0)},
                          per_halo_row={"index": 33, "add": 105},
                          reason="weights read per rank; halo species embedding looked up; "
                                 "autograd's gradient sums on halo rows")


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_reference_model(variant_runs, ranks):
    runs = {(p, F64): variant_runs[(p, F64, ReferenceMP)] for p in (1, ranks)}
    check_zero_redundancy(ReferenceMP, CASES, (ranks,), runs=runs, **REFERENCE_DECLARED)


def test_plugin_passes(variant_runs):
    runs = {(p, F64): variant_runs[(p, F64, DensityModel)] for p in (1, 2)}
    check_zero_redundancy(DensityModel, CASES, (2,), per_halo_row=PLUGIN_HALO,
                          reason=PLUGIN_REASON, runs=runs)
    bulk = runs[(2, F64)][0]
    assert all(w.atom_rows_received > 0 and w.elements > 0 for w in bulk.work)


@pytest.mark.parametrize("variant", list(NEGATIVE), ids=lambda v: v.__name__)
def test_redundant_variant_is_caught(variant_runs, variant):
    """Same numbers as the plug-in (checked first by the check itself), but extra work on
    halo rows: the check names the op."""
    runs = {(p, F64): variant_runs[(p, F64, variant)] for p in (1, 2)}
    op = NEGATIVE[variant]
    caught = rf"bulk at P = 2: work .* summed.*\n(.*\n)*  {op}: \+"
    with pytest.raises(AssertionError, match=caught):
        check_zero_redundancy(variant, CASES, (2,), per_halo_row=PLUGIN_HALO,
                              reason=PLUGIN_REASON, runs=runs)


def test_declared_constants_need_a_reason():
    with pytest.raises(ValueError, match="reason"):
        check_zero_redundancy(DensityModel, CASES, (2,), per_halo_row={"add": 1})


def test_counter_counts_reads_writes_and_flops_not_views_or_creation():
    x = torch.ones(5, 4)
    idx = torch.tensor([0, 3])
    with WorkCounter() as counter:
        y = torch.tanh(x)  # reads 20, writes 20
        _ = y.t().unsqueeze(0)  # views: nothing
        _ = torch.zeros(100)  # creation: nothing
        _ = y[idx]  # a gather: reads and writes the 8 elements it takes, reads 2 indices
        _ = torch.zeros(5, 4).index_add(0, idx, y[:2])  # a scatter: 8 added, 2 indices...
        _ = x @ torch.ones(4, 3)  # mm: 2 * 5 * 4 * 3 FLOPs, 20 + 12 read, 15 written
    ops = counter.tally()
    assert ops["tanh"] == (40, 0)
    assert ops["index"][0] == 2 * 8 + 2
    assert ops["index_add"][0] == 2 * 8 + 2
    assert ops["mm"] == (47, 120)
    assert not {"zeros", "unsqueeze", "t"} & set(ops)


def test_scatter_counts_its_source_and_indices_at_any_share():
    """A scatter along columns (an index of 10 columns, the repeat's backward) reads its
    indices and its source's rows, also where the rank holds no row: the index is read
    once per call whatever the rows, as a per-rank constant."""
    idx = torch.arange(10) % 3
    for rows in (0, 1, 5):
        with WorkCounter() as counter:
            _ = torch.zeros(rows, 3).index_add(1, idx, torch.ones(rows, 10))
        assert counter.tally().get("index_add", (0, 0))[0] == 2 * 10 * rows + 10


def _work(ops, *, halo=0, owned=1, **info):
    return Work(ops=ops, rows_sent=0, rows_received=0, exchanges=0, atom_rows_sent=0,
                atom_rows_received=0, atom_exchanges=0, owned=owned, edges=0, halo=halo,
                info=info)


def test_declared_constants_are_subtracted_exactly():
    """Each kind of declared constant removes exactly its share of the excess, and what
    is left is reported: per extra rank, per extra rank holding atoms, per halo row, and
    per counted row of the model's own (rows P ranks hold beyond P = 1's)."""
    one = _work({"mm": (100, 10), "cat": (5, 0)}, rows=3)
    many = [_work({"mm": (60, 5), "cat": (5, 0), "add": (9 * 4, 0)}, halo=4, rows=3),
            _work({"mm": (66, 5), "cat": (5, 0), "add": (9 * 2, 0)}, halo=2, rows=2),
            _work({"mm": (20, 0)}, owned=0, rows=0)]  # a rank owning nothing
    declared = dict(per_rank={"mm": (20, 0)}, per_halo_row={"add": 9},
                    per_rank_holding_atoms={"cat": (5, 0)})
    assert work_excess(one, many, **declared, per_counted_row={"rows": {"mm": (3, 0)}}) == {}
    assert work_excess(one, many, **declared, per_counted_row={"rows": {"mm": (2, 0)}}) == {
        "mm": (2, 0)}
    assert work_excess(one, many, **declared) == {"mm": (6, 0)}


def test_rank_output_packs_and_unpacks():
    """``Step.run``'s typed output survives the gather's flat form, padding included."""
    from mlipd.engine.results import ExtraLayout, RankOutput, pack, unpack

    layout = (ExtraLayout("charge", ()), ExtraLayout("dipole", (3,)))
    out = RankOutput(energies=torch.tensor([1.0, 2.0], dtype=F64),
                     virials=torch.arange(18, dtype=F64).reshape(2, 3, 3),
                     forces=torch.arange(12, dtype=F64).reshape(4, 3),
                     site_energies=torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64),
                     extras=(torch.ones(4, 1, dtype=F64), torch.full((4, 3), 2.0, dtype=F64)),
                     stats=(4, 17, 5))
    flat = torch.cat([pack(out), torch.zeros(7, dtype=F64)])  # rows padded for the gather
    back = unpack(flat.numpy(), 2, layout)
    assert back.stats == out.stats
    for a, b in [(back.energies, out.energies), (back.virials, out.virials),
                 (back.forces, out.forces), (back.site_energies, out.site_energies),
                 *zip(back.extras, out.extras, strict=True)]:
        assert torch.equal(a, b)
