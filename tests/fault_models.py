"""Fault-injection and probe models for the engine and server tests (test-only: plug-in
authors need none of them), built on ``ReferenceMP`` and ``LennardJones``.

``FaultyModel(trigger=path, rank=1)`` behaves as ``ReferenceMP`` until the file at
``path`` exists when rank ``rank`` runs a forward: it then deletes the file and
either raises ``RuntimeError`` (content ``raise``) or kills its process at once
(content ``exit``), mid-step, after the first halo exchange. ``ExtrasModel`` returns
per-atom extras of several shapes. ``GatedLJ`` holds every forward while a file exists
(server tests: a request provably in flight).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from mlipd.model_api import ModelOutput
from mlipd.models.lj import LennardJones
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


class GatedLJ(LennardJones):
    """Lennard-Jones that a test can hold mid-request: ``gated:dir=PATH[,LJ options]``.

    Every forward first counts itself in ``PATH/started`` (the number of forwards begun,
    written atomically), then waits while ``PATH/hold`` exists (at most ``max_s``). A
    test creates ``hold``, sends a request, waits for ``started`` to count it (the
    request is then provably inside the engine), does what it tests, and removes
    ``hold`` to let the engine finish: no timing assumptions.
    """

    def __init__(self, args: str = "") -> None:
        from mlipd.models.options import parse_options

        _, opts = parse_options(args, model="gated",
                                syntax="gated:dir=PATH[,max_s=S,epsilon=..,sigma=..,cutoff=..]",
                                keys={"dir": str, "max_s": float, "epsilon": float,
                                      "sigma": float, "cutoff": float})
        if "dir" not in opts:
            raise ValueError("gated needs dir=PATH")
        self.gate = Path(opts.pop("dir"))
        self.max_s = float(opts.pop("max_s", 300.0))
        super().__init__(",".join(f"{k}={v}" for k, v in opts.items()))
        self.spec = replace(self.spec, name="gated")

    def forward(self, graph) -> ModelOutput:
        started = self.gate / "started"
        count = int(started.read_text()) + 1 if started.exists() else 1
        tmp = self.gate / f".started.{os.getpid()}"
        tmp.write_text(str(count))
        tmp.replace(started)
        deadline = time.monotonic() + self.max_s
        while (self.gate / "hold").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return super().forward(graph)
