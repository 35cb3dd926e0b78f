"""Count the data-dependent host reads of a piece of torch code, on any device.

A host read is an op whose result (or whose output *shape*) the host must learn from
the device before it can go on: on CUDA each one drains the stream's queue and rules
out capturing a CUDA graph. ``torch.cuda.set_sync_debug_mode`` reports them on a GPU
only; this counter finds the same ops on a CPU, so a test can hold a warm step to zero.

    with HostReads() as reads:
        step.run(positions, cells, virial=True)
    reads.total            # 0 for a warm step
    reads.counts           # Counter({"nonzero": 2, "index[bool mask]": 4, ...})
    reads.where            # op -> the innermost mlipd frame ("file.py:123") of each read

What counts (the ops that call ``c10::cuda::warn_or_error_on_sync`` in torch's CUDA code,
or that reach the host's copy of device memory):
- output shape from data: ``nonzero`` (also ``argwhere`` and ``torch.where(cond)``),
  indexing or ``index_put_`` with a boolean mask, ``masked_select``, ``unique*``,
  ``repeat_interleave`` without ``output_size``, ``bincount`` (its length is ``max + 1``),
  ``histc`` without bounds;
- a value on the host: ``item`` / ``_local_scalar_dense`` (``int(t)``, ``float(t)``,
  ``bool(t)``, ``if t.any():``), ``equal``, ``is_nonzero``, linalg's error checks;
- a copy to the host of a device tensor (``.cpu()``, ``.tolist()``, ``.numpy()``); on a CPU
  run ``tolist`` and ``numpy`` of a tensor are counted too (there, they never dispatch).
Not counted: the range checks ``one_hot`` makes on a CPU when given ``num_classes``
(two ``item`` reads there; on CUDA it checks on the device and reads nothing).
A TorchDispatchMode sees every aten op (also inside autograd's backward); a
TorchFunctionMode sees the Python conversions that do not dispatch on a CPU.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# op packet -> the name a report gives it
_ALWAYS = {
    aten.nonzero: "nonzero",
    aten.nonzero_numpy: "nonzero",
    aten.argwhere: "nonzero",
    aten.masked_select: "masked_select",
    aten._unique: "unique",
    aten._unique2: "unique",
    aten.unique_dim: "unique",
    aten.unique_consecutive: "unique",
    aten.unique_dim_consecutive: "unique",
    aten._local_scalar_dense: "item",
    aten.is_nonzero: "item",
    aten.equal: "equal",
    aten.bincount: "bincount",
    aten._linalg_check_errors: "linalg error check",
}
_PYTHON_READS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy"}


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _classify(func, args, kwargs) -> str | None:
    """The report name of a host-reading call of aten op ``func``, else None."""
    packet = func.overloadpacket
    name = _ALWAYS.get(packet)
    if name is not None:
        return name
    if packet in (aten.index, aten._unsafe_index):
        return "index[bool mask]" if any(_is_mask(i) for i in (args[1] or ())) else None
    if packet in (aten.index_put, aten.index_put_, aten._index_put_impl_):
        return "index_put[bool mask]" if any(_is_mask(i) for i in (args[1] or ())) else None
    if packet is aten.repeat_interleave:
        if func is aten.repeat_interleave.self_int:
            return None
        if kwargs.get("output_size") is None:
            return "repeat_interleave without output_size"
        return None
    if packet is aten.histc:
        lo = args[3] if len(args) > 3 else kwargs.get("min", 0)
        hi = args[4] if len(args) > 4 else kwargs.get("max", 0)
        return "histc without bounds" if lo == hi else None
    if packet is aten._to_copy:
        src, dst = args[0], kwargs.get("device")
    elif packet is aten.copy_:
        src, dst = args[1], args[0].device
    else:
        return None
    if (isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None
            and torch.device(dst).type == "cpu"):
        return "copy to host"
    return None


def _caller() -> str:
    """The innermost frame of mlipd (outside this module) that led to the op."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "mlipd" in path and not path.endswith("hostreads.py"):
            tail = path[path.rfind("mlipd"):]
            return f"{tail}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class HostReads:
    """A context manager counting host reads (see the module doc) while it is entered.

    counts: Counter of report names; where: name -> Counter of call sites; total.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.where: dict[str, Counter[str]] = defaultdict(Counter)
        self._quiet = 0  # > 0 inside a call whose CPU-only reads a GPU does not make
        self._dispatch = _DispatchCounter(self)
        self._function = _FunctionCounter(self)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, name: str) -> None:
        if self._quiet:
            return
        self.counts[name] += 1
        self.where[name][_caller()] += 1

    def report(self) -> str:
        """One line per op: ``name xN (site, site)``; ``none`` when nothing was read."""
        if not self.counts:
            return "none"
        return "; ".join(f"{k} x{v} ({', '.join(sorted(self.where[k]))})"
                         for k, v in sorted(self.counts.items()))

    def __enter__(self) -> HostReads:
        self._function.__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._dispatch.__exit__(*exc)
        self._function.__exit__(*exc)


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, owner: HostReads) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _classify(func, args, kwargs)
        if name is not None:
            self.owner.add(name)
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, owner: HostReads) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.one_hot and _num_classes(args, kwargs) >= 0:
            self.owner._quiet += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.owner._quiet -= 1
        name = _PYTHON_READS.get(func)
        if name is not None and args and isinstance(args[0], torch.Tensor) \
                and args[0].device.type == "cpu":
            self.owner.add(name)
        return func(*args, **kwargs)


def _num_classes(args, kwargs) -> int:
    return int(args[1] if len(args) > 1 else kwargs.get("num_classes", -1))


def warm_step_reads(factory, structure, ranks: int = 1, *, skin: float = 0.5,
                    dtype: torch.dtype = torch.float64, move: float = 0.05,
                    seed: int = 0, timeout_s: float = 300.0) -> list[HostReads]:
    """Per rank, the host reads of one warm step of ``factory()``'s model on
    ``structure`` (a ``mlipd.types.Structure``): rebuild, one cold step, then every atom
    moved by up to ``move`` Å (< skin / 2, so the lists are reused) and the warm step
    counted from positions on the device to the packed output (``Step.run``). At
    ``ranks`` > 1 on real gloo ranks (``run_on_ranks``); ``factory`` must be importable
    by name there."""
    if not 0 <= move < skin / 2:
        raise ValueError(f"move {move} Å must stay below skin / 2 = {skin / 2} Å")
    if ranks == 1:
        return [_warm_reads_on_rank(0, 1, factory, structure, skin, dtype, move, seed)]
    from mlipd.testing.ranks import run_on_ranks

    return run_on_ranks(_warm_reads_on_rank, ranks, factory, structure, skin, dtype, move,
                        seed, timeout_s=timeout_s)


def _warm_reads_on_rank(rank: int, world_size: int, factory, structure, skin: float,
                        dtype: torch.dtype, move: float, seed: int) -> HostReads:
    import numpy as np

    from mlipd.engine.comm import Comm
    from mlipd.engine.partition import Geometry, partition_batch
    from mlipd.engine.single_rank import for_inference
    from mlipd.engine.step import Frame, Step

    cpu = torch.device("cpu")
    model = for_inference(factory(), cpu, dtype)
    comm = None
    if world_size > 1:
        from mlipd.engine.ranks import sync_weights

        sync_weights(model)
        comm = Comm()
    s = structure
    # masks=True: the fixed-shape step a GPU runs (on a CPU the engine selects its edges)
    step = Step(model, comm, device=cpu, dtype=dtype, skin=skin, masks=True)
    owner = partition_batch([Geometry(s.positions, s.cell, s.pbc)], world_size,
                            radius=step.radius)
    step.rebuild(Frame(numbers=s.numbers, positions=s.positions, cells=s.cell[None],
                       pbc=s.pbc[None], offsets=np.array([0, s.n_atoms]), owner=owner))
    virial = bool(s.pbc.all())
    cell = torch.as_tensor(s.cell[None])
    step.run(torch.as_tensor(s.positions), cell, virial=virial)  # cold: builds caches
    rng = np.random.default_rng(seed)  # the same moves on every rank
    moved = s.positions + rng.uniform(-1.0, 1.0, s.positions.shape) * move / np.sqrt(3)
    reads = HostReads()
    with reads:
        step.run(torch.as_tensor(moved), cell, virial=virial)
    reads._dispatch = reads._function = None  # modes do not pickle
    return reads
