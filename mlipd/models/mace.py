"""MACE and ScaleShiftMACE (mace-torch) on mlipd's partitioned graph.

The adapter reuses the model's own modules and weights (embedding, spherical
harmonics, radial basis, ZBL pair term, interactions, products, readouts,
scale_shift) and writes only the layer loop of ``MACE.forward`` /
``ScaleShiftMACE.forward`` (mace/modules/models.py 276-439 and 455-621 in 0.3.16),
with each interaction cut where it reads other atoms (``mace_interactions``):

* the interaction's per-node maps (``linear_up``, the skip connection, ...) run on
  owned atoms; the rows its messages read at the senders are exchanged (one
  ``graph.exchange`` per interaction, the only tensor that crosses ranks);
* every edge's message is computed once, on the rank owning its receiver;
* the maps after the messages, products, readouts, E0, ZBL and scale_shift run per
  owned atom.
So forward work summed over ranks equals one rank's (tested by counted FLOPs).

Memory (``recompute``, ``chunk``): with recomputation, autograd keeps only the inputs
of each piece (per-node maps, a chunk of edges' messages, the product) and the
backward pass runs the piece again (``torch.utils.checkpoint``); the exchanges sit
between pieces, so a recompute never communicates. Edge chunking computes the messages
of a range of receivers at a time (edges sorted by receiver), so that with
recomputation the per-edge tensors of one chunk are all that is alive.
``cueq=1`` converts the model with mace's own ``convert_e3nn_cueq`` (cuEquivariance
kernels; needs ``cuequivariance-torch``, the ``mlipd[cueq]`` extra).

Multi-head models use the head that MACECalculator would pick (``default_head``).
A model file is code: it is a pickled ``torch.nn.Module`` and loading it runs
whatever it contains, so it must come from a trusted source.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
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

from mlipd.errors import ModelUnavailable  # noqa: E402
from mlipd.model_api import (  # noqa: E402
    LocalGraph,
    MemoryCost,
    ModelOutput,
    ModelSpec,
    species_index,
)
from mlipd.models.caches import MACE_OPTIONS  # noqa: E402
from mlipd.models.mace_interactions import SplitInteraction, check_supported  # noqa: E402
from mlipd.models.mace_memory import (  # noqa: E402
    Pieces,
    choose_chunk,
    chunk_bounds,
    should_recompute,
    stored_activation_bytes,
)
from mlipd.models.options import choice, flag, parse_options  # noqa: E402

log = logging.getLogger(__name__)
MEMORY_FLOATS_PER_NODE_DIM = 64  # memory budget: floats kept per node feature and layer
MEMORY_EDGE_FACTOR = 1.5  # memory budget: measured peak over the stored activations (float64)

SYNTAX = "mace:PATH" + MACE_OPTIONS
RECOMPUTE = ("auto", "0", "1")


def chunk_option(text: str) -> int | str:
    """``auto`` or a number of edges per chunk (0: no chunking)."""
    if text == "auto":
        return text
    value = int(text)
    if value < 0:
        raise ValueError("expected auto or a number of edges >= 0")
    return value


OPTION_KEYS = {"head": str, "recompute": choice(*RECOMPUTE), "chunk": chunk_option,
               "cueq": flag, "jit": flag}  # MaceModel's keyword arguments


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


def to_cueq(model: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Module:
    """The model with cuEquivariance kernels, by mace's own converter (a new module with
    the same weights), made on ``device``: fused convolutions there when it is a GPU."""
    if importlib.util.find_spec("cuequivariance_torch") is None:
        raise ModelUnavailable("mace: cueq=1 needs cuequivariance-torch "
                               "(pip install 'mlipd[cueq]')")
    from mace.cli.convert_e3nn_cueq import run

    prior = torch.get_default_dtype()  # the converter sets the process default dtype
    try:
        if device is None or device.type != "cuda":
            return run(model, device="cpu", return_model=True)
        # the converter fuses convolutions only for device == "cuda" (the string): make
        # "cuda" mean the device the model will run on (cuda:1 for a rank on cuda:1)
        with torch.cuda.device(device):
            return run(model, device="cuda", return_model=True)
    finally:
        torch.set_default_dtype(prior)


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


# stored over recomputed+chunked step memory, from the committed
# benchmarks/results/mace-cpu.md (1,000 atoms: 5.976 vs 2.338 MiB/atom of process peak,
# 2.56x; rounded down, so a budget held to the recomputed figure errs towards refusing)
RECOMPUTE_SAVING = 2.5

class MaceModel(torch.nn.Module):
    """A MACE or ScaleShiftMACE model as an mlipd model.

    ``MaceModel("model.model")`` or ``MaceModel("model.model,head=NAME,recompute=1")``
    loads a file (the CLI's ``mace:...``, see ``SYNTAX``); ``MaceModel(model=module)``
    wraps a module in memory (the same object, not a copy, unless ``cueq``).

    recompute: ``"1"`` keeps only each piece's inputs for backward and runs it again
        there; ``"0"`` stores activations; ``"auto"`` (default) recomputes when the
        estimated stored activations exceed half of the free memory (``mace_memory``)
    chunk: edges per chunk of messages (0: all at once); ``"auto"`` (default) chunks
        when recomputing, to a fixed budget of per-edge memory
    cueq: cuEquivariance kernels through mace's converter (GPU; untested here)
    jit: let TorchScript's profiling executor optimise e3nn's code as in mace's own
        calculator (see ``_torchscript``): ~10% faster steady state on CPU, but the first
        calls, and on CUDA new shapes, compile; needs ``recompute=0``

    ``counters`` describe the last forward; ``recomputed`` counts the pieces the
    backward passes ran again so far (``Pieces``).
    """

    def __init__(self, path: str | None = None, *, model: torch.nn.Module | None = None,
                 head: str | None = None, recompute: str = "auto", chunk: int | str = "auto",
                 cueq: bool = False, jit: bool = False) -> None:
        super().__init__()
        if path is not None:
            path, opts = parse_options(path, model="mace", syntax=SYNTAX, positional=True,
                                       keys=OPTION_KEYS)
            head = opts.get("head", head)
            recompute = opts.get("recompute", recompute)
            chunk = opts.get("chunk", chunk)
            cueq = opts.get("cueq", cueq)
            jit = opts.get("jit", jit)
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
        if recompute not in RECOMPUTE:
            raise ValueError(f"mace: recompute must be one of {RECOMPUTE}")
        if jit and recompute != "0":
            # measured: forces 1e-3 off when a recomputation meets the executor's freshly
            # optimised graphs (their saved tensors bypass the checkpoint's bookkeeping)
            raise ValueError("mace: jit=1 needs recompute=0 (TorchScript's optimised graphs "
                             "and recomputation in backward do not mix)")
        for block in model.interactions:
            check_supported(block)
        # cueq: converted where the model goes (``to``), on its own GPU; checked now
        self._cueq_pending = bool(cueq)
        if cueq and importlib.util.find_spec("cuequivariance_torch") is None:
            to_cueq(model)  # raises ModelUnavailable naming the extra
        self.mace = model
        self.recompute, self.chunk, self.jit = recompute, chunk, bool(jit)
        self.head = default_head(list(getattr(model, "heads", ["Default"])), head)
        zs = [int(z) for z in model.atomic_numbers.tolist()]
        self.register_buffer("z_index", species_index(zs), persistent=False)
        self.spec = ModelSpec(name="mace", cutoff=float(model.r_max), species=frozenset(zs),
                              n_layers=len(model.interactions), masked_edges=True)
        self.splits = [SplitInteraction(b) for b in model.interactions]
        self.pieces = Pieces(context=self._torchscript)
        self.counters: dict[str, int] = {}

    def memory_per_item(self, dtype: torch.dtype) -> MemoryCost:
        """Bytes per atom and edge of one step (``mlipd.model_api.MemoryCost``): the
        per-edge activations of ``mace_memory.stored_activation_bytes`` (divided by
        ``RECOMPUTE_SAVING`` when recomputing: ``recompute=1``, or ``auto`` when memory is
        short), and
        ``MEMORY_FLOATS_PER_NODE_DIM`` floats per node feature; the measurement is in
        docs/reliability.md."""
        per_edge = MEMORY_EDGE_FACTOR * stored_activation_bytes(self.mace, 1, dtype)
        itemsize = torch.finfo(dtype).bits // 8
        dims = sum(int(b.linear_up.irreps_out.dim) for b in self.mace.interactions)
        per_atom = itemsize * MEMORY_FLOATS_PER_NODE_DIM * dims
        recomputed = MemoryCost(per_atom=per_atom, per_edge=per_edge / RECOMPUTE_SAVING)
        if self.recompute == "1":
            return recomputed
        return MemoryCost(per_atom=per_atom, per_edge=per_edge,
                          recomputed=recomputed if self.recompute == "auto" else None)
    def to(self, *args, **kwargs):
        """``torch.nn.Module.to``; with cueq=1, the conversion first, on the target device
        (fused convolutions on a GPU) or on the CPU."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if self._cueq_pending and device is not None:
            self._convert(torch.device(device))
        return super().to(*args, **kwargs)

    def _convert(self, device: torch.device) -> None:
        self.mace = to_cueq(self.mace, device)
        self.splits = [SplitInteraction(b) for b in self.mace.interactions]
        self._cueq_pending = False

    @property
    def recomputed(self) -> int:
        """Pieces run again by backward passes since the last forward began."""
        return self.pieces.recomputed

    def forward(self, graph: LocalGraph) -> ModelOutput:
        if self._cueq_pending:  # never moved: converted where its buffers are
            self._convert(self.z_index.device)
        with self._torchscript():
            return self._forward(graph)

    def _torchscript(self):
        """e3nn runs MACE's linears, tensor products and harmonics as TorchScript. Its
        profiling executor optimises a function on its second call and again for new
        input shapes (on CUDA it compiles fused kernels for them): a graph whose edge count
        changes at every MD step pays that in its first calls (on a GPU it made mlipd's
        warm calls slower than its cold one, while MACECalculator, timed later on the same
        already-optimised modules, escaped it). Without the optimisation (default) every
        call runs the same plan, somewhat slower in steady state. Process-wide while a forward or a
        recomputation runs (torch has no per-function switch)."""
        return torch.jit.optimized_execution(self.jit)

    def _plan(self, graph: LocalGraph) -> _Plan:
        """What depends on the topology only, made at its first step and kept in
        ``graph.cache``: one-hot species, recomputation, the chunk plan (edges sorted by
        receiver, chunk bounds). A warm step then reads nothing back from the device."""
        plan = graph.cache.get("mace")
        if plan is not None and graph.edge_ids is None:
            return plan  # a selection of edges (no masks) changes at every step
        attrs = torch.nn.functional.one_hot(self.z_index[graph.numbers],
                                            len(self.spec.species)).to(graph.dtype)
        recompute = torch.is_grad_enabled() and should_recompute(
            self.recompute, self.mace, graph)
        chunk = choose_chunk(self.chunk, self.mace, recompute=recompute, dtype=graph.dtype,
                             device=graph.receivers.device)
        order = torch.argsort(graph.receivers, stable=True) if chunk > 0 else None
        receivers = graph.receivers if order is None else graph.receivers[order]
        plan = _Plan(attrs=attrs, recompute=recompute, chunk=chunk, order=order,
                     bounds=chunk_bounds(receivers, graph.n_owned, chunk))
        graph.cache["mace"] = plan
        return plan

    def _forward(self, graph: LocalGraph) -> ModelOutput:
        m, n = self.mace, graph.n_owned
        plan = self._plan(graph)
        attrs, recompute, chunk, bounds = plan.attrs, plan.recompute, plan.chunk, plan.bounds
        own = attrs[:n]
        heads = torch.full((n,), self.head, dtype=torch.long, device=attrs.device)
        rows = torch.arange(n, device=attrs.device)
        senders, receivers, vectors, mask = _edges(graph, plan.order)
        run = self.pieces.start(checkpoint=recompute)
        edge_index = torch.stack([senders, receivers])
        edge_attrs, edge_feats, cutoff, pair = run(_edge_basis, m, vectors, attrs, edge_index, n,
                                                   mask)

        node_e0 = m.atomic_energies_fn(own)[rows, heads]
        feats = run(m.node_embedding, own)
        energies = [node_e0, pair]
        last = len(self.splits) - 1
        for i, (split, product) in enumerate(zip(self.splits, m.products, strict=True)):
            payload, receiver, sc, residual = run(_node, split, feats, own)
            payload = graph.exchange(payload)  # the senders' rows, from their owners
            # the rest is per receiver: messages, the maps after them and the product of a
            # range of rows at a time (the product's per-atom intermediates are large too)
            feats = torch.cat([
                run(_rows, split, product, payload, receiver, edge_attrs[e0:e1],
                    edge_feats[e0:e1], None if cutoff is None else cutoff[e0:e1],
                    senders[e0:e1], receivers[e0:e1], r0, r1,
                    *(None if t is None else t[r0:r1] for t in (sc, residual)), own[r0:r1])
                for r0, r1, e0, e1 in bounds])
            if len(m.readouts) > 1 or i == last:  # one readout per layer, or one at the end
                readout = m.readouts[i if len(m.readouts) > 1 else 0]
                energies.append(run(_readout, readout, feats, heads, rows))
        self.counters = {"atoms": n, "candidate_edges": int(receivers.shape[0]),
                         "recompute": int(recompute), "chunk_edges": chunk,
                         "chunks": len(bounds), **self.pieces.counters()}
        inter = torch.stack(energies[1:]).sum(0)
        if hasattr(m, "scale_shift"):
            # ScaleShiftMACE scales the ZBL term too (models.py 575-577); MACE does not
            return ModelOutput(site_energy=node_e0 + m.scale_shift(inter, heads))
        return ModelOutput(site_energy=node_e0 + inter)


@dataclass(frozen=True)
class _Plan:
    """A topology's fixed choices (``MaceModel._plan``). attrs: (n_local, n_species)
    one-hot; order: (E,) edges by receiver, or None (no chunks); bounds: see
    ``chunk_bounds``."""

    attrs: torch.Tensor
    recompute: bool
    chunk: int
    order: torch.Tensor | None
    bounds: list[tuple[int, int, int, int]]


def _edges(graph: LocalGraph, order: torch.Tensor | None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Senders, receivers, MACE's edge vectors (E, 3) and the edge mask (E,) or None, in
    ``order`` (by receiver, for chunks) if given. MACE's vector points from the sender to
    the receiver (modules/utils.py get_edge_vectors_and_lengths): the opposite of
    graph.edge_vectors(), which matters for odd-l harmonics."""
    senders, receivers, vectors = graph.senders, graph.receivers, -graph.edge_vectors()
    mask = graph.edge_mask
    if order is not None:
        senders, receivers, vectors = senders[order], receivers[order], vectors[order]
        mask = None if mask is None else mask[order]
    return senders, receivers, vectors, mask


# a length where mace's ZBL term is exactly zero (its envelope's own cut-off, the sum of
# two covalent radii, is < 10 Å) and its polynomial stays finite in float32
_FAR = 1.0e3


def _edge_basis(m, vectors, attrs, edge_index, n_owned: int, mask):
    """Spherical harmonics, radial basis (and cutoff), and ZBL's site energies of the
    owned atoms (zeros without ZBL): (edge_attrs, edge_feats, cutoff or None, pair).
    ``mask`` (E,) bool or None: edges beyond the cutoff, whose message weights (the
    cutoff column) and ZBL terms are made exactly zero."""
    lengths = torch.linalg.norm(vectors, dim=-1, keepdim=True)
    edge_attrs = m.spherical_harmonics(vectors)
    edge_feats, cutoff = m.radial_embedding(lengths, attrs, edge_index, m.atomic_numbers)
    if mask is not None:
        keep = mask.unsqueeze(-1)
        weight = keep.to(lengths.dtype)
        cutoff = weight if cutoff is None else cutoff * weight
        lengths = torch.where(keep, lengths, torch.full_like(lengths, _FAR))
    if hasattr(m, "pair_repulsion"):
        # ZBL scatters into receivers, which are owned: the halo rows stay zero
        pair = m.pair_repulsion_fn(lengths, attrs, edge_index, m.atomic_numbers)[:n_owned]
    else:
        pair = attrs.new_zeros(n_owned)
    return edge_attrs, edge_feats, cutoff, pair


def _node(split: SplitInteraction, feats, attrs):
    out = split.node(feats, attrs)
    return out.payload, out.receiver, out.sc, out.residual


def _rows(split: SplitInteraction, product, payload, receiver, edge_attrs, edge_feats, cutoff,
          senders, receivers, first: int, end: int, sc, residual, attrs):
    """Rows ``first .. end - 1`` of an interaction and its product, from their edges."""
    message, density = split.edges(payload, receiver, edge_attrs, edge_feats, cutoff, senders,
                                   receivers, first, end - first)
    feats, sc = split.finish(message, density, sc, residual, attrs)
    return _product(product, feats, sc, attrs)


def _readout(readout, feats, heads, rows):
    return readout(feats, heads)[rows, heads]


def _product(product: torch.nn.Module, feats: torch.Tensor, sc: torch.Tensor | None,
             attrs: torch.Tensor) -> torch.Tensor:
    """``product(feats, sc, attrs)``, also for a rank that owns no atoms: mace's symmetric
    contraction cannot reshape 0 rows (symmetric_contraction.py 258), yet that rank must
    keep its later exchanges in the autograd graph, since their backward is collective."""
    if feats.shape[0] > 0:
        return product(node_feats=feats, sc=sc, node_attrs=attrs)
    return feats.new_zeros((0, product.linear.irreps_out.dim)) + 0.0 * feats.sum()
