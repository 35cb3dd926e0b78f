"""MACE and ScaleShiftMACE (mace-torch) on mlipd's partitioned graph.

The adapter reuses the model's own modules and weights (embedding, spherical
harmonics, radial basis, ZBL pair term, interactions, products, readouts,
scale_shift) and writes only the layer loop of ``MACE.forward`` /
``ScaleShiftMACE.forward`` (mace/modules/models.py 276-439 and 455-621 in 0.3.16)
with one ``graph.exchange`` before every interaction but the first:

* interaction 0 reads the senders' node embedding, a per-species linear map that
  every rank computes for its halo atoms from their species: no exchange;
* interaction i >= 1 reads the senders' ``node_feats`` (the output of product i-1):
  the only tensor that crosses ranks, [n_halo, hidden_irreps.dim];
* products, readouts, E0, ZBL and scale_shift are per owned atom.

Every edge is evaluated once, on the rank owning its receiver. The interactions'
per-node linear maps (``skip_tp``, ``linear_up``) also run on the halo rows, because
the exchange sits before the interaction as a whole (its variants differ inside);
that is O(n_halo) node work, no edge work. Multi-head models use the head that
MACECalculator would pick (``default_head``).

A model file is code: it is a pickled ``torch.nn.Module`` and loading it runs
whatever it contains, so it must come from a trusted source.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

# mace/__init__.py sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 for the whole process, and
# e3nn 0.4.4 (imported by mace.modules) only loads its constants with that set, so
# mace must come first. We load model files with an explicit weights_only=False and
# restore the variable afterwards so other torch.load calls keep torch's safe default.
_PRIOR = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
import mace  # noqa: E402, F401
from mace.modules.models import MACE  # noqa: E402

if _PRIOR is None:
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
else:
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = _PRIOR

from mlipd.model_api import LocalGraph, ModelOutput, ModelSpec, species_index  # noqa: E402
from mlipd.models.options import parse_options  # noqa: E402

log = logging.getLogger(__name__)

SYNTAX = "mace:PATH[,head=NAME]"


def load_mace_file(path: str | Path) -> torch.nn.Module:
    """Unpickle a MACE model file (``torch.save(model)``, as MACE's training writes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no MACE model file at {path}")
    # A whole pickled module cannot load under torch>=2.6's weights_only default.
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, torch.jit.ScriptModule):
        raise ValueError(f"{path} is a TorchScript archive; give the original .model file")
    if not isinstance(obj, torch.nn.Module):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a MACE model")
    return obj


def default_head(heads: list[str], head: str | None) -> int:
    """Index of the head to evaluate, chosen as ``mace.calculators.MACECalculator`` does:
    the named one, else the only one, else the one called "default" (any case)."""
    if head is not None:
        if head not in heads:
            raise ValueError(f"head {head!r} not in the model's heads {heads}")
        return heads.index(head)
    if len(heads) == 1:
        return 0
    named = [i for i, h in enumerate(heads) if h.lower() == "default"]
    if not named:
        raise ValueError(f"multi-head model without a 'default' head; choose one of {heads} "
                         "with mace:PATH,head=NAME")
    return named[0]


class MaceModel(torch.nn.Module):
    """A MACE or ScaleShiftMACE model as an mlipd model.

    ``MaceModel("model.model")`` or ``MaceModel("model.model,head=NAME")`` loads a file
    (the CLI's ``mace:PATH[,head=NAME]``); ``MaceModel(model=module)`` wraps a module in
    memory (the same object, not a copy). Multi-head models use the head that
    MACECalculator would pick (see ``default_head``).
    """

    def __init__(self, path: str | None = None, *, model: torch.nn.Module | None = None,
                 head: str | None = None) -> None:
        super().__init__()
        if path is not None:
            path, opts = parse_options(path, model="mace", syntax=SYNTAX, positional=True,
                                       keys={"head": str})
            head = opts.get("head", head)
            if path is None:
                raise ValueError(f"mace needs a model file: --model {SYNTAX}")
            model = load_mace_file(path)
        if model is None:
            raise ValueError("mace needs a model file: --model mace:PATH")
        if not isinstance(model, MACE):
            raise ValueError(f"mace: {type(model).__name__} is not an energy model (MACE or "
                             "ScaleShiftMACE); dipole/polarisability models are not supported")
        if hasattr(model, "joint_embedding"):
            raise ValueError("mace: models with extra per-structure embeddings (embedding_specs, "
                             "e.g. total charge and spin) are not supported")
        self.mace = model
        self.head = default_head(list(getattr(model, "heads", ["Default"])), head)
        zs = [int(z) for z in model.atomic_numbers.tolist()]
        self.register_buffer("z_index", species_index(zs), persistent=False)
        self.spec = ModelSpec(name="mace", cutoff=float(model.r_max), species=frozenset(zs),
                              n_layers=len(model.interactions))

    def forward(self, graph: LocalGraph) -> ModelOutput:
        m, n = self.mace, graph.n_owned
        dtype = graph.dtype
        attrs = torch.nn.functional.one_hot(self.z_index[graph.numbers],
                                            len(self.spec.species)).to(dtype)
        own_attrs = attrs[:n]
        heads = torch.full((n,), self.head, dtype=torch.long, device=attrs.device)
        rows = torch.arange(n, device=attrs.device)
        # MACE's edge_index is [sender, receiver] and its vector points from the sender
        # to the receiver (modules/utils.py get_edge_vectors_and_lengths): the opposite
        # of graph.edge_vectors(), which matters for odd-l harmonics.
        edge_index = torch.stack([graph.senders, graph.receivers])
        vectors = -graph.edge_vectors()
        lengths = torch.linalg.norm(vectors, dim=-1, keepdim=True)

        node_e0 = m.atomic_energies_fn(own_attrs)[rows, heads]
        edge_attrs = m.spherical_harmonics(vectors)
        edge_feats, cutoff = m.radial_embedding(lengths, attrs, edge_index, m.atomic_numbers)
        if hasattr(m, "pair_repulsion"):
            # ZBL scatters into receivers, which are owned: the halo rows stay zero
            pair = m.pair_repulsion_fn(lengths, attrs, edge_index, m.atomic_numbers)[:n]
        else:
            pair = torch.zeros_like(node_e0)

        feats = m.node_embedding(attrs)  # halo rows from their species: no exchange
        per_layer = []
        for i, (interaction, product) in enumerate(zip(m.interactions, m.products, strict=True)):
            if i > 0:
                feats = graph.exchange(feats)  # product i-1 of the senders, from their owners
            feats, sc = interaction(node_attrs=attrs, node_feats=feats, edge_attrs=edge_attrs,
                                    edge_feats=edge_feats, edge_index=edge_index,
                                    cutoff=cutoff, first_layer=(i == 0))
            feats = _product(product, feats[:n], None if sc is None else sc[:n], own_attrs)
            per_layer.append(feats)

        readout_es = [
            readout(per_layer[-1 if len(m.readouts) == 1 else i], heads)[rows, heads]
            for i, readout in enumerate(m.readouts)
        ]
        inter = pair + torch.stack(readout_es).sum(0)
        if hasattr(m, "scale_shift"):
            # ScaleShiftMACE scales the ZBL term too (models.py 575-577); MACE does not
            return ModelOutput(site_energy=node_e0 + m.scale_shift(inter, heads))
        return ModelOutput(site_energy=node_e0 + inter)


def _product(product: torch.nn.Module, feats: torch.Tensor, sc: torch.Tensor | None,
             attrs: torch.Tensor) -> torch.Tensor:
    """``product(feats, sc, attrs)``, also for a rank that owns no atoms: mace's symmetric
    contraction cannot reshape 0 rows (symmetric_contraction.py 258), yet that rank must
    keep its later exchanges in the autograd graph, since their backward is collective."""
    if feats.shape[0] > 0:
        return product(node_feats=feats, sc=sc, node_attrs=attrs)
    return feats.new_zeros((0, product.linear.irreps_out.dim)) + 0.0 * feats.sum()
