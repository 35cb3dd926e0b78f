"""The work each rank does in a step, measured rather than derived.

Every aten op that the model's forward and the step's backward (forces, virial, and any
piece the backward recomputes) run is counted, per op name, by

* **elements**: what it reads and writes, every tensor input and output, any dtype;
  a gather (``index``, ``index_select``, ``embedding``, ``gather``, ...) reads only the
  rows it takes (its output) and a scatter (``index_add``, ``index_put``,
  ``scatter_add``, ``scatter_reduce``, ...) touches only the rows it adds (its source,
  the last tensor argument) and reads its indices, not the whole tensor they index;
  the backward of a view (``slice_backward``...) touches the gradient's elements, not
  the zeros around them;
* **FLOPs** of matrix ops (torch's ``flop_registry``: mm, bmm, addmm, baddbmm,
  convolutions, attention; an einsum arrives as these), and of matrix-vector and
  vector products (mv, addmv, dot: what a one-row matmul can become).

Not counted: views (no data produced; ``_unsafe_view`` too, a view autograd does not
track as one) and pure creation (``empty``, ``zeros``, ``full``,
``arange``, ``fill_``, ``zero_``...: nothing computed from data); the exchanges' own
buffers (``mlipd.engine.halo``: counted as the rows they move, ``Comm.traffic``); the
engine's own code before the model (gathering local positions) and after the backward
(the virial product, sending halo gradients home, packing). Invisible to the counter,
because they are not aten ops on tensors: custom kernels that bypass the dispatcher
(cuEquivariance's CUDA kernels, Triton kernels, ``torch.ops`` of a C++ extension
register as ops and ARE seen, but without FLOPs), NumPy and other host code a model
runs, native neighbour lists (vesin, matscipy, the packages' own graph builders in C),
and Python work. These are listed in ``UNSEEN``.

Zero redundancy means the work summed over ranks equals P = 1's, op by op
(``mlipd.testing.check_zero_redundancy``): any node or edge work on halo rows, or an edge
computed on two ranks, in the forward or the backward, shows up as extra work.

``measure_runs(factory, structures, [(1, torch.float64), (4, torch.float64)])`` runs the
engine's own step (``Coordinator`` on rank 0, ``RankLoop`` on every rank, skin 0) on
real gloo ranks; ``factory`` must be picklable (a class, a module-level function or a
``functools.partial`` of one). Rank 0's weights are copied to every rank, as the
engine does.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from mlipd.engine.step import Step
from mlipd.model_api import Model
from mlipd.types import Result, Structure

UNSEEN = ("custom kernels outside the aten dispatcher (cuEquivariance CUDA kernels, Triton)",
          "FLOPs of registered custom ops (counted as elements only)",
          "NumPy and other host code in a model", "native neighbour lists (vesin, matscipy)",
          "Python work")

_NO_WORK = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros",
    "zeros_like", "new_zeros", "ones", "ones_like", "new_ones", "full", "full_like",
    "new_full", "fill", "fill_", "zero_", "scalar_tensor", "arange", "linspace", "eye",
    "lift_fresh", "lift_fresh_copy", "alias", "detach", "set_", "resize_",
    "_unsafe_view"})  # the last: a view (reshape's result) autograd does not track as one
_GATHERS = frozenset({"index", "index_select", "embedding", "gather", "take",
                      "masked_select", "_unsafe_index"})
_SCATTERS = frozenset({"index_add", "index_add_", "index_put", "index_put_", "_index_put_impl_",
                       "scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce",
                       "scatter_reduce_", "index_copy", "index_copy_", "index_reduce",
                       "index_reduce_", "index_fill", "index_fill_", "masked_scatter",
                       "masked_scatter_", "_index_put_impl"})

# products torch's flop_registry leaves out (what a one-row matmul can become)
_VECTOR_PRODUCTS = frozenset({"mv", "addmv", "dot", "vdot"})
# the backward of a view: a zero tensor of the viewed one's shape (creation) with the
# gradient written into the view, so it touches the gradient's elements only
_VIEW_BACKWARDS = frozenset({"slice_backward", "select_backward", "diagonal_backward",
                             "unfold_backward", "as_strided_backward"})

Tally = dict[str, tuple[int, int]]  # op name -> (elements, FLOPs)


def _tensors(tree) -> list[torch.Tensor]:
    """The tensors of an op's arguments or output; 0-d tensors (scalars: a constant, a
    loss's seed) are not data rows and are left out."""
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor) and t.dim() > 0]


def op_work(func, args, kwargs, out) -> tuple[int, int]:
    """(elements read and written, FLOPs) of one aten op call (module doc)."""
    name = func.overloadpacket.__name__
    ins, outs = _tensors((args, kwargs)), _tensors(out)
    flops = 0
    if func.overloadpacket in flop_registry:
        flops = int(flop_registry[func.overloadpacket](*args, **(kwargs or {}), out_val=out))
    elif name in _VECTOR_PRODUCTS:  # matmul with a 1-d operand: 2 x matrix (or vector)
        flops = 2 * max(t.numel() for t in _tensors(args))
    if name in _GATHERS:
        rows = sum(t.numel() for t in outs)
        index = sum(t.numel() for t in ins[1:] if not t.is_floating_point())
        return 2 * rows + index, flops
    if name in _VIEW_BACKWARDS:  # zeros (creation) with the gradient's rows written in
        return 2 * ins[0].numel(), flops
    if name in _SCATTERS:  # (self, [dim,] index(es), source): the source's rows are read
        # and written, the indices read; without a source tensor (a fill), the indexed
        # elements are written
        *index, source = ins[1:] if len(ins) > 2 else (*ins[1:], None)
        written = source.numel() if source is not None else sum(t.numel() for t in index)
        return 2 * written + sum(t.numel() for t in index), flops
    return sum(t.numel() for t in ins) + sum(t.numel() for t in outs), flops


class WorkCounter(TorchDispatchMode):
    """Counts ``op_work`` per op name into ``ops`` while ``counting`` is true."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.counting = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.counting and not func.is_view:
            name = func.overloadpacket.__name__
            if name not in _NO_WORK:
                elements, flops = op_work(func, args, kwargs, out)
                tally = self.ops[name]
                tally[0] += elements
                tally[1] += flops
        return out

    @contextlib.contextmanager
    def set_counting(self, on: bool) -> Iterator[None]:
        before, self.counting = self.counting, on
        try:
            yield
        finally:
            self.counting = before

    def tally(self) -> Tally:
        return {k: (v[0], v[1]) for k, v in sorted(self.ops.items()) if v[0] or v[1]}


@dataclass(frozen=True)
class Work:
    """One rank's step.

    ops:            per aten op name, (elements read and written, FLOPs) (module doc)
    rows_sent, rows_received, exchanges: every exchange on the rank's communicator in
                    the model's forward
    step_traffic:   (rows sent, rows received, exchanges) of the whole step: forward,
                    backward (gradients of exchanged rows, the positions' halo
                    gradients sent home) and any recomputation
    atom_rows_sent, atom_rows_received, atom_exchanges: those of the forward's
                    ``graph.exchange`` calls (at one rank: its calls, no rows)
    owned, edges, halo: the local graph's owned atoms, edges, halo atoms
    recomputed:     the model's ``recomputed`` counter after the step, where it keeps one
    cutoff, layers: the model's spec (cutoff in Å, message-passing layers)
    info:           a copy of the model's ``counters`` dict after the step, if it has one
    """

    ops: Tally
    rows_sent: int
    rows_received: int
    exchanges: int
    atom_rows_sent: int
    atom_rows_received: int
    atom_exchanges: int
    owned: int
    edges: int
    halo: int
    step_traffic: tuple[int, int, int] = (0, 0, 0)
    cutoff: float = 0.0
    layers: int = 1
    recomputed: int | None = None
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def flops(self) -> int:
        return sum(f for _, f in self.ops.values())

    @property
    def elements(self) -> int:
        return sum(e for e, _ in self.ops.values())


class _Exchanges:
    """The communication primitives swapped for ones that pause the counter (their
    buffers and plans are data movement, counted as rows): the halo module's functions
    (the module-level names the engine looks up at call time) and every method of
    ``Comm`` a model may call (plans from keys, exchanges, sums over ranks)."""

    NAMES = (*(("mlipd.engine.halo", name) for name in (
        "exchange_rows", "scatter_home_rows", "all_reduce", "extend_rows", "home_grads",
        "sum_home_rows", "sum_home_grads")), ("mlipd.engine.step", "scatter_home_rows"))
    COMM = ("plan_from_keys", "exchange", "scatter_home", "extend", "sum_home",
            "all_reduce_sum")

    def __init__(self, counter: WorkCounter) -> None:
        import importlib

        from mlipd.engine.comm import Comm

        self.saved = []
        for module, name in self.NAMES:
            mod = importlib.import_module(module)
            self.saved.append((mod, name, getattr(mod, name)))
        for name in self.COMM:
            if hasattr(Comm, name):
                self.saved.append((Comm, name, getattr(Comm, name)))
        for owner, name, fn in self.saved:
            setattr(owner, name, self._paused(counter, fn))

    @staticmethod
    def _paused(counter: WorkCounter, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            with counter.set_counting(False):
                return fn(*args, **kwargs)
        return call

    def restore(self) -> None:
        for mod, name, fn in self.saved:
            setattr(mod, name, fn)


class _NoHalo(torch.autograd.Function):
    """At one rank ``graph.exchange`` is the identity; the counter gives it the shape of
    the ranks' exchange, ``cat([owned, Exchange(owned)])`` with no halo rows, so that
    autograd sums the owned rows' gradients the same way at every P."""

    @staticmethod
    def forward(ctx, owned: torch.Tensor) -> torch.Tensor:
        ctx.shape = owned.shape
        return owned.new_empty((0, *owned.shape[1:]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.new_zeros(ctx.shape)


class CountingStep(Step):
    """``Step`` whose every ``run`` is measured into ``works`` (a ``Work`` per run)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.works: list[Work] = []
        self.outputs: list = []  # the RankOutput of every run
        self.ids: list = []  # the owned atoms' global ids of every run

    def run(self, positions, cells, *, virial):
        counter = WorkCounter()
        traffic = None if self.comm is None else self.comm.traffic
        snapshot = (lambda: (0, 0, 0)) if traffic is None else traffic.snapshot
        atoms = [0, 0, 0]  # graph.exchange: rows sent, received, calls
        model, grad = self.model, torch.autograd.grad

        def exchange_of(graph):
            def exchange(feats):  # the exchange's own copies are data movement
                before = snapshot()
                with counter.set_counting(False):
                    out = (graph.exchange(feats) if graph.comm is not None
                           else torch.cat([feats, _NoHalo.apply(feats)]))
                moved = [a - b for a, b in zip(snapshot(), before, strict=True)]
                moved[2] = 1
                for k in range(3):
                    atoms[k] += moved[k]
                return out
            return exchange

        forward_traffic = []

        def forward(graph):
            start = snapshot()
            with counter.set_counting(True):
                out = model(dataclasses.replace(graph, exchange=exchange_of(graph)))
            forward_traffic.extend(a - b for a, b in zip(snapshot(), start, strict=True))
            return out

        def counted_grad(*args, **kwargs):
            with counter.set_counting(True):
                return grad(*args, **kwargs)

        before = snapshot()
        swapped = _Exchanges(counter)
        self.model = forward
        torch.autograd.grad = counted_grad
        try:
            with counter, counter.set_counting(False):
                out = super().run(positions, cells, virial=virial)
        finally:
            torch.autograd.grad = grad
            self.model = model
            swapped.restore()
        step_traffic = tuple(a - b for a, b in zip(snapshot(), before, strict=True))
        sent, received, exchanges = forward_traffic
        g = self.last_graph
        self.works.append(Work(
            ops=counter.tally(), rows_sent=sent, rows_received=received, exchanges=exchanges,
            step_traffic=step_traffic, cutoff=float(self.cutoff),
            layers=int(getattr(model.spec, "n_layers", 1) or 1),
            atom_rows_sent=atoms[0], atom_rows_received=atoms[1], atom_exchanges=atoms[2],
            owned=g.n_owned, edges=int(out.stats[1]), halo=g.n_local - g.n_owned,
            recomputed=getattr(model, "recomputed", None),
            info=dict(getattr(model, "counters", {}))))
        self.outputs.append(out)
        self.ids.append(g.global_ids[: g.n_owned].cpu().numpy())
        return out


@dataclass(frozen=True)
class Measured:
    """One structure's step: the assembled ``result`` (energy, forces, virial when
    periodic, extras), the ``work`` of each rank, and each rank's output
    (``mlipd.engine.results.RankOutput``, on the CPU) with its owned atoms' ids."""

    result: Result
    work: list[Work]
    outputs: list
    ids: list


Run = tuple  # (ranks, dtype) or (ranks, dtype, factory): a factory other than the default


def measure_runs(factory: Callable[[], Model], structures: Sequence[Structure],
                 runs: Sequence[Run], *, method: str = "rcb",
                 timeout_s: float = 900.0, threads: int = 1) -> dict[Run, list[Measured]]:
    """For each run (P, dtype[, factory]), per structure (each partitioned alone over P
    ranks): the engine's step (skin 0, on the CPU) and its measured work.

    One spawn of max(P) real gloo processes serves every run (P > 1 on a process
    subgroup of the first P ranks, P = 1 on rank 0 without a communicator), so
    importing the model's package is paid once per process, not once per P.
    ``threads``: torch's intra-op threads on each rank (float32 sums follow them)."""
    structures = [s if isinstance(s, Structure) else Structure.from_atoms(s)
                  for s in structures]
    runs = [tuple(r) for r in runs]
    world = max(r[0] for r in runs)
    if world == 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            per_rank = [_runs_on_rank(0, 1, factory, structures, runs, method)]
        finally:
            torch.set_num_threads(before)
    else:
        from mlipd.testing.ranks import run_on_ranks

        per_rank = run_on_ranks(_runs_on_rank, world, factory, structures, runs, method,
                                timeout_s=timeout_s, threads=threads)
    out: dict[Run, list[Measured]] = {}
    for j, run in enumerate(runs):
        p = run[0]
        results = per_rank[0][j][0]
        out[run] = [Measured(result=results[k],
                             work=[per_rank[r][j][1][k] for r in range(p)],
                             outputs=[per_rank[r][j][2][k] for r in range(p)],
                             ids=[per_rank[r][j][3][k] for r in range(p)])
                    for k in range(len(structures))]
    return out


def measure(factory: Callable[[], Model], structures: Sequence[Structure], ranks: int, *,
            method: str = "rcb", dtype: torch.dtype = torch.float64,
            timeout_s: float = 900.0) -> list[Measured]:
    """``measure_runs`` of one run."""
    return measure_runs(factory, structures, [(ranks, dtype)], method=method,
                        timeout_s=timeout_s)[(ranks, dtype)]


def _runs_on_rank(rank: int, world_size: int, factory: Callable[[], Model],
                  structures: list[Structure], runs: list[Run], method: str) -> list:
    """Per run: (rank 0's Results or None, this rank's Works, RankOutputs, owned ids),
    or None where the run has fewer ranks. Every rank takes part in every subgroup's
    creation and weight broadcast (collectives)."""
    import torch.distributed as dist

    from mlipd.engine.comm import Comm
    from mlipd.engine.ranks import sync_weights
    from mlipd.engine.single_rank import for_inference

    cpu = torch.device("cpu")
    models: dict = {}
    out: list = []
    for run in runs:
        p, dtype = run[0], run[1]
        make = run[2] if len(run) > 2 else factory
        group = dist.new_group(list(range(p))) if world_size > 1 and p > 1 else None
        key = (make, dtype)
        if key not in models:  # one model per (factory, dtype), rank 0's weights everywhere
            models[key] = for_inference(make(), cpu, dtype)
            if world_size > 1:
                sync_weights(models[key])
        if rank >= p:
            out.append(None)
            continue
        comm = Comm(group=group) if p > 1 else None
        out.append(run_steps(models[key], comm, structures, method=method, dtype=dtype))
    return out


def run_steps(model: Model, comm, structures: Sequence[Structure], *, method: str = "rcb",
              dtype: torch.dtype = torch.float64) -> tuple:
    """The engine's own step on this rank for each structure alone (``Coordinator`` on
    rank 0, ``RankLoop.follow`` on the others; skin 0, CPU), measured: (rank 0's Results
    (None elsewhere), this rank's ``Work`` per structure, its ``RankOutput`` per
    structure (CPU), its owned atoms' global ids per structure). The one place tests
    and the work counter run a step on ranks."""
    from mlipd.engine.coordinator import Coordinator
    from mlipd.engine.rank_loop import RankLoop

    step = CountingStep(model, comm, device=torch.device("cpu"), dtype=dtype, skin=0.0)
    loop = RankLoop(step)
    results = None
    if step.rank == 0:
        coordinator = Coordinator(loop, skin=0.0, partition=method)
        try:
            results = [coordinator.compute([s], virial=bool(s.pbc.all()))[0]
                       for s in structures]
        finally:
            coordinator.stop()
    else:
        loop.follow()
    outputs = [dataclasses.replace(
        o, energies=o.energies.cpu(), forces=o.forces.cpu(),
        virials=None if o.virials is None else o.virials.cpu(),
        extras=tuple(t.cpu() for t in o.extras)) for o in step.outputs]
    return results, step.works, outputs, step.ids
