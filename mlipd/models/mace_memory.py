"""MACE's memory options: recomputation of activations in the backward pass, edge
chunks, and the estimate that ``recompute=auto`` decides on.

A forward is a sequence of *pieces* (the edge basis, each interaction's per-node maps,
each chunk of its messages, its finish and product, each readout) with the halo
exchanges between them. ``Pieces`` runs each one either plainly (autograd stores its
activations) or under ``torch.utils.checkpoint`` (autograd stores its inputs; backward
runs it again), and counts how often each body really ran, so a test can tell that
recomputation happened rather than trust a flag.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint

from mlipd.memory import available_bytes
from mlipd.model_api import LocalGraph

# GPU, recomputing: the per-edge tensors of one chunk's messages take ~256 MiB
CHUNK_BYTES = 1 << 28
# CPU: a chunk's largest per-edge tensor (the tensor product's output) stays below glibc's
# largest mmap threshold (32 MiB), so its blocks are reused from the heap rather than
# mapped afresh and faulted in page by page at every call. Side by side with and without
# chunks: benchmarks/results/mace-cpu.md (`mlipd bench mace`), rows `mlipd stored` and
# `mlipd chunked`.
CPU_CHUNK_TENSOR_BYTES = 24 << 20
MIN_CHUNK_EDGES = 256


class Pieces:
    """Runs and counts the pieces of one forward (``start`` resets the counts).

    runs: bodies run so far (forward and recomputation); ``recomputed`` = runs beyond
    the forward's own; ``in_graph``: pieces whose output autograd records (the ones a
    backward pass may recompute).
    """

    def __init__(self, context: Callable[[], Any] = contextlib.nullcontext) -> None:
        self.runs = self.forward_runs = self.in_graph = 0
        self.checkpoint = False
        self.context = context  # what a recomputation runs under (the forward's own)

    def start(self, *, checkpoint: bool) -> Callable[..., Any]:
        self.runs = self.forward_runs = self.in_graph = 0
        self.checkpoint = checkpoint
        return self.run

    @property
    def recomputed(self) -> int:
        return self.runs - self.forward_runs

    def counters(self) -> dict[str, int]:
        return {"pieces": self.forward_runs, "pieces_in_graph": self.in_graph}

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        def body(*inner: Any) -> Any:
            self.runs += 1
            return fn(*inner)

        if self.checkpoint:
            # no early stop: it ends a recomputation by raising from a saved-tensor hook,
            # and e3nn's TorchScript code turns that exception into a RuntimeError
            with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                out = torch.utils.checkpoint.checkpoint(
                    body, *args, use_reentrant=False,
                    context_fn=lambda: (contextlib.nullcontext(), self.context()))
        else:
            out = body(*args)
        self.forward_runs += 1
        outs = out if isinstance(out, tuple) else (out,)
        self.in_graph += any(isinstance(t, torch.Tensor) and t.requires_grad for t in outs)
        return out


def edge_floats(model: torch.nn.Module) -> list[int]:
    """Per interaction, the numbers autograd stores per edge without recomputation: the
    senders' rows, the radial MLP's activations and weights, and the tensor product's
    output and internals (estimated as 3 of its outputs)."""
    out = []
    for block in model.interactions:
        radial = sum(getattr(block, "radial_MLP", [64, 64, 64]))
        out.append(int(block.linear_up.irreps_out.dim) + 2 * radial
                   + 2 * int(block.conv_tp.weight_numel) + 3 * int(block.conv_tp.irreps_out.dim))
    return out


def stored_activation_bytes(model: torch.nn.Module, n_edges: int, dtype: torch.dtype) -> int:
    """Estimated activations of a forward without recomputation (per-edge terms only:
    with ~20-100 neighbours per atom the per-atom terms are a few per cent). The
    measured peak to compare with: benchmarks/results/mace-cpu.md, rows `mlipd stored`
    (MiB per atom and edges per atom of the same model)."""
    itemsize = torch.finfo(dtype).bits // 8
    return itemsize * n_edges * sum(edge_floats(model))


def should_recompute(option: str, model: torch.nn.Module, graph: LocalGraph) -> bool:
    """``"1"``/``"0"``, or for ``"auto"``: when the stored activations would take more
    than half of the free memory (on a CPU host shared by the ranks on it)."""
    if option != "auto":
        return option == "1"
    device = graph.receivers.device
    free = available_bytes(device)
    if free is None:
        return False
    if device.type == "cpu":
        free //= int(os.environ.get("LOCAL_WORLD_SIZE", graph.world_size))
    need = stored_activation_bytes(model, int(graph.receivers.shape[0]), graph.dtype)
    return need > free // 2


def choose_chunk(option: int | str, model: torch.nn.Module, *, recompute: bool,
                 dtype: torch.dtype, device: torch.device) -> int:
    """Edges per chunk (0: none). ``auto``: on a CPU, chunks whose largest per-edge tensor
    takes ``CPU_CHUNK_TENSOR_BYTES``; on a GPU, chunks of ~``CHUNK_BYTES`` of per-edge
    tensors when recomputing, none otherwise (autograd then keeps every chunk's tensors
    anyway, and how small chunks fare on a GPU was not measured)."""
    if option != "auto":
        return int(option)
    itemsize = torch.finfo(dtype).bits // 8
    if device.type == "cpu":
        widest = max(int(b.conv_tp.irreps_out.dim) for b in model.interactions)
        return max(MIN_CHUNK_EDGES, CPU_CHUNK_TENSOR_BYTES // (itemsize * widest))
    if not recompute:
        return 0
    per_edge = max(edge_floats(model)) * itemsize
    return max(MIN_CHUNK_EDGES, CHUNK_BYTES // max(per_edge, 1))


def chunk_bounds(receivers: torch.Tensor, n_rows: int, chunk: int
                 ) -> list[tuple[int, int, int, int]]:
    """(first row, end row, first edge, end edge) of each chunk of edges sorted by
    receiver: whole receivers, about ``chunk`` edges each (a receiver with more edges
    gets a chunk of its own). One chunk of everything when ``chunk`` is 0."""
    n_edges = int(receivers.shape[0])
    if chunk <= 0 or n_edges <= chunk:
        return [(0, n_rows, 0, n_edges)]
    counts = torch.bincount(receivers, minlength=n_rows)
    starts = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])  # first edge of row
    targets = torch.arange(chunk, n_edges, chunk, device=receivers.device)
    rows = torch.unique(torch.searchsorted(starts, targets))
    cuts = [0, *[r for r in rows.tolist() if 0 < r < n_rows], n_rows]
    edge_at = starts[torch.tensor(cuts, device=receivers.device)].tolist()
    return [(cuts[k], cuts[k + 1], edge_at[k], edge_at[k + 1]) for k in range(len(cuts) - 1)]
