"""A cheap reference message-passing potential that exercises the layer-loop interface.

Per atom i, features h_i (F,) start from a species embedding. Layer t (t = 1..L):

    w_ij   = fc(r_ij) * (B(r_ij) @ R_t)                 (E, F) radial filter
    m_ij   = w_ij * (h_j @ W_t)                          (E, F) message from sender j
    s_i    = sum_j m_ij                                  (F,)   two-body
    v_i    = sum_j m_ij r̂_ij                             (F, 3) vector moment
    a_i    = |v_i|^2 = sum_jk m_ij m_ik cos(theta_jik)   (F,)   three-body (angular)
    h_i   <- h_i + tanh([s_i, a_i] @ U_t)

with B a sine (Bessel-like) basis and fc(r) = (1 + cos(pi r / rc)) / 2, so every
message, the energy and the forces go to zero continuously at the cutoff. Site
energy: tanh(h_i @ O1) @ o2 + e0[Z_i]. Weights are random but deterministic from
``seed``. Before every layer but the first (whose inputs, the embeddings, every
rank can compute for its halo atoms itself) the model calls ``graph.exchange``.

``last_counts`` holds, per layer of the last forward, (atoms updated, messages
computed) on this rank: summed over ranks they equal the single-rank counts when
nothing is computed twice.

CLI form: ``reference:layers=3,features=16,cutoff=5,basis=8,seed=0``.
"""

from __future__ import annotations

import math

import torch

from mlipd.model_api import LocalGraph, MemoryCost, ModelOutput, ModelSpec
from mlipd.models.options import parse_options

SYNTAX = "reference[:layers=,features=,cutoff=,basis=,seed=]"  # --model (and `mlipd models`)
_DEFAULTS = {"layers": 3, "features": 16, "cutoff": 5.0, "basis": 8, "seed": 0}


def _parse(args: str) -> dict[str, float]:
    return parse_options(args, model="reference", syntax=SYNTAX,
                         keys=dict.fromkeys(_DEFAULTS, float))[1]


class ReferenceMP(torch.nn.Module):
    """Reference multi-layer message passing (see module docstring). Any species 1..118."""

    def __init__(self, args: str = "", *, layers: int = 3, features: int = 16,
                 cutoff: float = 5.0, basis: int = 8, seed: int = 0) -> None:
        super().__init__()
        p = {"layers": layers, "features": features, "cutoff": cutoff, "basis": basis,
             "seed": seed, **_parse(args)}
        n_layers, f, nb = int(p["layers"]), int(p["features"]), int(p["basis"])
        if n_layers < 1 or f < 1 or nb < 1 or p["cutoff"] <= 0:
            raise ValueError(f"reference: layers, features, basis and cutoff must be > 0: {p}")
        self.spec = ModelSpec(name="reference", cutoff=float(p["cutoff"]), n_layers=n_layers,
                              masked_edges=True)
        self._width = f * n_layers  # features kept per item and layer (memory_per_item)
        g = torch.Generator().manual_seed(int(p["seed"]))

        def weight(*shape: int, scale: float = 1.0) -> torch.nn.Parameter:
            w = torch.randn(*shape, generator=g, dtype=torch.float64)
            return torch.nn.Parameter(w * scale / math.sqrt(shape[0]))

        self.embedding = torch.nn.Parameter(torch.randn(119, f, generator=g, dtype=torch.float64))
        self.radial = torch.nn.ParameterList([weight(nb, f) for _ in range(n_layers)])
        self.message = torch.nn.ParameterList([weight(f, f) for _ in range(n_layers)])
        self.update = torch.nn.ParameterList([weight(2 * f, f, scale=0.5)
                                              for _ in range(n_layers)])
        self.out1 = weight(f, f)
        self.out2 = weight(f, 1, scale=0.1)
        self.atom_energy = torch.nn.Parameter(
            -torch.rand(119, generator=g, dtype=torch.float64))
        self.register_buffer("frequencies", torch.arange(1, nb + 1, dtype=torch.float64)
                             * math.pi / float(p["cutoff"]))
        self.last_counts: list[tuple[int, int]] = []

    def _filters(self, r: torch.Tensor) -> torch.Tensor:
        """(E, n_basis): sin(k pi r / rc) / rc scaled by the smooth cutoff fc(r)."""
        rc = self.spec.cutoff
        fc = 0.5 * (1.0 + torch.cos(math.pi * r / rc))
        return torch.sin(r.unsqueeze(-1) * self.frequencies) * (fc / rc).unsqueeze(-1)

    def memory_per_item(self, dtype: torch.dtype) -> MemoryCost:
        """12 floats per edge and 32 per atom for each feature and layer (measured: 3.3 kB
        per edge at float64 with 16 features and 3 layers; docs/reliability.md)."""
        itemsize = torch.finfo(dtype).bits // 8
        return MemoryCost(per_atom=32.0 * itemsize * self._width,
                          per_edge=12.0 * itemsize * self._width)

    def forward(self, graph: LocalGraph) -> ModelOutput:
        n, recv, send = graph.n_owned, graph.receivers, graph.senders
        vec = graph.edge_vectors()
        r = torch.sqrt((vec * vec).sum(-1))
        unit = vec / r.unsqueeze(-1)
        basis = self._filters(r)
        if graph.edge_mask is not None:  # fc(r) rises again past the cutoff: zero it
            basis = basis * graph.edge_mask.unsqueeze(-1).to(basis.dtype)
        h = self.embedding[graph.numbers]  # (n_local, F): halo rows computed locally
        self.last_counts = []
        for t in range(self.spec.n_layers):
            if t > 0:
                h = graph.exchange(h[:n])
            m = (basis @ self.radial[t]) * (h[send] @ self.message[t])
            s = torch.zeros(n, m.shape[1], dtype=m.dtype, device=m.device).index_add(0, recv, m)
            v = torch.zeros(n, m.shape[1], 3, dtype=m.dtype, device=m.device).index_add(
                0, recv, m.unsqueeze(-1) * unit.unsqueeze(1))
            a = (v * v).sum(-1)
            h = h[:n] + torch.tanh(torch.cat([s, a], dim=1) @ self.update[t])
            # messages: a device scalar under a mask (``int()`` it; no host read here)
            self.last_counts.append((n, recv.shape[0] if graph.edge_mask is None
                                     else graph.edge_mask.sum()))
        site = (torch.tanh(h @ self.out1) @ self.out2).squeeze(-1)
        return ModelOutput(site_energy=site + self.atom_energy[graph.numbers[:n]])
