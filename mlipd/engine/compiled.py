"""The one-rank step's model call, forces and virial as one compiled function
(``compile`` option, ``mlipd drive/serve --compile 1``).

A small system's step on a CPU is launch-bound: a few dozen torch ops and as many
autograd nodes, each a few µs of dispatch whatever its size (8 atoms: ~0.4 ms per
engine call, next to nothing of arithmetic). Here the model's energy, its gradient
(``torch.func.grad_and_value``: forces and the cell gradient in the same graph) and
the per-structure sums are traced once by ``torch.compile`` into a few fused kernels.

What it costs: a compilation (seconds, a C++ compiler on a CPU) at the first call and
for each new variant of the step (virial or not, one structure or several, no edges,
masked or selected edges); shapes are dynamic, so new atom and edge counts reuse the
compiled code. Results equal the eager step's to float64 round-off, not bit for bit
(fused kernels sum in their own order).

A model that ``torch.compile`` cannot handle: when the compiled call raises and the
eager step then succeeds on the same input, that is logged once and the step stays
eager from then on; when the eager step fails too, the input was at fault and its
error is raised as always. One rank only (collectives inside a traced step are not
supported), and not with CUDA graphs, which replace the same per-op cost on a GPU.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch

from mlipd.engine.virial import cell_virial, edge_shifts
from mlipd.errors import SetupError
from mlipd.model_api import CandidateEdges, LocalGraph, Model

log = logging.getLogger(__name__)

MODES = ("0", "1")


def check_mode(mode: str) -> bool:
    """Whether ``mode`` (the ``compile`` option: 0 or 1) compiles the step."""
    mode = str(mode)
    if mode not in MODES:
        raise SetupError(f"compile={mode!r}: expected one of {', '.join(MODES)}")
    return mode == "1"


class CompiledPhysics:
    """``model``'s energies, forces and virial for one rank's graph, compiled.

    ``failed`` holds why compiling was given up (None while it is in use).
    """

    def __init__(self, model: Model, *, geometry_dtype: torch.dtype) -> None:
        self.model = model
        self.geometry_dtype = geometry_dtype
        self.failed: str | None = None
        self._fn = torch.compile(_own_code(self._physics), dynamic=True)

    def __call__(self, **inputs: Any):
        """(energies, forces, virials or None, site energies, extras dict) of the step;
        raises what the compiled call raised (``give_up`` decides what it means)."""
        return self._fn(**inputs)

    def give_up(self, error: BaseException) -> None:
        """The compiled call failed where the eager step succeeded: eager from now on."""
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        if lines and lines[0].endswith("raised:"):  # BackendCompilerFailed: the reason next
            lines = lines[1:]
        self.failed = lines[0][:300] if lines else type(error).__name__
        log.warning("compile: torch.compile could not run %s (%s); the step runs eagerly "
                    "from now on", self.model.spec.name, self.failed)

    def _physics(self, *, virial: bool, n: int, n_structures: int, x: torch.Tensor,
                 cells: torch.Tensor, numbers: torch.Tensor, batch: torch.Tensor,
                 receivers: torch.Tensor, senders: torch.Tensor, images: torch.Tensor,
                 images_f: torch.Tensor, edge_batch: torch.Tensor, global_ids: torch.Tensor,
                 n_atoms: torch.Tensor, dtype: torch.dtype,
                 candidates: CandidateEdges | None, edge_ids: torch.Tensor | None,
                 edge_mask: torch.Tensor | None, real: torch.Tensor | None,
                 cache: dict):
        dt = self.geometry_dtype

        def energy(x: torch.Tensor, cells: torch.Tensor):
            graph = LocalGraph(
                n_owned=n, numbers=numbers, positions=x, batch=batch,
                n_structures=n_structures, cells=cells, receivers=receivers,
                senders=senders, shifts=edge_shifts(images_f, cells, edge_batch),
                images=images, global_ids=global_ids, n_atoms=n_atoms, dtype=dtype,
                candidates=candidates, edge_ids=edge_ids, edge_mask=edge_mask, cache=cache)
            out = self.model(graph)
            site = out.site_energy.to(dt)
            if real is not None:  # padding atoms count for nothing (exact zeros)
                site = site * real
            return site.sum(), (site, out.extras)

        (g_x, g_cells), (_, (site, extras)) = torch.func.grad_and_value(
            energy, argnums=(0, 1), has_aux=True)(x, cells)
        if n_structures == 1:  # (a constant when traced) an index_add into one slot
            # fails inductor's code generation with several threads (atomic_add into [1])
            energies = site.sum().reshape(1)
        else:
            energies = torch.zeros(n_structures, dtype=dt, device=x.device).index_add(
                0, batch[:n], site)
        virials = -cell_virial(x, g_x, cells, g_cells, batch) if virial else None
        return energies, -g_x[:n], virials, site, extras


def _own_code(method: types.MethodType) -> types.MethodType:
    """``method`` bound to a copy of its function's code object. Dynamo keeps compiled
    variants per code object and stops compiling one after ``recompile_limit`` (8)
    variants, silently running it eagerly from then on: with one shared ``_physics``
    the engines of one process (several models, each with its own variants) used that
    budget up together (a TensorNet engine created after the LJ and reference tests ran
    uncompiled). A copy per engine gives each its own budget."""
    fn = method.__func__
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                             fn.__defaults__, fn.__closure__)
    own.__kwdefaults__ = fn.__kwdefaults__
    return types.MethodType(own, method.__self__)
