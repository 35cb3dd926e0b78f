"""TensorNet (matgl, PyG backend) on mlipd's partitioned graph: ``--model tensornet:DIR``.

DIR is a model directory written by matgl (``Potential.save`` / training): model.json,
model.pt, state.pt; NAME a model of matgl's Hugging Face org in matgl's cache
(``tensornet:TensorNet-MatPES-PBE-v2025.1-PES``, see ``mlipd.models.pretrained``).

The adapter reuses matgl's modules and weights (bond expansion, tensor embedding,
interactions, output norm, readout, element references) and writes only the loop of
``TensorNet.forward_features`` (matgl/models/_tensornet.py, PyG branch) plus
``Potential.forward``'s energy (matgl/apps/pes.py), split where the layers read other
atoms, so that every rank does node work on its owned atoms only:

* embedding: its messages read both ends' *species* (``emb(z)``), known for every
  atom, so the edge part needs no exchange; its node update runs on owned atoms;
* interaction: the node part before the messages (normalise X, decompose, three
  linears) runs on owned atoms; the parts the messages read from the senders are
  exchanged (``tensornet_parts``: 10 numbers per channel); messages are summed into
  owned receivers, and the node part after them runs on owned atoms.
  nblocks exchanges of (n_halo, units, 10) per step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from ase.data import atomic_numbers
from matgl.apps.pes import Potential
from matgl.models import TensorNet
from matgl.utils.cutoff import cosine_cutoff
from matgl.utils.maths import decompose_tensor, new_radial_tensor, tensor_norm

from mlipd.model_api import LocalGraph, MemoryCost, ModelOutput, ModelSpec, species_index
from mlipd.models.options import flag, parse_options
from mlipd.models.tensornet_parts import aggregate, edge_parts, pack, spread, unpack

log = logging.getLogger(__name__)
MEMORY_FLOATS_PER_UNIT = 64  # memory budget: floats per unit of width and layer (measured)


SYNTAX = "tensornet:DIR|NAME[,offline=1]"


def load_matgl_dir(path: str | Path, *, offline: bool = False) -> torch.nn.Module:
    """A matgl model directory from the local filesystem, or a published name
    (``materialyze/NAME``) from matgl's cache (``mlipd.models.pretrained``: downloaded by
    matgl only when allowed; matgl.load_model alone would wait on the hub).

    Loaded under matgl's float64 defaults: matgl builds parts of a model (readout MLP,
    radial centres, data_mean/std buffers) in its default float dtype, float32 unless set,
    and a float64 model's weights loaded into those lose their last digits (measured:
    energies 2e-9 relative off). float64 holds either precision exactly; the engine casts
    the model to its own dtype afterwards."""
    import matgl

    from mlipd.models.pretrained import looks_like_path, matgl_dir

    if str(path) and not looks_like_path(str(path)):
        path = matgl_dir(str(path), offline=offline)
    path = Path(path)
    if not (path / "model.json").is_file() or not (path / "model.pt").is_file():
        raise FileNotFoundError(f"no matgl model directory at {path} (model.json, model.pt)")
    prior = matgl.float_th, matgl.float_np, torch.get_default_dtype()
    matgl.set_default_dtype("float", 64)  # also torch's process-wide default: restored below
    try:
        return matgl.load_model(path)
    finally:
        matgl.float_th, matgl.float_np, default = prior
        torch.set_default_dtype(default)


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
                              n_layers=int(net.num_layers), masked_edges=True)

    def memory_per_item(self, dtype: torch.dtype) -> MemoryCost:
        """Bytes per atom and edge of one step (``mlipd.model_api.MemoryCost``):
        ``MEMORY_FLOATS_PER_UNIT`` floats per unit of width and layer, per edge (its
        3x3 tensor messages and radial features) and per atom; the measurement is in
        docs/reliability.md."""
        net = self.potential.model
        floats = MEMORY_FLOATS_PER_UNIT * int(net.units) * (int(net.num_layers) + 1)
        itemsize = torch.finfo(dtype).bits // 8
        return MemoryCost(per_atom=itemsize * floats, per_edge=itemsize * floats)

    def forward(self, graph: LocalGraph) -> ModelOutput:
        pot, net, n = self.potential, self.potential.model, graph.n_owned
        # every local atom's species (the halo's too: the embedding's messages read the
        # senders' species, a table lookup in place of an exchange)
        types = torch.take(self.type_index, graph.numbers)
        # matgl aggregates into edge_index[0] (our receivers) and reads edge_index[1] (our
        # senders); its bond vector x[edge_index[1]] - x[edge_index[0]] + offset is
        # graph.edge_vectors()
        recv, send = graph.receivers, graph.senders
        vec = graph.edge_vectors()
        dist = torch.norm(vec, dim=1)
        edge_attr = net.bond_expansion(dist)
        # edges beyond the cutoff (``masked_edges``): their cosine cutoff is zero anyway
        # (matgl's cosine_cutoff is 0 past rc), the mask makes it exact at round-off too
        mask = None if graph.edge_mask is None else graph.edge_mask.to(dist.dtype)
        x = _embed(net.tensor_embedding, types, recv, send, edge_attr, dist, vec, n, mask)
        for layer in net.layers:
            x = _interact(layer, x, recv, send, dist, edge_attr, graph.exchange, mask)
        scalars, skew, traceless = decompose_tensor(x)
        feats = torch.cat((tensor_norm(scalars), tensor_norm(skew), tensor_norm(traceless)), -1)
        feats = net.linear(net.out_norm(feats))
        site = pot.data_std * net.final_layer(feats).view(-1)
        # data_mean is per structure: spread evenly over its atoms (all ranks together)
        site = site + pot.data_mean / graph.n_atoms[graph.batch[:n]].to(site.dtype)
        if pot.element_refs is not None:
            site = site + pot.element_refs.property_offset[types[:n]]
        return ModelOutput(site_energy=site)


def _channels(linear: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A matgl tensor linear: mixes channels of (n, units, 3, 3). Made contiguous
    first, so that torch's matmul folds it into one (9 n, units) product at every n
    (matgl's strided view runs as a batch of n products, each reading the weights,
    except at n = 0, where it folds: a rank's work would then depend on its share)."""
    return linear(t.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)


def _cut(module, dist: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(E,) matgl's cosine cutoff, times the edge mask (None: every edge counts)."""
    cut = cosine_cutoff(dist, module.cutoff)
    return cut if mask is None else cut * mask


def _embed(emb, types, recv, send, edge_attr, dist, vec, n_owned: int,
           mask: torch.Tensor | None) -> torch.Tensor:
    """``TensorEmbedding.forward`` (matgl/layers/_embedding.py) for the owned atoms:
    edge messages into owned receivers, then the node update on owned rows only."""
    cut = _cut(emb, dist, mask).view(-1, 1)
    w = torch.stack([emb.distance_proj1(edge_attr) * cut, emb.distance_proj2(edge_attr) * cut,
                     emb.distance_proj3(edge_attr) * cut], dim=-1)        # (E, u, 3)
    unit = vec / torch.norm(vec, dim=1, keepdim=True).clamp(min=1e-6)
    z = emb.emb2(torch.cat([emb.emb(types[recv]), emb.emb(types[send])], dim=-1))  # (E, u)
    msg = (z[..., None] * spread(w)) * edge_parts(unit)[:, None, :]
    scalars, skew, traceless = unpack(aggregate(msg, recv, n_owned))
    norm = emb.init_norm(tensor_norm(scalars + skew + traceless))
    scalars = _channels(emb.linears_tensor[0], scalars)
    skew = _channels(emb.linears_tensor[1], skew)
    traceless = _channels(emb.linears_tensor[2], traceless)
    for linear in emb.linears_scalar:
        norm = emb.act(linear(norm))
    norm = norm.reshape(norm.shape[0], emb.units, 3)
    scalars, skew, traceless = new_radial_tensor(scalars, skew, traceless,
                                                 norm[..., 0], norm[..., 1], norm[..., 2])
    return scalars + skew + traceless


def _interact(layer, x, recv, send, dist, edge_attr, exchange, mask) -> torch.Tensor:
    """``TensorNetInteraction.forward`` (matgl/layers/_graph_convolution.py) on owned
    rows ``x`` (n_owned, u, 3, 3): the senders' parts come through ``exchange``."""
    n = x.shape[0]
    cut = _cut(layer, dist, mask)
    for linear in layer.linears_scalar:
        edge_attr = layer.act(linear(edge_attr))
    w = (edge_attr * cut.view(-1, 1)).reshape(edge_attr.shape[0], layer.units, 3)
    x = x / (tensor_norm(x) + 1)[..., None, None]
    scalars, skew, traceless = decompose_tensor(x)
    scalars = _channels(layer.linears_tensor[0], scalars)
    skew = _channels(layer.linears_tensor[1], skew)
    traceless = _channels(layer.linears_tensor[2], traceless)
    y = scalars + skew + traceless
    parts = exchange(pack(scalars, skew, traceless))    # (n_local, u, 10): senders' parts
    i_m, a_m, s_m = unpack(aggregate(spread(w) * parts[send], recv, n))
    msg = i_m + a_m + s_m
    if layer.equivariance_invariance_group == "O(3)":
        scalars, skew, traceless = decompose_tensor(torch.matmul(msg, y) + torch.matmul(y, msg))
    elif layer.equivariance_invariance_group == "SO(3)":
        scalars, skew, traceless = decompose_tensor(2 * torch.matmul(y, msg))
    else:
        raise ValueError("equivariance_invariance_group must be 'O(3)' or 'SO(3)'")
    normp1 = (tensor_norm(scalars + skew + traceless) + 1)[..., None, None]
    scalars = _channels(layer.linears_tensor[3], scalars / normp1)
    skew = _channels(layer.linears_tensor[4], skew / normp1)
    traceless = _channels(layer.linears_tensor[5], traceless / normp1)
    dx = scalars + skew + traceless
    return x + dx + torch.matmul(dx, dx)
