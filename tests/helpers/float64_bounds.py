"""float64 results that crossed a wire or another process, against a direct evaluation
(``mlipd.testing.tolerances``): two float64 computations of one model on the same edge
vectors (``tol.float64``: the server sums in its own order, its own threads), plus the
wire's unit conversions where it has them (i-PI's Bohr and Hartree, converted there and
back with the same constants: each a counted number of float64 roundings)."""

from __future__ import annotations

import numpy as np

from mlipd.testing import tolerances as tol
from mlipd.types import Result, Structure


def over_wire(engine, s: Structure, ref: Result, *, geometry_roundings: int = 0,
              output_roundings: int = 0) -> tol.Bounds:
    """The bound for a result of ``engine``'s model at ``s`` that crossed a wire:
    ``geometry_roundings`` roundings of each coordinate and cell entry (e.g. 2: divided
    by Bohr here, multiplied back there), ``output_roundings`` of each output."""
    spec = engine.model.spec
    bound = (tol.float64(ref, s, spec.cutoff, layers=max(int(spec.n_layers or 1), 1))
             + tol.proportional(ref, s, tol.roundings(output_roundings)))
    if geometry_roundings:
        reach = max(float(np.abs(s.positions).max()), float(np.abs(s.cell).max()))

        def result_at(positions, cell) -> Result:
            return engine.compute([Structure(s.numbers, positions, cell, s.pbc)])[0]

        bound = bound + tol.relayed(ref, s, result_at,
                                    rounding=tol.roundings(geometry_roundings) * reach)
    return bound


def assert_over_wire(got: Result, ref: Result, s: Structure, engine, *,
                     geometry_roundings: int = 0, output_roundings: int = 0,
                     what: str = "over the wire") -> dict[str, float]:
    """``got`` within ``over_wire`` of ``ref`` (energy, forces, and whatever else both
    have); returns error / bound."""
    bound = over_wire(engine, s, ref, geometry_roundings=geometry_roundings,
                      output_roundings=output_roundings)
    return tol.assert_within(got, ref, s, bound, what)


def assert_float64(got: Result, ref: Result, s: Structure, engine, *, other_geometry: bool,
                   output_roundings: int = 0, what: str = "float64") -> dict[str, float]:
    """Two float64 computations of ``engine``'s model at ``s`` (``tol.float64``); where the
    two build their edge vectors by other operations (another program, a batched
    product), each side's geometry rounding too, the stiffness measured with ``engine``
    (``tol.measured_float64``); ``output_roundings`` of each output on the way (e.g. a
    stress made a virial). Returns error / bound."""
    spec = engine.model.spec
    bound = (tol.measured_float64(engine, s, ref) if other_geometry
             else tol.float64(ref, s, spec.cutoff, layers=max(int(spec.n_layers or 1), 1)))
    bound = bound + tol.proportional(ref, s, tol.roundings(output_roundings))
    return tol.assert_within(got, ref, s, bound, what)
