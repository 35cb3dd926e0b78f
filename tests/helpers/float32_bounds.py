"""The float32 bounds of a model's float32 results against its float64 ones
(``mlipd.testing.tolerances``), for tests that compare mlipd's float32 with a package's
float32 calculator at one structure."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mlipd.engine.single_rank import SingleRankEngine
from mlipd.testing import tolerances as tol
from mlipd.types import Result, Structure


@dataclass(frozen=True)
class Float32Bounds:
    """``exact``: the float64 result; ``ours``: mlipd's float32 (float64 geometry)
    against it; ``package``: a package's float32 calculator (float32 geometry) against
    it; ``structure``, and ``result_at(positions, cell)``: the float64 model."""

    structure: Structure
    exact: Result
    ours: tol.Bounds
    package: tol.Bounds
    engine: SingleRankEngine

    def result_at(self, positions, cell) -> Result:
        return self.engine.compute([replace(self.structure, positions=positions,
                                            cell=cell)])[0]


def float32_bounds(model, atoms, *, extras_scale: dict[str, float] | None = None
                   ) -> Float32Bounds:
    """``model`` (an mlipd model) in float64 at ``atoms``, and the float32 bounds there:
    float32 arithmetic over the model's layers, plus the package's float32 geometry
    (its stiffness measured in float64)."""
    s = Structure.from_atoms(atoms)
    engine = SingleRankEngine(model, dtype=torch.float64)
    (exact,) = engine.compute([s])
    cutoff = engine.model.spec.cutoff
    ours = tol.arithmetic(exact, s, cutoff, layers=engine.model.spec.n_layers,
                          extras_scale=extras_scale)

    def forces_at(positions):
        return engine.compute([replace(s, positions=positions)])[0].forces

    package = ours + tol.geometry(exact, s, cutoff, tol.stiffness(forces_at, s.positions))
    return Float32Bounds(s, exact, ours, package, engine)
