"""CHGNet (the ``chgnet`` package) inside mlipd's layer loop.

The package's own modules and pretrained weights do all the maths; this adapter
only builds the graphs (``chgnet_graph``) and calls the modules block by block,
with the halo exchanges a partitioned graph needs between them
(``CHGNet._compute``, chgnet/model/model.py:389-541, re-expressed as a loop; see
../shared/porting/PORTING_MAP.md §1). At one rank every exchange is the identity.

Energies: CHGNet is trained on energy per atom, e = (Σ_i mlp_i + Σ_i w[Z_i]) / N, with
w the AtomRef composition model. The site energy of atom i here is mlp_i + w[Z_i] (eV),
so Σ site energy is the package's total energy e·N and the engine's forces and
virial equal the package's (which differentiates Σ mlp_i before dividing by N).
Magnetic moments (μB, ``abs(site_wise(atom))`` after the last-but-one AtomConv) are a
per-atom extra. An atom with no neighbour within the cutoff keeps its embedding and
gets the value the package gives with ``on_isolated_atoms="ignore"`` (its default in
``CHGNetCalculator`` is to warn and compute that same value).

Every atom, bond, directed edge and angle is computed on one rank only: bonds by
their owner (``chgnet_graph``, ``chgnet_comm``), atoms by theirs. Per block, every rank
calls, in order: AtomConv (messages on its edges, then its per-atom output layers on
owned rows only), BondConv up to its aggregate, sends replica bonds' partial sums
home, the rest of BondConv on owned bonds, sends the new bond features to the
replicas, AngleUpdate, then refreshes the halo atoms' features (``graph.exchange``).
The bond embedding and weights are made by the owner and spread once before block 0.
The atom embedding of halo rows is looked up from their species (a table row, no
arithmetic), where an exchange would cost one more collective.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import replace

import torch
import torch.utils.checkpoint
from chgnet.model import CHGNet

from mlipd.errors import SetupError
from mlipd.memory import available_bytes
from mlipd.model_api import LocalGraph, MemoryCost, ModelOutput, ModelSpec
from mlipd.models.chgnet_comm import BondExchange, BondPlans
from mlipd.models.chgnet_graph import (
    BondGraph,
    SkinGraph,
    angle_weights,
    build_skin_graph,
    fixed_bond_graph,
)
from mlipd.models.options import choice, parse_options

log = logging.getLogger(__name__)

PRETRAINED = ("0.3.0", "0.2.0", "r2scan")


def load_chgnet(path: str | None = None) -> CHGNet:
    """The pretrained model bundled with ``chgnet`` (``None`` or a version name in
    ``PRETRAINED``) or a checkpoint file written by chgnet; on CPU, no network."""
    # CHGNet.__init__ prints its parameter count; keep stdout clean for servers
    with contextlib.redirect_stdout(io.StringIO()):
        if path is None or path in PRETRAINED:
            return CHGNet.load(model_name=path or "0.3.0", use_device="cpu", verbose=False)
        if not os.path.isfile(path):
            raise SetupError(f"chgnet: no checkpoint file {path!r} (or use one of {PRETRAINED})")
        return CHGNet.from_file(path)


RECOMPUTE = ("auto", "0", "1")
# autograd's stored activations per angle row and per directed edge, float32: fitted to
# the peak RSS of 1,000-atom (Li,Mn,Ni)O and (Mn,Ni)O steps on CPU (frozen weights,
# activations stored); recompute=auto's estimate
BYTES_PER_ANGLE = 12_000
BYTES_PER_ATOM = 20_000  # memory budget only (per_atom of memory_per_item)
# stored over recomputed step memory, from the committed benchmarks/results/capacity-cpu.md
# (rows chgnet | 216: 1397.3 vs 897.4 KiB/atom of process peak, 1.56x; rounded down, so a
# budget held to the recomputed figure errs towards refusing)
RECOMPUTE_SAVING = 1.5
BYTES_PER_EDGE = 17_000


SYNTAX = "chgnet[:VERSION|PATH][,recompute=auto|0|1][,angles=auto|select|mask]"
# A warm step's angles: "mask" runs every candidate angle (edges within bond cutoff + skin
# at the rebuild) with a weight, fixed shapes and no host read (what a CUDA graph needs);
# "select" keeps this step's angles (one ``nonzero``, a host read). On 64-atom (Mn,Ni)O
# with a 0.5 Å skin there are 19,584 candidate angles for 2,064 of the step, so a masked
# CPU step does several times the angle work; "auto" masks on CUDA (small systems are
# launch-bound there, and a CUDA graph needs it) and selects on a CPU.
ANGLES = ("auto", "select", "mask")


def chgnet_options(arg: str | None) -> tuple[str | None, str, str]:
    """``"[VERSION|PATH][,recompute=auto|0|1][,angles=auto|select|mask]"`` -> (VERSION or
    PATH or None, recompute, angles)."""
    path, opts = parse_options(arg, model="chgnet", syntax=SYNTAX, positional=True,
                               keys={"recompute": choice(*RECOMPUTE),
                                     "angles": choice(*ANGLES)})
    return path, opts.get("recompute", "auto"), opts.get("angles", "auto")


def stored_activation_bytes(n_angles: int, n_edges: int, dtype: torch.dtype) -> int:
    """Estimated memory autograd keeps for a forward without recomputation."""
    scale = torch.finfo(dtype).bits // 32
    return scale * (BYTES_PER_ANGLE * n_angles + BYTES_PER_EDGE * n_edges)


class CHGNetModel(torch.nn.Module):
    """CHGNet as an mlipd model. ``arg``: a chgnet checkpoint file, or a bundled
    version name (``"0.3.0"`` default, ``"0.2.0"``, ``"r2scan"``), optionally followed
    by ``,recompute=1|0|auto``. With 1, autograd keeps only each layer's inputs and
    the backward pass recomputes the layer (activation checkpointing): less memory per
    atom for more time (benchmarks/results/capacity-cpu.md, rows chgnet). ``auto``
    (default) recomputes when the estimated stored activations exceed half of the
    device's free memory."""

    def __init__(self, arg: str | None = None) -> None:
        super().__init__()
        path, self.recompute, self.angles = chgnet_options(arg)
        net = load_chgnet(path)
        if not net.mlp_first:
            raise SetupError("chgnet: only mlp_first models have site energies (pooling first "
                             "mixes atoms before the readout MLP)")
        if net.composition_model is None or not getattr(net.composition_model, "fitted", True):
            raise SetupError("chgnet: the checkpoint has no fitted AtomRef composition model")
        if not all(layer is not None for layer in (*net.bond_conv_layers, *net.angle_layers)):
            raise SetupError("chgnet: models without bond or angle updates are not supported")
        self.net = net.eval()
        args = net.model_args
        log.info("CHGNet %s loaded (%d parameters)", net.version or path, net.n_params)
        self.bond_cutoff = float(args.get("bond_graph_cutoff", 3.0))
        n_species = int(net.atom_embedding.embedding.num_embeddings)
        self.spec = ModelSpec(
            name="chgnet",
            cutoff=float(args.get("atom_graph_cutoff", 6.0)),
            species=frozenset(range(1, n_species + 1)),
            n_layers=int(net.n_conv),
            per_atom_extras=("magmoms",),
            masked_edges=True,
        )
        # its bond graph is built once per topology on the candidate edges: a step takes
        # them all, masked (``Step.masks``), never a selection
        self.needs_masked_edges = True
        # the last forward's graph sizes and choices, as information (the work done and
        # the rows moved are measured by mlipd.testing.work and Comm.traffic)
        self.counters: dict[str, int] = {}

    def memory_per_item(self, dtype: torch.dtype) -> MemoryCost:
        """Bytes per atom, edge and angle of one step (``mlipd.model_api.MemoryCost``):
        the stored activations (``BYTES_PER_*``), 1 / 3.5 of them when recomputing
        (``recompute=1``, or ``auto`` when memory is short); see docs/reliability.md."""
        scale = torch.finfo(dtype).bits // 32

        def cost(s: float, recomputed: MemoryCost | None = None) -> MemoryCost:
            return MemoryCost(per_atom=s * BYTES_PER_ATOM, per_edge=s * BYTES_PER_EDGE,
                              per_angle=s * BYTES_PER_ANGLE, angle_cutoff=self.bond_cutoff,
                              recomputed=recomputed)

        if self.recompute == "1":
            return cost(scale / RECOMPUTE_SAVING)
        return cost(scale, cost(scale / RECOMPUTE_SAVING) if self.recompute == "auto" else None)

    def _should_recompute(self, bg: BondGraph, graph: LocalGraph) -> bool:
        if self.recompute != "auto":
            return self.recompute == "1"
        device = graph.receivers.device
        free = available_bytes(device)
        if free is None:
            return False
        if device.type == "cpu":  # ranks on one host share its memory
            free //= int(os.environ.get("LOCAL_WORLD_SIZE", graph.world_size))
        need = stored_activation_bytes(bg.n_angles, int(graph.receivers.shape[0]), graph.dtype)
        return need > free // 2

    @staticmethod
    def _checkpointed(fn, *args):
        """``fn(*args)`` keeping only its inputs for backward, where it runs again.
        Each piece is local to the rank: the exchanges stay outside, so a recompute
        never communicates."""
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    def _bond_topology(self, graph: LocalGraph, lengths: torch.Tensor
                       ) -> tuple[SkinGraph, BondGraph, BondPlans | None]:
        """The skin bond graph, its fixed ``BondGraph`` and the bond plans of ``graph``'s
        topology: built on its first step (collective at P > 1: every rank is at that
        step) and kept in ``graph.cache`` until the engine rebuilds the topology. The
        graph's edges are its candidates (``masked_edges``): pairs within cutoff + skin."""
        cached = graph.cache.get("chgnet")
        if cached is not None:
            self._built = False
            return cached
        if graph.edge_ids is not None:
            raise ValueError("chgnet takes every candidate edge with a mask (masked_edges), "
                             "not a selection of them")
        self._built = True
        skin_width = 0.0 if graph.candidates is None else graph.candidates.skin
        reach = self.bond_cutoff + skin_width
        build_lengths = lengths.detach()
        skin = build_skin_graph(graph.receivers, graph.senders, graph.images, build_lengths,
                                global_ids=graph.global_ids, n_owned=graph.n_owned,
                                reach=reach)
        plans = None if graph.comm is None else BondPlans(graph, skin, graph.senders)
        cached = skin, fixed_bond_graph(skin, graph.receivers), plans
        graph.cache["chgnet"] = cached
        return cached

    def _mask_angles(self, graph: LocalGraph) -> bool:
        """Whether a step runs every candidate angle with a weight (see ``ANGLES``):
        ``auto`` on CUDA, where a host read drains the device's queue."""
        if self.angles == "auto":
            return graph.receivers.device.type == "cuda"
        return self.angles == "mask"

    def forward(self, graph: LocalGraph) -> ModelOutput:
        """Site energies (n_owned,) eV and ``magmoms`` (n_owned,) μB of the owned atoms."""
        m, n_own = self.net, graph.n_owned
        # geometry in float64, cast after the basis expansions (float32 runs: 10-50x
        # smaller force error than float32 geometry, for the same speed): the package's
        # encoder on the engine's edge vectors, as centre - neighbour with a zero
        # neighbour and image. Unit vectors point to the centre, per directed edge;
        # bases of owned bonds only.
        to_centre = -graph.edge_vectors(torch.float64)
        lengths = torch.linalg.vector_norm(to_centre.detach(), dim=1)
        _, bg, plans = self._bond_topology(graph, lengths)
        # this step's edges (r < cutoff) and angles: weights of fixed-shape messages
        edge_w = None if graph.edge_mask is None else graph.edge_mask.unsqueeze(1)
        angle_w = angle_weights(bg, lengths, bond_cutoff=self.bond_cutoff)
        if not self._mask_angles(graph):  # this step's angles only (a host read)
            keep = torch.nonzero(angle_w.view(-1)).view(-1)
            bg = replace(bg, angles=bg.angles[keep], angle_d1=bg.angle_d1[keep],
                         angle_d2=bg.angle_d2[keep])
            angle_w = None
        bonds = BondExchange(plans, graph.comm)
        atom_graph = torch.stack([graph.receivers, graph.senders], dim=1)
        d2u = bg.edge_bond
        zero = to_centre.new_zeros(1, 3)
        b_ag, b_bg, unit = m.bond_basis_expansion(
            center=to_centre, neighbor=zero, undirected2directed=bg.bond_edge[: bg.n_owned_bonds],
            image=zero, lattice=to_centre.new_zeros(3, 3))
        angle_bases = m.angle_basis_expansion(unit[bg.angle_d1], unit[bg.angle_d2])
        b_ag, b_bg, angle_bases = (t.to(graph.dtype) for t in (b_ag, b_bg, angle_bases))

        # halo rows too, from their species: a table lookup, cheaper than an exchange
        atom = m.atom_embedding(graph.numbers - 1)
        # ``owned``: the owned bonds' features, which the owner updates; ``bond``: the
        # same rows followed by the replicas', which angles and messages read
        owned = m.bond_embedding(b_ag)
        bond, w_ag, w_bg = bonds.spread(owned, m.bond_weights_ag(b_ag), m.bond_weights_bg(b_bg))
        angle = m.angle_embedding(angle_bases)
        recompute = torch.is_grad_enabled() and self._should_recompute(bg, graph)
        run = self._checkpointed if recompute else _call
        magmom = None
        for i in range(m.n_conv - 1):
            if i > 0:
                atom = graph.exchange(atom)
            atom = run(_atom_conv, m.atom_conv_layers[i], atom, bond, w_ag, atom_graph, d2u,
                       n_own, edge_w)
            layer = m.bond_conv_layers[i]
            partial = run(_bond_conv_partial, layer, atom, bond, w_bg, angle, bg, angle_w)
            owned = run(_bond_conv_finish, layer, owned, bonds.sum_home(partial))
            (bond,) = bonds.spread(owned)
            if i < m.n_conv - 2:  # the last AngleUpdate's output is never read
                angle = run(m.angle_layers[i], atom, bond, angle, bg.angles)
            else:
                magmom = torch.abs(m.site_wise(atom)).view(-1)
        atom = graph.exchange(atom)
        atom = run(_atom_conv, m.atom_conv_layers[-1], atom, bond, w_ag, atom_graph, d2u, n_own,
                   edge_w)
        if m.readout_norm is not None:
            atom = m.readout_norm(atom)
        atom_ref = m.composition_model.fc.weight[0, graph.numbers[:n_own] - 1]
        site = m.mlp(atom).view(-1) + atom_ref
        if magmom is None:  # n_conv == 1: no magmom layer ran
            magmom = torch.zeros_like(site)
        # sizes of the topology's fixed graph (candidates: within the skin), not of this
        # step's selection, which would have to be read back from the device
        self.counters = {
            "atoms": n_own,
            "halo_atoms": graph.n_local - n_own,
            "directed_edges": int(graph.receivers.shape[0]),
            "bonds": bg.n_owned_bonds,
            "bond_replicas": bg.n_bonds - bg.n_owned_bonds,
            "short_replicas": 0 if plans is None else int(plans.short.shape[0]),
            "angles": bg.n_angles,
            "recomputed": int(recompute),
            "bond_graph_built": int(self._built),
        }
        return ModelOutput(site_energy=site, extras={"magmoms": magmom})


def _atom_conv(layer, atom: torch.Tensor, bond: torch.Tensor, weights: torch.Tensor,
               atom_graph: torch.Tensor, d2u: torch.Tensor, n_own: int,
               edge_w: torch.Tensor | None) -> torch.Tensor:
    """``AtomConv.forward`` (chgnet/model/layers.py:112-137) on local atoms (n_local, F)
    -> the owned atoms' new features (n_own, F): messages along the owned directed
    edges, summed into their centres (always owned), and the per-atom output layers
    (``mlp_out``, residual, norm) on owned rows only; a halo row is updated by its owner.
    edge_w: (E, 1) bool, the edges within the cutoff now (None: all)."""
    centre = torch.index_select(atom, 0, atom_graph[:, 0])
    neighbour = torch.index_select(atom, 0, atom_graph[:, 1])
    msg = layer.twoBody_atom(torch.cat([centre, torch.index_select(bond, 0, d2u), neighbour],
                                       dim=1))
    msg = msg * torch.index_select(weights, 0, d2u)
    if edge_w is not None:
        msg = msg * edge_w
    new = _sum_rows(msg, atom_graph[:, 0], n_own)
    if layer.use_mlp_out:
        new = layer.mlp_out(new)
    if layer.resnet:
        new = new + atom[:n_own]
    if layer.atom_norm is not None:
        new = layer.atom_norm(new)
    return new


def _bond_conv_partial(layer, atom, bond, w_bg, angle, bg: BondGraph,
                       angle_w: torch.Tensor | None) -> torch.Tensor:
    """``BondConv.forward`` (chgnet/model/layers.py:238-254) up to its aggregate:
    (U, F) sum over this rank's angles of each bond's messages (angle_w: (A, 1) bool,
    this step's angles, or None: all of them)."""
    c, u1, u2 = bg.angles[:, 0], bg.angles[:, 1], bg.angles[:, 2]
    msg = layer.twoBody_bond(torch.cat([bond[u1], bond[u2], angle, atom[c]], dim=1))
    msg = msg * w_bg[u1] * w_bg[u2]
    if angle_w is not None:
        msg = msg * angle_w
    return _sum_rows(msg, u1, bond.shape[0])


def _sum_rows(data: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
    """(n, F): rows of ``data`` summed by owner, as chgnet's ``aggregate(average=False,
    num_owner=n)`` (the same ``index_add_``) without its ``bincount``, whose length the
    host must read from the device."""
    return data.new_zeros((n, data.shape[1])).index_add_(0, owners, data)


def _bond_conv_finish(layer, bond: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
    """``BondConv.forward`` (layers.py:256-265) after the aggregate."""
    new = layer.mlp_out(summed) if layer.use_mlp_out else summed
    if layer.resnet:
        new = new + bond
    if layer.bond_norm is not None:
        new = layer.bond_norm(new)
    return new


def _call(fn, *args):
    return fn(*args)
