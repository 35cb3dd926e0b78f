"""TensorNet (matgl, PyG backend) on mlipd's partitioned graph: ``--model tensornet:DIR``.

DIR is a model directory written by matgl (``Potential.save`` / training): model.json,
model.pt, state.pt; NAME a model of matgl's Hugging Face org in matgl's cache
(``tensornet:TensorNet-MatPES-PBE-v2025.1-PES``, see ``mlipd.models.pretrained``).

The adapter reuses matgl's modules and weights (bond expansion, tensor embedding,
interactions, output norm, readout, ZBL parameters, element references) and writes
only the loop of ``TensorNet.forward_features`` (matgl/models/_tensornet.py, PyG
branch) plus ``Potential.forward``'s energy (matgl/apps/pes.py). Exchanges:

* the embedding reads only the neighbours' *species* (``x = emb(z)``, then
  ``x[edge_index[1]]`` in TensorEmbedding.forward), which every rank has for its
  halo: no exchange before it;
* but it *aggregates* over neighbours (``aggregate(msg, edge_index[0])``), so the
  embedded tensor X of a halo atom needs that atom's own neighbours: X is exchanged
  before the first interaction, and again before every later one, since
  TensorNetInteraction.message reads ``x_I[dst]`` (dst = edge_index[1], the sender).
  nblocks exchanges of (n_halo, units, 3, 3) per step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from ase.data import atomic_numbers
from matgl.apps.pes import Potential
from matgl.models import TensorNet
from matgl.utils.maths import decompose_tensor, tensor_norm

from mlipd.model_api import LocalGraph, ModelOutput, ModelSpec, species_index
from mlipd.models.options import flag, parse_options

log = logging.getLogger(__name__)


SYNTAX = "tensornet:DIR|NAME[,offline=1]"


def load_matgl_dir(path: str | Path, *, offline: bool = False) -> torch.nn.Module:
    """A matgl model directory from the local filesystem, or a published name
    (``materialyze/NAME``) from matgl's cache (``mlipd.models.pretrained``: downloaded by
    matgl only when allowed; matgl.load_model alone would wait on the hub)."""
    import matgl

    from mlipd.models.pretrained import looks_like_path, matgl_dir

    if str(path) and not looks_like_path(str(path)):
        path = matgl_dir(str(path), offline=offline)
    path = Path(path)
    if not (path / "model.json").is_file() or not (path / "model.pt").is_file():
        raise FileNotFoundError(f"no matgl model directory at {path} (model.json, model.pt)")
    return matgl.load_model(path)


class TensorNetModel(torch.nn.Module):
    """A matgl TensorNet energy model (a ``Potential`` around an extensive ``TensorNet``).

    ``TensorNetModel("DIR")`` loads a saved model; ``TensorNetModel(potential=p)`` wraps
    a ``Potential`` in memory (the same object). Site energy of atom i:
    ``data_std * e_i + data_mean / N + element_ref(Z_i)``, whose sum over a
    structure of N atoms is matgl's total energy.
    """

    def __init__(self, path: str | None = None, *, potential: torch.nn.Module | None = None):
        super().__init__()
        if path is not None:
            path, opts = parse_options(path, model="tensornet", syntax=SYNTAX, positional=True,
                                       keys={"offline": flag})
            potential = load_matgl_dir(path or "", offline=opts.get("offline", False))
        if potential is None:
            raise ValueError(f"tensornet needs a model directory or name: --model {SYNTAX}")
        if not isinstance(potential, Potential):
            raise ValueError(f"tensornet: {type(potential).__name__} is not a matgl Potential")
        net = potential.model
        if type(net) is not TensorNet:  # subclasses (e.g. QET) change the readout
            raise ValueError(f"tensornet: the Potential wraps {type(net).__name__}, not TensorNet")
        if net.is_intensive:
            raise ValueError("tensornet: an intensive (per-structure) model has no site energies")
        if getattr(net, "_use_warp", False):
            raise ValueError("tensornet: the warp kernels are not supported; save the model "
                             "with use_warp=False")
        if potential.calc_repuls:
            # matgl 4.1.2 cannot evaluate it either: NuclearRepulsion reads graph.bond_dist,
            # which TensorNet's PyG forward never sets (AttributeError in Potential.forward)
            raise ValueError("tensornet: potentials with calc_repuls (ZBL) are not supported")
        if potential.calc_charge:
            raise ValueError("tensornet: charge-equilibrating potentials are not supported")
        refs = potential.element_refs
        if refs is not None and refs.property_offset.ndim > 1:
            raise ValueError("tensornet: state-dependent element references are not supported")
        self.potential = potential
        zs = [atomic_numbers[s] for s in net.element_types]
        self.register_buffer("type_index", species_index(zs), persistent=False)
        self.spec = ModelSpec(name="tensornet", cutoff=float(net.cutoff), species=frozenset(zs),
                              n_layers=int(net.num_layers))

    def forward(self, graph: LocalGraph) -> ModelOutput:
        pot, net, n = self.potential, self.potential.model, graph.n_owned
        types = self.type_index[graph.numbers]
        # matgl aggregates into edge_index[0] and reads edge_index[1]; its bond vector is
        # x[edge_index[1]] - x[edge_index[0]] + offset, i.e. graph.edge_vectors()
        edge_index = torch.stack([graph.receivers, graph.senders])
        vec = graph.edge_vectors()
        dist = torch.norm(vec, dim=1)
        edge_attr = net.bond_expansion(dist)
        x, _ = net.tensor_embedding(types, edge_index, edge_attr, dist, vec, None)
        x = x[:n]
        for layer in net.layers:
            x = graph.exchange(x)  # halo X from its owner (see the module docstring)
            x = layer(edge_index, dist, edge_attr, x)[:n]
        scalars, skew, traceless = decompose_tensor(x)
        feats = torch.cat((tensor_norm(scalars), tensor_norm(skew), tensor_norm(traceless)), -1)
        feats = net.linear(net.out_norm(feats))
        site = pot.data_std * net.final_layer(feats).view(-1)
        # data_mean is per structure: spread evenly over its atoms (all ranks together)
        site = site + pot.data_mean / graph.n_atoms[graph.batch[:n]].to(site.dtype)
        if pot.element_refs is not None:
            site = site + pot.element_refs.property_offset[types[:n]]
        return ModelOutput(site_energy=site)
