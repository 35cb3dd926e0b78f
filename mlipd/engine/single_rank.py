"""The single-process engine: the engine's one step at world size 1, no process group.

Per-call cost matters here (``mlipd drive`` calls the engine once per MD step), so
what depends only on the batch's topology stays on the device between calls: the
neighbour list is built with ``cutoff + skin`` and reused while ``RebuildPolicy``
allows it; each call then drops the pairs now at ``r >= cutoff``, so the model sees
exactly the pairs of a fresh list.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mlipd.engine.api import OneProcess
from mlipd.engine.compiled import check_mode as compile_enabled
from mlipd.engine.coordinator import Coordinator
from mlipd.engine.cuda_graphs import GraphedRun
from mlipd.engine.cuda_graphs import enabled as cuda_graphs_enabled
from mlipd.engine.guards import Limits
from mlipd.engine.rank_loop import RankLoop
from mlipd.engine.step import Step
from mlipd.errors import CalculationFailed, SetupError
from mlipd.model_api import Model, ModelSpec
from mlipd.types import Result, Structure

DEFAULT_SKIN = 0.5  # Å


def for_inference(model: Model, device: torch.device, dtype: torch.dtype) -> Model:
    """The model on ``device`` in ``dtype``, in eval mode, with frozen parameters:
    forces need gradients of positions only, and a frozen weight spares autograd
    keeping every layer's input for its gradient (CHGNet: -30% peak memory)."""
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


class SingleRankEngine(OneProcess):
    """Evaluate a model on a batch of structures in one process (one rank).

    The batch is one disjoint graph: one model call for all structures.
    skin (Å): Verlet skin of the reused neighbour list; 0 builds a fresh list at every call.
    limits: the geometry guards' budgets (``mlipd.engine.guards``)
    cuda_graphs: ``auto``, ``0`` or ``1``: capture the warm step as a CUDA graph
        (``mlipd.engine.cuda_graphs``; on CUDA only)
    pad: pad atom and edge counts to buckets (``mlipd.engine.padding``); default: when
        CUDA graphs are captured
    compile: ``0`` or ``1``: run the model, forces and virial as one ``torch.compile``d
        function (``mlipd.engine.compiled``); not with CUDA graphs
    """

    def __init__(self, model: Model, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float64, skin: float = DEFAULT_SKIN,
                 limits: Limits | None = None, cuda_graphs: str = "auto",
                 pad: bool | None = None, compile: str = "0") -> None:
        if skin < 0:
            raise ValueError(f"skin must be >= 0 Å, got {skin}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = for_inference(model, self.device, dtype)
        compiled = compile_enabled(compile)
        if compiled and str(cuda_graphs) == "1":
            raise SetupError("compile=1 with cuda_graphs=1: pick one")
        graphs = not compiled and cuda_graphs_enabled(cuda_graphs, self.device, self.model)
        self.step = Step(self.model, None, device=self.device, dtype=dtype, skin=skin,
                         pad=graphs if pad is None else pad, compile=compiled)
        self.graphed = GraphedRun(self.step) if graphs else None
        self._coordinator = Coordinator(RankLoop(self.step, run=self.graphed), skin=skin,
                                        limits=limits)
        self.calls = 0  # engine calls, for the server's batching counters

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def world_size(self) -> int:
        return 1

    @property
    def limits(self) -> Limits:
        """The geometry guards' budgets."""
        return self._coordinator.limits

    @property
    def memory_budget(self) -> float | None:
        """Bytes one engine call may take (``mlipd.engine.budget``); None: no budget."""
        memory = self._coordinator.memory
        return None if memory is None else float(memory.budget)

    @property
    def compiled(self) -> bool:
        """The step runs compiled (``compile=1``, and not given up on the model)."""
        c = self.step.compiled
        return c is not None and c.failed is None

    @property
    def rebuilds(self) -> int:
        """Neighbour-list builds so far (calls minus reuses)."""
        return self._coordinator.policy.rebuilds

    @property
    def last_stats(self):
        """(1, 3) of the last step: owned atoms, edges (r < cutoff), halo atoms (0)."""
        return self._coordinator.last_stats

    def close(self) -> None:
        """Nothing to release at one rank; the distributed engine stops its ranks here."""

    def compute(self, structures: Sequence[Structure], *, virial: bool = True) -> list[Result]:
        if not structures:
            return []
        self.calls += 1
        try:
            return self._coordinator.compute(structures, virial=virial)
        except (RuntimeError, ValueError, IndexError) as e:
            raise CalculationFailed(f"model evaluation failed: {e}") from e
