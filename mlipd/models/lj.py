"""Lennard-Jones in torch: a cheap analytic model for tests and overhead benchmarks."""

from __future__ import annotations

import torch

from mlipd.model_api import LocalGraph, MemoryCost, ModelOutput, ModelSpec
from mlipd.models.options import parse_options

SYNTAX = "lj[:epsilon=eV,sigma=Å,cutoff=Å]"  # --model (and `mlipd models`)


class LennardJones(torch.nn.Module):
    """Shifted Lennard-Jones, one species-blind pair term: E(rc) = 0.

    Parameters (keyword-only): epsilon (eV), sigma (Å), cutoff (Å).
    ``LennardJones("epsilon=0.01,sigma=2.5,cutoff=6")`` accepts the CLI's ``lj:ARGS`` form.
    """

    def __init__(self, args: str = "", *, epsilon: float = 0.0104, sigma: float = 3.4,
                 cutoff: float | None = None) -> None:
        super().__init__()
        params = {"epsilon": epsilon, "sigma": sigma, "cutoff": cutoff}
        params.update(parse_options(args, model="lj", syntax=SYNTAX,
                                    keys=dict.fromkeys(params, float))[1])
        self.epsilon = float(params["epsilon"])
        self.sigma = float(params["sigma"])
        rc = params["cutoff"] if params["cutoff"] is not None else 2.5 * self.sigma
        self.spec = ModelSpec(name="lj", cutoff=float(rc), n_layers=1, masked_edges=True)

    def memory_per_item(self, dtype: torch.dtype) -> MemoryCost:
        """64 floats per edge and per atom (measured: ~400 B per edge at float64 with
        the atoms' share; docs/reliability.md)."""
        size = 64.0 * (torch.finfo(dtype).bits // 8)
        return MemoryCost(per_atom=size, per_edge=size)

    def forward(self, graph: LocalGraph) -> ModelOutput:
        r2 = (graph.edge_vectors() ** 2).sum(-1)
        s6 = (self.sigma**2 / r2) ** 3
        sc6 = (self.sigma / self.spec.cutoff) ** 6
        pair = 4.0 * self.epsilon * ((s6 * s6 - s6) - (sc6 * sc6 - sc6))
        if graph.edge_mask is not None:  # not cut off past rc by itself
            pair = pair * graph.edge_mask.to(pair.dtype)
        site = torch.zeros(graph.n_owned, dtype=pair.dtype, device=pair.device)
        # each unordered pair appears twice in the full list: half to each receiver
        site = site.index_add(0, graph.receivers, 0.5 * pair)
        return ModelOutput(site_energy=site)
