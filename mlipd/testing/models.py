"""Models for failure tests: a ``ReferenceMP`` that fails on demand on one rank.

``FaultyModel(trigger=path, rank=1)`` behaves as ``ReferenceMP`` until the file at
``path`` exists when rank ``rank`` runs a forward: it then deletes the file and
either raises ``RuntimeError`` (content ``raise``) or kills its process at once
(content ``exit``), mid-step, after the first halo exchange.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlipd.models.base import ModelOutput
from mlipd.models.reference import ReferenceMP


class FaultyModel(ReferenceMP):
    def __init__(self, args: str = "", *, trigger: str, rank: int = 1) -> None:
        super().__init__(args)
        self.trigger = Path(trigger)
        self.fail_rank = int(rank)

    def forward(self, graph) -> ModelOutput:
        if graph.rank == self.fail_rank and self.trigger.exists():
            action = self.trigger.read_text().strip()
            self.trigger.unlink()
            h = graph.exchange(self.embedding[graph.numbers[: graph.n_owned]])
            if action == "exit":
                os._exit(7)
            raise RuntimeError(f"injected failure on rank {graph.rank} ({h.shape[0]} rows)")
        return super().forward(graph)
