"""eSEN / UMA (fairchem-core's ``eSCNMDBackbone`` + an energy head) as an mlipd model.

``--model esen:PATH|NAME[,task=NAME][,charge=Q][,spin=S][,offline=1]`` loads a fairchem
inference checkpoint (``MLIPInferenceCheckpoint``, as fairchem saves them; NAME: one
registered by fairchem, from its cache) with fairchem's own loader, then runs the
backbone's layer loop on mlipd's local graph:

- fairchem's ``edge_index`` is [source, target] with the vector from target to source
  and messages aggregated into the target: mlipd's [sender, receiver] and
  ``graph.edge_vectors()`` exactly, so receivers (owned atoms) are the scatter target.
- node embeddings of the senders are refreshed with ``graph.exchange`` before each
  block's edgewise convolution (after ``norm_1``, a per-atom op), the only place a
  block reads neighbours; the edge-degree embedding and the heads read only edges
  and owned atoms.
- fairchem's ``max_neighbors`` cap is per receiver (see ``esen_graph``), so it is
  applied here to each owned atom's candidate edges; the engine hands all of them to
  the receiver's owner.

Only what fairchem's own forward would compute is supported; anything else is refused
with the reason (mixture-of-experts backbones, direct-force heads, charge/spin-balanced
channels).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

# e3nn 0.4.4 (fairchem's SO3 grid imports it) unpickles its constants with torch.load at
# import; torch >= 2.6 refuses the slices in them unless allow-listed.
with torch.serialization.safe_globals([slice]):
    import e3nn.o3  # noqa: F401

from fairchem.core.models.uma.escn_md import MLP_EFS_Head, eSCNMDBackbone

from mlipd.model_api import LocalGraph, MemoryCost, ModelOutput, ModelSpec
from mlipd.models.esen_graph import NeighborSlots, capped_mask, neighbor_slots
from mlipd.models.esen_tasks import EnergyTask, energy_task
from mlipd.models.options import flag, parse_options

log = logging.getLogger(__name__)
# memory budget (measured, docs/reliability.md): floats kept per layer and spherical
# feature ((lmax + 1)^2 x channels) of an edge message and of a node
MEMORY_EDGE_FLOATS = 16
MEMORY_NODE_FLOATS = 32


SYNTAX = "esen:PATH|NAME[,task=NAME][,charge=Q][,spin=S][,offline=1]"


def load_checkpoint(path: str | Path, *, offline: bool = False) -> tuple[torch.nn.Module, object]:
    """(HydraModel, MLIPInferenceCheckpoint) from a fairchem inference checkpoint file, or
    a name registered by fairchem (``esen-sm-conserving-all-omol``...) from fairchem's
    cache (``mlipd.models.pretrained``)."""
    from fairchem.core.units.mlip_unit.utils import load_inference_model

    from mlipd.models.pretrained import fairchem_checkpoint, looks_like_path

    if not looks_like_path(str(path)):
        path = fairchem_checkpoint(str(path), offline=offline)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no fairchem checkpoint at {path}")
    return load_inference_model(str(path), return_checkpoint=True)


def _energy_head(heads: torch.nn.ModuleDict) -> MLP_EFS_Head:
    found = [h for h in heads.values() if isinstance(h, MLP_EFS_Head)]
    if len(found) != 1:
        raise ValueError(f"esen: need exactly one MLP energy head, found {len(found)} among "
                         f"{list(heads.keys())}")
    return found[0]


class ESENModel(torch.nn.Module):
    """A fairchem ``HydraModel`` (``eSCNMDBackbone`` + ``MLP_EFS_Head``) as an mlipd model.

    ``ESENModel("ckpt.pt,task=omat")`` loads a checkpoint (the CLI's ``esen:...``);
    ``ESENModel(model=hydra_model)`` wraps a module in memory (the same object).
    ``task``: the dataset embedding to use (needed when the model has several);
    ``charge`` / ``spin``: per-structure values fed to its charge/spin embeddings.
    """

    def __init__(self, path: str | None = None, *, model: torch.nn.Module | None = None,
                 task: str | None = None, charge: int = 0, spin: int = 0) -> None:
        super().__init__()
        checkpoint = None
        if path is not None:
            path, opts = parse_options(path, model="esen", syntax=SYNTAX, positional=True,
                                       keys={"task": str, "charge": int, "spin": int,
                                             "offline": flag})
            task = opts.get("task", task)
            charge = opts.get("charge", charge)
            spin = opts.get("spin", spin)
            if path is None:
                raise ValueError(f"esen needs a fairchem checkpoint: --model {SYNTAX}")
            model, checkpoint = load_checkpoint(path, offline=opts.get("offline", False))
        if model is None:
            raise ValueError("esen needs a fairchem checkpoint: --model esen:PATH")
        backbone = getattr(model, "backbone", None)
        if type(backbone) is not eSCNMDBackbone:
            raise ValueError(f"esen: backbone {type(backbone).__name__} is not supported, only "
                             "eSCNMDBackbone (mixture-of-experts UMA backbones are not)")
        cfg = backbone.regress_config
        if cfg.direct_forces or cfg.direct_stress:
            raise ValueError("esen: direct-force/stress models are not supported (mlipd takes "
                             "forces and stress as energy gradients)")
        if backbone.charge_channel_end > backbone.charge_channel_start or \
                backbone.spin_channel_end > backbone.spin_channel_start:
            raise ValueError("esen: charge/spin-balanced channels are not supported")
        self.model = model
        self.backbone = backbone
        self.head = _energy_head(model.output_heads)
        self.dataset = self._pick_dataset(task)
        self.charge, self.spin = charge, spin
        self.task: EnergyTask | None = (energy_task(checkpoint, self.dataset)
                                        if checkpoint is not None else None)
        self.spec = ModelSpec(name="esen", cutoff=float(backbone.cutoff),
                              species=frozenset(range(1, backbone.max_num_elements)),
                              n_layers=backbone.num_layers, masked_edges=True)

    def _pick_dataset(self, task: str | None) -> str | None:
        b = self.backbone
        if not b.use_dataset_embedding:
            return task
        names = sorted(b.dataset_mapping)
        if task is None:
            if len(names) != 1:
                raise ValueError(f"esen: choose a task with esen:PATH,task=NAME; one of {names}")
            return names[0]
        if task not in b.dataset_mapping:
            raise ValueError(f"esen: task {task!r} not in the model's datasets {names}")
        return task

    def _system_embedding(self, n_structures: int, like: torch.Tensor) -> torch.Tensor:
        """(n_structures, C): fairchem's mixed charge/spin/dataset embedding."""
        full = torch.full((n_structures,), 0, dtype=torch.long, device=like.device)
        dataset = [self.dataset] * n_structures if self.backbone.use_dataset_embedding else None
        return self.backbone.csd_embedding(charge=full + self.charge, spin=full + self.spin,
                                           dataset=dataset)

    def memory_per_item(self, dtype: torch.dtype) -> MemoryCost:
        """Bytes per atom and edge of one step (``mlipd.model_api.MemoryCost``), from the
        backbone's spherical feature size and layers (``MEMORY_*``)."""
        b = self.backbone
        features = int(b.sphere_channels) * (int(b.lmax) + 1) ** 2 * int(b.num_layers)
        itemsize = torch.finfo(dtype).bits // 8
        return MemoryCost(per_atom=itemsize * MEMORY_NODE_FLOATS * features,
                          per_edge=itemsize * MEMORY_EDGE_FLOATS * features)

    def forward(self, graph: LocalGraph) -> ModelOutput:
        b, n = self.backbone, graph.n_owned
        slots = self._slots(graph)  # collective at its rebuild: a rank owning nothing too
        if n == 0:
            return self._empty_rank(graph)
        vec = graph.edge_vectors()
        # every candidate edge, weighted by whether fairchem keeps it now (fixed shapes)
        keep = capped_mask(slots, graph.receivers, vec, graph.edge_mask,
                           max_neighbors=b.max_neighbors)
        senders, receivers = graph.senders, graph.receivers
        dev = vec.device
        if receivers.numel() == 0 and n > 0:
            # fairchem's fix-up for edgeless systems: one self-loop beyond the cutoff,
            # which the envelope zeroes (escn_md.add_n_empty_edges)
            senders = receivers = torch.zeros(1, dtype=torch.long, device=dev)
            vec = vec.new_ones(1, 3) + b.cutoff
        dist = torch.linalg.norm(vec, dim=-1)
        edge_index = torch.stack([senders, receivers])

        wigner, wigner_inv = b._get_rotmat_and_wigner(vec)
        coefficient_index = b.coefficient_index if b.mmax != b.lmax else None
        wigner, wigner_inv = b.backend.prepare_wigner(wigner, wigner_inv, b.mappingReduced,
                                                      coefficient_index)
        # constant per batch (fairchem's charge/spin embedding reads its inputs back with
        # ``torch.where``): made once per topology
        csd = graph.cache.get("esen_csd")
        if csd is None:
            csd = graph.cache["esen_csd"] = self._system_embedding(graph.n_structures, vec)
        own_batch = graph.batch[:n]
        x = vec.new_zeros((n, b.sph_feature_size, b.sphere_channels))
        sys_node = csd[own_batch]
        x[:, 0, :] = b.sphere_embedding(graph.numbers[:n]) + sys_node

        envelope = b.envelope(dist / b.cutoff).reshape(-1, 1)
        if keep is not None and keep.shape[0] == envelope.shape[0]:  # not the self-loop
            envelope = envelope * keep.unsqueeze(1)  # a dropped edge's messages: exactly 0
        x_edge = torch.cat((b.distance_expansion(dist),
                            b.source_embedding(graph.numbers[senders]),
                            b.target_embedding(graph.numbers[receivers])), dim=1)
        if wigner_inv.ndim == 3:
            envelope = envelope.unsqueeze(-1)
        wigner_inv_env = wigner_inv * envelope
        x = b.edge_degree_embedding(x, x_edge, receivers, wigner_inv_env)

        x_edge_per_layer = b.backend.get_layer_radial_emb(x_edge, b)
        for block, x_edge_i in zip(b.blocks, x_edge_per_layer, strict=True):
            x = self._block(block, x, x_edge_i, edge_index, wigner, wigner_inv_env,
                            sys_node, graph)
        x = b.norm(x)

        scalar = x[:, 0, :]
        site = self.head.energy_block(scalar).view(-1)
        n_atoms = graph.n_atoms.to(graph.dtype)[own_batch]
        if self.head.reduce == "mean":
            site = site / n_atoms
        if self.task is not None:
            site = self.task.site_energy(site, graph.numbers[:n], n_atoms)
        return ModelOutput(site_energy=site)

    def _slots(self, graph: LocalGraph) -> NeighborSlots:
        """The max_neighbors slots of the topology (``esen_graph``), made at its first
        step and kept in ``graph.cache``."""
        b = self.backbone
        if b.enforce_max_neighbors_strictly:
            raise ValueError("esen: enforce_max_neighbors_strictly=True is not supported "
                             "(fairchem's eSCNMDBackbone always uses False)")
        slots = graph.cache.get("esen")
        if slots is None or graph.edge_ids is not None:  # a selection changes every step
            widest = (None if graph.comm is None
                      else _widest_of_ranks(graph.comm, graph.receivers.device))
            slots = graph.cache["esen"] = neighbor_slots(
                graph.receivers, n_owned=graph.n_owned, max_neighbors=b.max_neighbors,
                widest=widest)
        return slots

    def _empty_rank(self, graph: LocalGraph) -> ModelOutput:
        """A rank that owns no atoms still joins every exchange, and keeps them in the
        autograd graph: their backward is collective too. Its (empty) edge vectors are
        in that graph as on every other rank, so the step's virial takes the same path."""
        b, pos = self.backbone, graph.positions.to(graph.dtype)
        zero = 0.0 * (pos.sum() + graph.edge_vectors().to(graph.dtype).sum())
        x = pos.new_zeros((0, b.sph_feature_size, b.sphere_channels)) + zero
        for _ in b.blocks:
            x = graph.exchange(x)
        return ModelOutput(site_energy=pos.new_zeros(0) + 0.0 * x.sum())

    @staticmethod
    def _block(block: torch.nn.Module, x: torch.Tensor, x_edge: torch.Tensor,
               edge_index: torch.Tensor, wigner: torch.Tensor, wigner_inv_env: torch.Tensor,
               sys_node: torch.Tensor, graph: LocalGraph) -> torch.Tensor:
        """``eSCNMD_Block.forward`` with the halo exchange where fairchem gathers
        (escn_md_block.py: Edgewise.forward), on (n_owned, (lmax+1)², C) features."""
        x_res = x
        x = block.norm_1(x)
        x[:, 0, :] = x[:, 0, :] + sys_node
        x_full = graph.exchange(x)
        x = block.edge_wise.forward_chunk(x_full, x.shape[0], x_edge, edge_index, wigner,
                                          wigner_inv_env, edge_index[1])
        x = x + x_res
        x_res = x
        return block.atom_wise(block.norm_2(x)) + x_res


def _widest_of_ranks(comm, device: torch.device) -> Callable[[int], int]:
    """A rank's widest neighbour row -> the widest of all ranks (one all-reduce)."""

    def widest(width: int) -> int:
        widths = torch.zeros(comm.world_size, dtype=torch.long, device=device)
        widths[comm.rank] = width
        return int(comm.all_reduce_sum(widths).cpu().numpy().max())

    return widest
