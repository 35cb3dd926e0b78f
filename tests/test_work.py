"""The zero-redundancy check itself (``check_zero_redundancy``, ``mlipd.testing.work``):
it passes for models that do no work on halo rows and fails for one that does, with
the same numbers, on real gloo ranks."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from model_cases import bulk_box, check_zero_redundancy, slab

from mlipd.model_api import LocalGraph, ModelOutput, ModelSpec
from mlipd.testing.work import ElementCounter

pytestmark = pytest.mark.timeout(300)

SPECIES = (1, 6, 8)


class Toy(torch.nn.Module):
    """Embedding, a per-atom layer, one message-passing layer. The per-atom layer runs
    on owned rows and is exchanged (``halo_work=False``) or runs on every local row,
    halo rows included (``True``): the same numbers, but node work on halo rows."""

    def __init__(self, *, halo_work: bool = False) -> None:
        super().__init__()
        self.spec = ModelSpec(name="toy", cutoff=4.0, n_layers=1)
        g = torch.Generator().manual_seed(0)
        self.embedding = torch.nn.Parameter(torch.randn(119, 8, generator=g))
        self.node = torch.nn.Parameter(torch.randn(8, 8, generator=g) / 8**0.5)
        self.halo_work = halo_work

    def forward(self, graph: LocalGraph) -> ModelOutput:
        n = graph.n_owned
        r = graph.edge_vectors().norm(dim=-1)
        envelope = (1.0 - (r / self.spec.cutoff) ** 2) ** 2
        if self.halo_work:
            h = torch.tanh(self.embedding[graph.numbers] @ self.node)
        else:
            h = graph.exchange(torch.tanh(self.embedding[graph.numbers[:n]] @ self.node))
        msg = h[graph.senders] * envelope.unsqueeze(1)
        summed = torch.zeros(n, 8, dtype=msg.dtype).index_add(0, graph.receivers, msg)
        return ModelOutput(site_energy=(summed * h[:n]).sum(1))


CASES = {"bulk": bulk_box(SPECIES, reps=2), "slab": slab(SPECIES)}


def test_passes_without_halo_work():
    (bulk, _) = check_zero_redundancy(functools.partial(Toy, halo_work=False), CASES, 2)
    assert all(w.atom_rows_received > 0 for w in bulk.work)


def test_fails_with_halo_work():
    """Halo rows of the per-atom layer computed from species: right numbers (checked
    first), FLOPs above P = 1's; the check must say so."""
    factory = functools.partial(Toy, halo_work=True)
    with pytest.raises(AssertionError, match="flops summed over 2 ranks"):
        check_zero_redundancy(factory, {"bulk": CASES["bulk"]}, 2)


def test_element_counter_counts_arithmetic_not_copies():
    x = torch.ones(5, 4)
    with ElementCounter() as counter:
        y = torch.tanh(x) * 2.0  # 20 + 20
        z = torch.cat([y, y])[torch.tensor([0, 3])].clone()  # copies and gathers: 0
        torch.nn.functional.layer_norm(z, (4,))  # 8
    assert counter.elements == 48
    assert np.isclose(float(z.sum()), 8 * np.tanh(1.0) * 2)
