"""A two-layer, embedded-atom-like model written only against mlipd's public interface.

Layer 1: each owned atom i sums a smooth pair density, rho_i = sum_j w(Z_j) f(r_ij).
Layer 2 reads the neighbours' rho, so the halo rows must be refreshed first:
``graph.exchange(rho)``. Then E_i = F(rho_i) + 1/2 sum_j phi(r_ij) (1 + c rho_i rho_j).

This is what any architecture does: per-atom work on owned rows, one exchange before
every layer that reads neighbours' features, edge work on the edges the rank owns
(those whose receiver it owns), and site energies of owned atoms as the output.
"""

from __future__ import annotations

import torch

from mlipd.model_api import LocalGraph, ModelOutput, ModelSpec
from mlipd.models.options import parse_options


class DensityModel(torch.nn.Module):
    """``density`` or ``density:cutoff=4.5`` (Å). Parameters are fixed numbers (a demo)."""

    def __init__(self, args: str = "", *, cutoff: float = 4.0) -> None:
        super().__init__()
        _, opts = parse_options(args, model="density", syntax="density[:cutoff=Å]",
                                keys={"cutoff": float})
        cutoff = opts.get("cutoff", cutoff)
        self.spec = ModelSpec(name="density", cutoff=cutoff, species=None, n_layers=2)
        weights = 1.0 + 0.01 * torch.arange(119, dtype=torch.float64)  # w(Z), any element
        self.register_buffer("weights", weights)

    def _smooth(self, r: torch.Tensor) -> torch.Tensor:
        """(E,) envelope that goes to zero with its derivative at the cutoff."""
        x = (r / self.spec.cutoff).clamp(max=1.0)
        return (1.0 - x * x) ** 2

    def forward(self, graph: LocalGraph) -> ModelOutput:
        n = graph.n_owned
        r = graph.edge_vectors().norm(dim=-1)  # (E,) Å, receivers are owned atoms
        env = self._smooth(r)
        w = self.weights[graph.numbers[graph.senders]]  # (E,): halo species are known locally
        rho = torch.zeros(n, dtype=r.dtype, device=r.device)
        rho = rho.index_add(0, graph.receivers, w * env * torch.exp(-r))
        rho_local = graph.exchange(rho)  # (n_local,): halo rows from their owners
        phi = env * (2.0 * torch.exp(-2.0 * r) - torch.exp(-r))
        pair = phi * (1.0 + 0.1 * rho_local[graph.receivers] * rho_local[graph.senders])
        site = -torch.sqrt(rho + 1.0) + 1.0
        site = site.index_add(0, graph.receivers, 0.5 * pair)
        return ModelOutput(site_energy=site)
