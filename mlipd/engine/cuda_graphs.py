"""The warm one-rank step captured as a CUDA graph and replayed (``cuda_graphs`` option).

A small system's MD step on a GPU is launch-bound: hundreds of small kernels, each
queued by Python. Captured once, the step replays as one launch. What makes it
capturable: a warm step makes no host read (``mlipd.testing.HostReads``) and its shapes
depend on the topology only; with ``Step(pad=True)`` they depend only on the buckets the
atom and edge counts fall in (``mlipd.engine.padding``).

Per topology: the step right after a rebuild runs eagerly (the model derives its
per-topology structures then, ``LocalGraph.cache``); the next one either adopts a graph
captured for an earlier topology whose tensors have the same shapes and whose other
values are equal (the new topology's tensors are copied into that graph's, in place:
a rebuild that moved counts within their buckets costs no capture) or captures a new
graph. Inputs are copied into the graph's static buffers, the output is read from its
static output. A failed capture logs one line and the step stays eager from then on.

Modes: ``0`` never; ``1`` on CUDA (on a CPU: a log line, eager); ``auto`` on CUDA when
the model declares ``masked_edges`` (fixed shapes between rebuilds).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from mlipd.engine.results import RankOutput
from mlipd.engine.step import Step
from mlipd.engine.topology import GEOMETRY_DTYPE
from mlipd.errors import SetupError

log = logging.getLogger(__name__)

MODES = ("auto", "0", "1")
MAX_GRAPHS = 8  # captured graphs kept (each holds its own memory pool's buffers)
WARMUP = 2  # eager runs on a side stream before a capture (cuBLAS/cuDNN handles, caches)
# Topology fields that may differ between topologies sharing a graph: the batch's
# own atom count is used outside the graph only (``Step.unpad``)
_FREE_FIELDS = frozenset({"n_real"})


def check_mode(mode: str) -> str:
    mode = str(mode)
    if mode not in MODES:
        raise SetupError(f"cuda_graphs={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def enabled(mode: str, device: torch.device, model) -> bool:
    """Whether ``mode`` captures graphs for ``model`` on ``device``."""
    mode = check_mode(mode)
    if mode == "0":
        return False
    if device.type != "cuda":
        if mode == "1":
            log.warning("cuda_graphs=1 on %s: CUDA graphs need a GPU; running eagerly", device)
        return False
    masked = bool(getattr(model.spec, "masked_edges", False))
    if mode == "1" and not masked:
        log.warning("cuda_graphs=1: model %r selects its edges (no masked_edges): its "
                    "shapes change between rebuilds; capturing per topology anyway",
                    model.spec.name)
    return mode == "1" or masked


def leaves(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(path, leaf) of every tensor and plain value in ``obj``: dataclasses, dicts,
    lists and tuples are walked; anything else is a leaf."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, int | float | bool | str):
        return [(prefix, obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = []
        for f in dataclasses.fields(obj):
            out += leaves(getattr(obj, f.name), f"{prefix}.{f.name}")
        return out
    if isinstance(obj, dict):
        out = []
        for k in sorted(obj, key=str):
            out += leaves(obj[k], f"{prefix}[{k!r}]")
        return out
    if isinstance(obj, list | tuple):
        out = []
        for i, v in enumerate(obj):
            out += leaves(v, f"{prefix}[{i}]")
        return out
    return [(prefix, obj)]


def _signature(items: list[tuple[str, Any]]) -> list[tuple]:
    sig = []
    for path, v in items:
        if path.rsplit(".", 1)[-1] in _FREE_FIELDS:
            continue
        if isinstance(v, torch.Tensor):
            sig.append((path, "tensor", tuple(v.shape), v.dtype, v.device))
        elif v is None or isinstance(v, int | float | bool | str):
            sig.append((path, "value", v))
        else:
            sig.append((path, "object", id(v)))
    return sig


def same_layout(a: Any, b: Any) -> bool:
    """Whether ``b``'s tensors can be copied into ``a``'s: the same structure, tensor
    shapes, dtypes and devices, and equal plain values."""
    return _signature(leaves(a)) == _signature(leaves(b))


def copy_into(dst: Any, src: Any) -> None:
    """Every tensor of ``src`` copied into ``dst``'s, in place (``same_layout``)."""
    for (_, d), (_, s) in zip(leaves(dst), leaves(src), strict=True):
        if isinstance(d, torch.Tensor) and d is not s:
            d.copy_(s)


@dataclasses.dataclass
class Captured:
    """One captured graph: its topology (whose tensors it reads), static inputs
    (padded positions, cells), static output, and the ``virial`` flag it was made for."""

    graph: Any
    topology: Any
    positions: torch.Tensor
    cells: torch.Tensor
    output: RankOutput | None  # None until captured
    virial: bool
    layout: tuple


class GraphedRun:
    """``Step.run`` with CUDA graphs (see the module doc); call it as ``step.run`` plus
    ``rebuilt`` (this step follows a rebuild)."""

    def __init__(self, step: Step) -> None:
        self.step = step
        self.graphs: list[Captured] = []
        self.current: Captured | None = None
        self.failed = False
        self.captures = self.adoptions = self.replays = 0

    def __call__(self, positions: torch.Tensor, cells: torch.Tensor, *, virial: bool,
                 rebuilt: bool) -> RankOutput:
        step = self.step
        if rebuilt:
            self.current = None
        if self.failed or rebuilt or step.topology is None:
            return step.run(positions, cells, virial=virial)
        cap = self.current
        if cap is None or cap.virial != virial or cap.cells.shape != cells.shape:
            cap = self.current = self._adopt(virial, cells) or self._capture(
                positions, cells, virial)
            if cap is None:
                return step.run(positions, cells, virial=virial)
        n = positions.shape[0]
        cap.positions[:n].copy_(positions)
        cap.cells.copy_(cells)
        cap.graph.replay()
        self.replays += 1
        step.layout = cap.layout
        return step.unpad(cap.output)

    def _adopt(self, virial: bool, cells: torch.Tensor) -> Captured | None:
        """A graph captured for another topology with this one's layout, now reading this
        topology's values (copied into its tensors)."""
        topo = self.step.topology
        for cap in self.graphs:
            if cap.virial == virial and cap.cells.shape == cells.shape \
                    and same_layout(cap.topology, topo):
                copy_into(cap.topology, topo)
                cap.topology.n_real = topo.n_real
                self._fill_padding(cap)
                self.step.topology = cap.topology
                self.adoptions += 1
                return cap
        return None

    def _fill_padding(self, cap: Captured) -> None:
        topo = cap.topology
        if topo.pad_positions is not None:
            cap.positions[topo.n_real:].copy_(topo.pad_positions)

    def _capture(self, positions: torch.Tensor, cells: torch.Tensor,
                 virial: bool) -> Captured | None:
        step, topo = self.step, self.step.topology
        static_x = torch.empty((topo.n_owned if topo.local_ids is None else positions.shape[0],
                                3), dtype=GEOMETRY_DTYPE, device=step.device)
        static_x[: positions.shape[0]].copy_(positions)
        static_cells = cells.detach().clone()
        try:
            cap = Captured(graph=None, topology=topo, positions=static_x, cells=static_cells,
                           output=None, virial=virial, layout=())
            self._fill_padding(cap)
            side = torch.cuda.Stream(device=step.device)
            side.wait_stream(torch.cuda.current_stream(step.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP):
                    step.run_padded(static_x, static_cells, virial=virial)
            torch.cuda.current_stream(step.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = step.run_padded(static_x, static_cells, virial=virial)
        except Exception as e:  # noqa: BLE001 - any capture failure: log it and run eagerly
            log.warning("cuda_graphs: capture failed (%s: %s); running eagerly from now on",
                        type(e).__name__, e)
            self.failed = True
            return None
        cap.graph, cap.output, cap.layout = graph, output, step.layout
        self.graphs.append(cap)
        if len(self.graphs) > MAX_GRAPHS:
            self.graphs.pop(0)
        self.captures += 1
        log.info("cuda_graphs: captured the step of %d atoms, %d candidate edges (%d graphs)",
                 topo.n_owned, topo.n_edges, len(self.graphs))
        return cap
