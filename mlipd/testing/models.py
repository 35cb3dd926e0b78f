"""Models for engine tests, built on ``ReferenceMP``.

``FaultyModel(trigger=path, rank=1)`` behaves as ``ReferenceMP`` until the file at
``path`` exists when rank ``rank`` runs a forward: it then deletes the file and
either raises ``RuntimeError`` (content ``raise``) or kills its process at once
(content ``exit``), mid-step, after the first halo exchange. ``ExtrasModel`` returns
per-atom extras of several shapes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mlipd.model_api import ModelOutput
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


class ExtrasModel(ReferenceMP):
    """``ReferenceMP`` that also returns per-atom extras of several trailing shapes
    (from its last features): ``charge`` (n,), ``dipole`` (n, 3), ``quadrupole`` (n, 2, 3)."""

    def forward(self, graph) -> ModelOutput:
        out = super().forward(graph)
        h = out.site_energy.detach()
        n = graph.n_owned
        ids = graph.global_ids[:n].to(h.dtype)
        base = torch.stack([h, ids, h * ids], dim=1)  # depends on the atom, not the rank
        return ModelOutput(site_energy=out.site_energy, extras={
            "charge": h,
            "dipole": base,
            "quadrupole": torch.stack([base, 2.0 * base], dim=1)})
