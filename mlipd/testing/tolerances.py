"""What "equal" means: the one error model behind every float32 tolerance in the tests,
and the float64 tolerance.

**float64.** Distributed and one-rank runs, or mlipd and a package's own float64
modules, differ only in the order of float64 sums. ``FLOAT64_RTOL`` (1e-10 relative
to the quantity's largest magnitude, about 5e5 float64 epsilons) is the bound every
float64 comparison uses, unless a test states a tighter one (1e-12 where both sides
run the same step).

**float32 arithmetic** (features and weights in float32, geometry in float64, as
mlipd runs every model). Every output is a sum of ``m`` float32 terms. Rounding errors
of independent operations behave as independent random variables (Higham & Mary,
"A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019):
the error of such a sum is at most ``LAMBDA * sqrt(m) * EPS32 * scale`` except with
probability about ``2 exp(-LAMBDA**2 / 2)`` (2e-8 per component at LAMBDA = 6), where
``scale`` bounds the terms' magnitudes. Here:

* ``m`` = the largest number of edges (r < cutoff) at one atom: the terms of one
  atom's force, site energy and per-atom extras (a message-passing layer sums over
  them); the model's L layers each make such a sum, independent errors that add in
  quadrature: ``m`` counts L times (``layers``, the model's ``spec.n_layers``), and
  ``terms_per_edge`` times where each edge's message is itself a sum the architecture
  fixes (an SO(2) convolution over (lmax + 1)^2 coefficients: eSEN);
* ``scale`` = the float64 reference's largest force component (forces), largest
  |site energy| estimated by |E| / N (energy per atom: the mean of N independent site
  errors, so the bound is divided by sqrt(N)), largest |value| (extras; or
  the scale of the features read out, where the model states one);
  stress: the virial is a sum over the N m edges of r (below the cutoff) times a
  force term off by EPS32 times the force scale, so
  ``LAMBDA * sqrt(N m) * cutoff * EPS32 * force scale / volume``.

The structures must be rattled (forces not ~0): a force scale of zero would make the
bound zero, failing a correct model rather than passing a wrong one.

**float32 geometry** (a package's own float32 calculator: CHGNet's, sevenn's): it
rounds coordinates to float32 before building edges, moving each by up to
``GEOMETRY_ROUNDINGS * EPS32 * R`` (R = the largest coordinate + cutoff: fractional
coordinates, the lattice product and the difference each round once). Forces move by
the Hessian applied to that displacement; ``stiffness`` measures |H u|_max for u of
random signs (the rounding errors' pattern) in float64 by central differences, so
the bound is ``LAMBDA * GEOMETRY_ROUNDINGS * EPS32 * R * stiffness`` (energy per atom:
the same displacement times the largest force, 3 components).

A comparison between two float32 computations adds both sides' bounds.
``ratios(...)`` gives observed / bound per quantity, reported by the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mlipd.types import Result, Structure

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23
LAMBDA = 6.0
GEOMETRY_ROUNDINGS = 3
FLOAT64_RTOL = 1e-10


@dataclass(frozen=True)
class Bounds:
    """Absolute bounds: energy per atom (eV), forces (eV/Å, each component), stress
    (eV/Å³), per-atom extras (their unit, each component, by name)."""

    energy_per_atom: float
    forces: float
    stress: float
    extras: dict[str, float]

    def __add__(self, other: Bounds) -> Bounds:
        return Bounds(self.energy_per_atom + other.energy_per_atom,
                      self.forces + other.forces, self.stress + other.stress,
                      {k: v + other.extras.get(k, 0.0) for k, v in self.extras.items()})


def terms_per_atom(structure: Structure, cutoff: float) -> int:
    """The largest number of edges (r < cutoff) at one atom (at least 1)."""
    from mlipd.engine.neighbors import neighbor_list

    edges = neighbor_list(structure, cutoff)
    if len(edges) == 0:
        return 1
    return int(np.bincount(edges.centers, minlength=structure.n_atoms).max())


def _stress(structure: Structure, cutoff: float, m: int, term: float) -> float:
    """LAMBDA sqrt(N m) cutoff term / volume: N m edge terms (r < cutoff, each off by
    ``term``) summed into the virial."""
    if not structure.pbc.all():
        return 0.0
    volume = abs(float(np.linalg.det(structure.cell)))
    return LAMBDA * np.sqrt(structure.n_atoms * m) * cutoff * term / volume


def arithmetic(ref: Result, structure: Structure, cutoff: float, *, layers: int = 1,
               terms_per_edge: int = 1,
               extras_scale: dict[str, float] | None = None) -> Bounds:
    """Bounds on a float32-feature run's error against the float64 ``ref`` (module doc).

    extras_scale: a floor under an extra's scale where its values can be far smaller than
    the terms of the sum that gives them (a readout of O(1) features near zero, e.g.
    CHGNet's magnetic moments on a non-magnetic oxide, whose terms are ~1 μB)."""
    floor = extras_scale or {}
    m = terms_per_atom(structure, cutoff)
    unit = LAMBDA * np.sqrt(m * layers * terms_per_edge) * EPS32
    f_max = float(np.abs(ref.forces).max(initial=0.0))
    n = structure.n_atoms
    return Bounds(
        # the mean of N independent site-energy errors
        energy_per_atom=unit * abs(ref.energy) / n / np.sqrt(n),
        forces=unit * f_max, stress=_stress(structure, cutoff, m, EPS32 * f_max),
        extras={k: unit * max(float(np.abs(np.asarray(v)).max(initial=0.0)),
                              floor.get(k, 0.0))
                for k, v in ref.extras.items()})


def stiffness(forces_at: Callable[[np.ndarray], np.ndarray], positions: np.ndarray, *,
              h: float = 1e-4, seed: int = 0) -> float:
    """|H u|_max (eV/Å²) for u of random signs: the largest force change per Å when every
    coordinate moves by +-1 Å, by central differences of ``forces_at`` (float64)."""
    u = np.random.default_rng(seed).choice([-1.0, 1.0], size=positions.shape)
    diff = forces_at(positions + h * u) - forces_at(positions - h * u)
    return float(np.abs(diff).max()) / (2 * h)


def geometry(ref: Result, structure: Structure, cutoff: float, stiff: float) -> Bounds:
    """Bounds on what a float32 geometry adds (module doc); ``stiff`` from ``stiffness``."""
    reach = float(np.abs(structure.positions).max(initial=0.0)) + cutoff
    shift = LAMBDA * GEOMETRY_ROUNDINGS * EPS32 * reach  # Å
    m = terms_per_atom(structure, cutoff)
    return Bounds(
        energy_per_atom=3 * shift * float(np.abs(ref.forces).max(initial=0.0)),
        forces=shift * stiff,
        stress=_stress(structure, cutoff, m, shift * stiff / (LAMBDA * np.sqrt(m))),
        extras={k: 0.0 for k in ref.extras})


def errors(got: Result, ref: Result, structure: Structure) -> dict[str, float]:
    """Observed absolute errors, named as ``Bounds``' fields (extras by name)."""
    out = {"energy_per_atom": abs(got.energy - ref.energy) / structure.n_atoms,
           "forces": float(np.abs(np.asarray(got.forces) - ref.forces).max(initial=0.0))}
    if ref.virial is not None and got.virial is not None:
        out["stress"] = float(np.abs(got.stress(structure.cell)
                                     - ref.stress(structure.cell)).max())
    for k, v in ref.extras.items():
        out[k] = float(np.abs(np.asarray(got.extras[k]) - np.asarray(v)).max(initial=0.0))
    return out


def ratios(got: Result, ref: Result, structure: Structure, bounds: Bounds) -> dict[str, float]:
    """Observed error / bound per quantity (<= 1 passes)."""
    limit = {"energy_per_atom": bounds.energy_per_atom, "forces": bounds.forces,
             "stress": bounds.stress, **bounds.extras}
    return {k: e / limit[k] if limit[k] > 0 else (0.0 if e == 0 else np.inf)
            for k, e in errors(got, ref, structure).items()}


def assert_within(got: Result, ref: Result, structure: Structure, bounds: Bounds,
                  what: str = "") -> dict[str, float]:
    """Every quantity within its bound; returns the ratios (for reports)."""
    r = ratios(got, ref, structure, bounds)
    bad = {k: v for k, v in r.items() if not v <= 1.0}
    if bad:
        raise AssertionError(f"{what}: error / float32 bound above 1: {bad}; errors "
                             f"{errors(got, ref, structure)}, bounds {bounds}")
    return r
