"""SevenNet (the ``sevenn`` package) on mlipd's partitioned graph.

``--model sevennet[:NAME|PATH][,modal=NAME][,offline=1]``: a pretrained model by sevenn's
name (default ``7net-0``, SevenNet-0 of 11 July 2024, shipped inside the wheel with
``7net-0_22may2024``, ``7net-l3i5`` and ``7net-mf-0``; ``mlipd.models.pretrained``) or a
checkpoint file sevenn wrote. sevenn's own ``SevenNetCheckpoint.build_model`` builds the
model (e3nn backend) and every module and weight is the package's; this adapter writes
only the loop of ``AtomGraphSequential.forward`` (sevenn/nn/sequential.py), calling each
module on the data dict it expects.

SevenNet is NequIP-like: per interaction block t, ``self_connection_intro`` (per atom),
``self_interaction_1`` (a per-atom linear), ``convolution`` (the only step that reads
neighbours: a tensor product of the senders' features with the edge harmonics, summed
into the receiver), ``self_interaction_2``, ``self_connection_outro`` and the gate (per
atom). So:

* edge_index[0] is the receiver (sevenn's ``edge_dst``, where messages are summed) and
  edge_index[1] the sender; sevenn's edge vector ``pos[j] - pos[i] + shift`` is
  ``graph.edge_vectors()``. Every edge is evaluated once, on its receiver's owner.
* before the convolution of block t >= 1 the senders' ``self_interaction_1`` output is
  exchanged: the tensor sevenn's own LAMMPS parallel model communicates (``_comm_size``),
  [n_halo, irreps_x.dim] per block. Per-atom work runs on owned rows only, the
  convolution's sum and normalisation included (``_convolve``: sevenn's gather makes a
  row for every local atom).
* block 0's convolution input depends on the species alone (one-hot embedding, then
  ``self_interaction_1``): it is computed once for each species present and looked up
  for owned and halo atoms, so block 0 needs neither an exchange nor node work on halo
  rows.
* the readout and sevenn's species-wise (or modality-wise) shift and scale give the
  site energy; the engine takes forces and stress from it, as sevenn's
  ``ForceStressOutputFromEdge`` does from the edge vectors.

Multi-fidelity models (``7net-mf-0`` ...) need ``modal=`` (one of the model's
modalities, as sevenn's calculator does). Refused with a reason: cuEquivariance /
FlashTP / OpenEquivariance-patched models (load the checkpoint, not a patched model).
"""

from __future__ import annotations

import logging
from pathlib import Path

import sevenn._keys as KEY
import torch
from sevenn.nn.convolution import IrrepsConvolution
from sevenn.nn.sequential import AtomGraphSequential
from sevenn.util import load_checkpoint

from mlipd.model_api import LocalGraph, MemoryCost, ModelOutput, ModelSpec, species_index
from mlipd.models.options import flag, parse_options

log = logging.getLogger(__name__)
# memory budget (measured, docs/reliability.md): floats per edge and per convolution
# feature (its per-edge weights twice, its output three times), and per node feature
MEMORY_EDGE_FACTOR = 1.0
MEMORY_FLOATS_PER_NODE_DIM = 64

SYNTAX = "sevennet[:NAME|PATH][,modal=NAME][,offline=1]"
DEFAULT = "7net-0"
_BLOCK = ("self_connection_intro", "self_interaction_1", "convolution", "self_interaction_2",
          "self_connection_outro", "equivariant_gate")


def load_sevennet(arg: str, *, offline: bool = False) -> AtomGraphSequential:
    """A checkpoint file, else a pretrained name resolved by sevenn (``pretrained``)."""
    path = Path(arg)
    if not path.is_file():
        from mlipd.models.pretrained import looks_like_path, sevennet_checkpoint

        if looks_like_path(arg):
            raise FileNotFoundError(f"no SevenNet checkpoint at {arg}")
        path = sevennet_checkpoint(arg, offline=offline)
    checkpoint = load_checkpoint(str(path))
    model = checkpoint.build_model(enable_cueq=False, enable_flash=False, enable_oeq=False)
    log.info("SevenNet %s from %s", arg, path)
    return model


class SevenNetModel(torch.nn.Module):
    """A SevenNet ``AtomGraphSequential`` as an mlipd model.

    ``SevenNetModel("7net-0")`` or ``SevenNetModel("ckpt.pth,modal=PBE")`` loads a model
    (the CLI's ``sevennet:...``); ``SevenNetModel(model=m)`` wraps a model in memory
    (the same object, e.g. a ``SevenNetCalculator``'s ``model``).
    """

    def __init__(self, arg: str | None = None, *, model: AtomGraphSequential | None = None,
                 modal: str | None = None) -> None:
        super().__init__()
        if model is None:
            name, opts = parse_options(arg, model="sevennet", syntax=SYNTAX, positional=True,
                                       keys={"modal": str, "offline": flag})
            modal = opts.get("modal", modal)
            model = load_sevennet(name or DEFAULT, offline=opts.get("offline", False))
        if not isinstance(model, AtomGraphSequential) or model.type_map is None:
            raise ValueError(f"sevennet: {type(model).__name__} is not a SevenNet model with "
                             "a type map")
        mods = model._modules
        n_blocks = sum(1 for k in mods if k.endswith("_convolution"))
        blocks = [[mods.get(f"{t}_{part}") for part in _BLOCK] for t in range(n_blocks)]
        if n_blocks == 0 or any(m is None for b in blocks for m in b):
            raise ValueError("sevennet: only NequIP-type interaction blocks are supported")
        if any(type(b[2]) is not IrrepsConvolution or b[2].is_parallel for b in blocks):
            raise ValueError("sevennet: accelerated (cuEquivariance/FlashTP/OEq) or LAMMPS-"
                             "parallel convolutions are not supported; load the checkpoint")
        self.seven = model
        self.blocks = blocks
        self.modal_index = self._modal(model, modal)
        zs = sorted(model.type_map, key=model.type_map.get)
        if [model.type_map[z] for z in zs] != list(range(len(zs))):
            raise ValueError("sevennet: the type map is not 0..n-1")
        self.register_buffer("type_index", species_index(zs), persistent=False)
        self.n_types = len(zs)
        self.spec = ModelSpec(name="sevennet", cutoff=float(model.cutoff),
                              species=frozenset(zs), n_layers=n_blocks, masked_edges=True)

    @staticmethod
    def _modal(model: AtomGraphSequential, modal: str | None) -> int | None:
        """The modality index to use, chosen as sevenn's calculator does."""
        if not model.modal_map:
            if modal:
                log.warning("sevennet: modal=%s ignored, the model has one fidelity", modal)
            return None
        names = list(model.modal_map)
        if modal not in model.modal_map:
            raise ValueError(f"sevennet: this multi-fidelity model needs modal=NAME, one of "
                             f"{names}")
        return int(model.modal_map[modal])

    def _node_data(self, x: torch.Tensor, types: torch.Tensor) -> dict:
        """The data dict sevenn's per-atom modules read, for ``len(x)`` atoms of one
        structure's modality (zero batch index: the modality is the same for all)."""
        data = {KEY.NODE_FEATURE: x, KEY.ATOM_TYPE: types,
                KEY.NODE_ATTR: torch.nn.functional.one_hot(types, self.n_types).to(x.dtype),
                KEY.BATCH: torch.zeros_like(types)}
        if self.modal_index is not None:
            data[KEY.MODAL_TYPE] = torch.tensor([self.modal_index], device=x.device)
            data = self.seven._modules["one_hot_modality"](data)
        return data

    def _species_features(self, present: torch.Tensor, dtype: torch.dtype):
        """(embedding, self_interaction_1 of block 0) of the species ``present`` among the
        local atoms (not all of the model's: SevenNet-0 knows 89, more rows than a small
        subgraph has atoms, and every rank would make them): block 0 reads nothing else,
        so owned and halo rows are looked up here."""
        onehot = torch.nn.functional.one_hot(present, self.n_types).to(dtype)
        embed = self.seven._modules["onehot_to_feature_x"](
            self._node_data(onehot, present))[KEY.NODE_FEATURE]
        return embed, self.blocks[0][1](self._node_data(embed, present))[KEY.NODE_FEATURE]

    def memory_per_item(self, dtype: torch.dtype) -> MemoryCost:
        """Bytes per atom and edge of one step (``mlipd.model_api.MemoryCost``), from the
        convolutions' sizes (``MEMORY_*``)."""
        edge = node = 0
        for _, _, conv, *_ in self.blocks:
            tp = conv.convolution
            if tp is not None:
                edge += 2 * int(tp.weight_numel) + 3 * int(tp.irreps_out.dim)
            node += int(conv._comm_size)
        itemsize = torch.finfo(dtype).bits // 8
        return MemoryCost(per_atom=itemsize * MEMORY_FLOATS_PER_NODE_DIM * node,
                          per_edge=itemsize * MEMORY_EDGE_FACTOR * edge)
    @staticmethod
    def _species(graph: LocalGraph, types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(species present among the local atoms, each atom's row among them): a
        ``unique`` (a host read: its length) once per topology, kept in ``graph.cache``."""
        cached = graph.cache.get("sevennet")
        if cached is None:
            cached = graph.cache["sevennet"] = torch.unique(types, return_inverse=True)
        return cached

    def forward(self, graph: LocalGraph) -> ModelOutput:
        n, mods = graph.n_owned, self.seven._modules
        types = self.type_index[graph.numbers]
        own = types[:n]
        edges = mods["edge_embedding"]({KEY.EDGE_VEC: graph.edge_vectors()})
        present, which = self._species(graph, types)
        embed, first = self._species_features(present, graph.dtype)
        # the species table's rows: each rank makes those of the species it holds
        self.counters = {"species_rows": int(present.shape[0])}

        x = embed[which[:n]]
        for t, (intro, linear_1, conv, linear_2, outro, gate) in enumerate(self.blocks):
            data = intro(self._node_data(x, own))
            if t == 0:
                x_local = first[which]  # a function of the species: no exchange
            else:
                data = linear_1(data)
                x_local = graph.exchange(data[KEY.NODE_FEATURE])  # senders' features
            data[KEY.NODE_FEATURE] = _convolve(conv, x_local, graph, edges, n)
            x = gate(outro(linear_2(data)))[KEY.NODE_FEATURE]

        data = self._node_data(x, own)
        for key in ("reduce_input_to_hidden", "reduce_hidden_to_energy",
                    "rescale_atomic_energy"):
            data = mods[key](data)
        return ModelOutput(site_energy=data[KEY.ATOMIC_ENERGY].reshape(-1))


def _convolve(conv: IrrepsConvolution, x_local: torch.Tensor, graph: LocalGraph, edges: dict,
              n_owned: int) -> torch.Tensor:
    """``IrrepsConvolution.forward`` (sevenn/nn/convolution.py) with its messages summed
    into the owned receivers only: sevenn's ``message_gather`` makes a row (and divides it)
    for every local atom, halo rows included, which would be node work thrown away."""
    weight = conv.weight_nn(edges[conv.key_weight_input])
    message = conv.convolution(x_local[graph.senders], edges[conv.key_filter], weight)
    if graph.edge_mask is not None:  # edges beyond the cutoff add exactly nothing
        message = message * graph.edge_mask.unsqueeze(1)
    out = message.new_zeros((n_owned, message.shape[1]))
    out.index_add_(0, graph.receivers, message)  # receivers are owned rows
    return out.div(conv.denominator)
