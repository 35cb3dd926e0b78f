"""What "equal" means: the one error model behind every float32 and float64 tolerance
in the tests, and the bounds for results relayed through another program's units and
text.

**Rounding model** (float32 and float64 alike). Every output is a sum of ``m`` terms
computed in a floating-point type of epsilon ``eps``. Rounding errors of independent
operations behave as independent random variables (Higham & Mary, "A new approach to
probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019): the error of such
a sum is at most ``LAMBDA * sqrt(m) * eps * scale`` except with probability about
``2 exp(-LAMBDA**2 / 2)`` (2e-8 per component at LAMBDA = 6), where ``scale`` bounds
the terms' magnitudes. Here:

* ``m`` = the largest number of edges (r < cutoff) at one atom: the terms of one
  atom's force, site energy and per-atom extras (a message-passing layer sums over
  them); the model's L layers each make such a sum, independent errors that add in
  quadrature: ``m`` counts L times (``layers``, the model's ``spec.n_layers``), and
  ``terms_per_edge`` times where each edge's message is itself a sum the architecture
  fixes (an SO(2) convolution over (lmax + 1)^2 coefficients: eSEN);
* ``scale`` = the float64 reference's largest force component (forces), the mean
  |site energy| (sum |e_i| / N from the model's site energies, |E| / N without them;
  energy per atom: the mean of N independent site errors, so the bound is divided by
  sqrt(N)), largest |value| (extras; or the scale of the features read out, where the
  model states one); stress: the virial is a sum over the N m edges of r (below the
  cutoff) times the edge's force term, itself computed through the L layers' sums of
  ``terms_per_edge`` terms (a random error of ``sqrt(L terms_per_edge) eps`` times the
  force scale), so ``LAMBDA * sqrt(N m) * cutoff * sqrt(L terms_per_edge) * eps *
  force scale / volume``.
* the engine's own float64 assembly, whatever the features' dtype: the energy as a
  sum of N site energies (``LAMBDA sqrt(N) eps64 sum |e_i|``), the virial as
  ``sum_i x_i g_i + cell^T dE/dcell`` (``mlipd.engine.step``), N terms of up to
  R f_max (R = the largest coordinate + cutoff) whose partial sums walk to
  sqrt(N) R f_max: ``LAMBDA N eps64 R f_max / volume``. Negligible beside float32's
  rounding; in float64 they are the largest terms of a large cell.

``arithmetic`` gives this bound for one computation against exact arithmetic.
The structures must be rattled (forces not ~0): a force scale of zero would make the
bound zero, failing a correct model rather than passing a wrong one.

**float32 arithmetic** (features and weights in float32, geometry in float64, as
mlipd runs every model): ``arithmetic`` with ``EPS32`` against the float64 result.

**float64** (distributed vs one rank, mlipd vs a package's own float64 modules, one
process vs another): two float64 computations of one model, each within ``arithmetic``
at ``EPS64`` of exact arithmetic and, where the two build their edge vectors by other
operations (a rank's halo holds image positions x + n cell; a package builds its own
graph), within ``geometry`` at ``EPS64`` (the float32-geometry model below, with
eps64); their difference is within twice that (``float64``): ~1e-14 of the force
scale, where the blanket 1e-10 relative (``FLOAT64_RTOL``, about 5e5 epsilons) is
loose by four orders of magnitude. Where both sides run the same operations in the
same order (the same step on the same input, a result passed on unchanged), they are
equal bit for bit and the tests say so (``==``).

**float32 geometry** (a package's own float32 calculator: CHGNet's, sevenn's): it
rounds coordinates to float32 before building edges, moving each by up to
``GEOMETRY_ROUNDINGS * EPS32 * R`` (R = the largest coordinate + cutoff: fractional
coordinates, the lattice product and the difference each round once). Forces move by
the Hessian applied to that displacement; ``stiffness`` measures |H u|_max for u of
random signs (the rounding errors' pattern) in float64 by central differences, so
the bound is ``LAMBDA * GEOMETRY_ROUNDINGS * EPS32 * R * stiffness`` (energy per atom:
the same displacement times the largest force, 3 components).

**Relayed through another program** (``relayed``: ASE's socket calculator, i-PI):
the other program converts the geometry and the results with its own constants and
may print them as text. Each float64 multiplication by a unit rounds once (relative
error <= eps64 / 2, deterministic: ``roundings``); two programs' constants differ by a
stated, computed ``mismatch`` (i-PI's Bohr and Hartree are given to 8 digits: 1.4e-8
and 9.6e-8 relative from ASE's CODATA values); a number printed with d decimals is off
by at most half a unit of its last digit (``half_unit``, ``printed_at_most``). A
length unit's mismatch scales positions and cell together, so it moves the results by
that scaling times their derivative along it (measured in float64 by central
differences); a text rounding of the coordinates moves them as a float32 geometry's
rounding does (``stiffness``, times LAMBDA); a unit's mismatch on an output is
relative to the output.

A comparison between two computations adds both sides' bounds.
``ratios(...)`` gives observed / bound per quantity, reported by the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mlipd.types import Result, Structure

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23
EPS64 = float(np.finfo(np.float64).eps)  # 2**-52
LAMBDA = 6.0
GEOMETRY_ROUNDINGS = 3
# a blanket relative tolerance, for a caller that asks for one
# (``check_zero_redundancy(result_rtol=...)``); ``float64`` derives the bound
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
               terms_per_edge: int = 1, extras_scale: dict[str, float] | None = None,
               eps: float = EPS32) -> Bounds:
    """Bounds on the rounding error of a run in arithmetic of epsilon ``eps`` (float32
    features by default) against exact arithmetic, ``ref`` giving the scales (module
    doc).

    extras_scale: a floor under an extra's scale where its values can be far smaller than
    the terms of the sum that gives them (a readout of O(1) features near zero, e.g.
    CHGNet's magnetic moments on a non-magnetic oxide, whose terms are ~1 μB)."""
    floor = extras_scale or {}
    m = terms_per_atom(structure, cutoff)
    unit = LAMBDA * np.sqrt(m * layers * terms_per_edge) * eps
    f_max = float(np.abs(ref.forces).max(initial=0.0))
    n = structure.n_atoms
    sites = _site_magnitudes(ref, n)
    return Bounds(
        # the mean of N independent site-energy errors, and the sum's own rounding
        energy_per_atom=unit * sites / n / np.sqrt(n) + _assembly_energy(sites, n) / n,
        forces=unit * f_max,
        stress=(_stress(structure, cutoff, m, np.sqrt(layers * terms_per_edge) * eps * f_max)
                + _assembly_stress(structure, cutoff, f_max)),
        extras={k: unit * max(float(np.abs(np.asarray(v)).max(initial=0.0)),
                              floor.get(k, 0.0))
                for k, v in ref.extras.items()})


def _site_magnitudes(ref: Result, n: int) -> float:
    """sum |site energy| (|E| where the model gives no site energies)."""
    if ref.energies is not None and len(ref.energies) == n:
        return max(float(np.abs(np.asarray(ref.energies)).sum()), abs(ref.energy))
    return abs(ref.energy)


def _assembly_energy(sites: float, n: int) -> float:
    """The engine's float64 sum of N site energies: each addition rounds by at most
    EPS64 times a partial sum, itself at most sum |site energy|."""
    return LAMBDA * np.sqrt(n) * EPS64 * sites


def _assembly_stress(structure: Structure, cutoff: float, f_max: float) -> float:
    """The engine's float64 virial sum_i x_i g_i + cell^T dE/dcell (``mlipd.engine.step``):
    N terms of up to R f_max (R = the largest coordinate + cutoff), whose partial sums
    walk to sqrt(N) R f_max (the forces sum to zero), each addition rounding by EPS64
    of that: LAMBDA N EPS64 R f_max / volume."""
    if not structure.pbc.all():
        return 0.0
    n = structure.n_atoms
    reach = float(np.abs(structure.positions).max(initial=0.0)) + cutoff
    volume = abs(float(np.linalg.det(structure.cell)))
    return LAMBDA * n * EPS64 * reach * f_max / volume


def float64(ref: Result, structure: Structure, cutoff: float, *, layers: int = 1,
            terms_per_edge: int = 1, extras_scale: dict[str, float] | None = None,
            stiff: float | None = None, eps: float = EPS64) -> Bounds:
    """Bounds on the difference of two float64 computations of one model on one float64
    geometry (summed in different orders): each side's ``arithmetic`` at EPS64, and,
    where the two build their edge vectors differently (a rank's halo images, a
    package's own graph), each side's ``geometry`` at EPS64 (``stiff`` from
    ``stiffness``; None where both build them by the same operations). ``eps``: the
    features' epsilon, for two float32 runs (EPS32) on float64 geometries."""
    one = arithmetic(ref, structure, cutoff, layers=layers, terms_per_edge=terms_per_edge,
                     extras_scale=extras_scale, eps=eps)
    if stiff is not None:
        one = one + geometry(ref, structure, cutoff, stiff, eps=EPS64)
    return one + one


def float64_engine(make_model: Callable):
    """A float64 ``SingleRankEngine`` of ``make_model()`` (skin 0): the one that measures
    stiffness for ``measured_float64``."""
    import torch

    from mlipd.engine.single_rank import SingleRankEngine

    return SingleRankEngine(make_model(), dtype=torch.float64, skin=0.0)


def measured_float64(engine, structure: Structure, ref: Result, *, eps: float = EPS64,
                     terms_per_edge: int = 1,
                     extras_scale: dict[str, float] | None = None) -> Bounds:
    """``float64`` for ``engine``'s model (``float64_engine``) at ``structure`` (``ref``:
    a result there) against a run that builds its edge vectors by other operations (a
    rank's halo): the stiffness measured with ``engine`` (two steps)."""
    from dataclasses import replace

    def forces_at(positions: np.ndarray) -> np.ndarray:
        return engine.compute([replace(structure, positions=positions)])[0].forces

    spec = engine.model.spec
    return float64(ref, structure, spec.cutoff, layers=max(int(spec.n_layers or 1), 1),
                   terms_per_edge=terms_per_edge, extras_scale=extras_scale, eps=eps,
                   stiff=stiffness(forces_at, structure.positions))


def stiffness(forces_at: Callable[[np.ndarray], np.ndarray], positions: np.ndarray, *,
              h: float = 1e-4, seed: int = 0) -> float:
    """|H u|_max (eV/Å²) for u of random signs: the largest force change per Å when every
    coordinate moves by +-1 Å, by central differences of ``forces_at`` (float64)."""
    u = np.random.default_rng(seed).choice([-1.0, 1.0], size=positions.shape)
    diff = forces_at(positions + h * u) - forces_at(positions - h * u)
    return float(np.abs(diff).max()) / (2 * h)


def geometry(ref: Result, structure: Structure, cutoff: float, stiff: float, *,
             eps: float = EPS32) -> Bounds:
    """Bounds on what a geometry rounded in arithmetic of epsilon ``eps`` (float32 by
    default) adds (module doc); ``stiff`` from ``stiffness``."""
    reach = float(np.abs(structure.positions).max(initial=0.0)) + cutoff
    shift = LAMBDA * GEOMETRY_ROUNDINGS * eps * reach  # Å
    m = terms_per_atom(structure, cutoff)
    return Bounds(
        energy_per_atom=3 * shift * float(np.abs(ref.forces).max(initial=0.0)),
        forces=shift * stiff,
        stress=_stress(structure, cutoff, m, shift * stiff / (LAMBDA * np.sqrt(m))),
        extras={k: 0.0 for k in ref.extras})


def roundings(k: int) -> float:
    """Relative error of a float64 value multiplied or divided by constants ``k`` times
    (deterministic: each operation rounds by at most u = eps64 / 2, so at most
    gamma_k = k u / (1 - k u), Higham's bound)."""
    u = EPS64 / 2
    return k * u / (1 - k * u)


def mismatch(theirs: float, ours: float) -> float:
    """Relative difference of two programs' values of one constant (e.g. i-PI's Bohr
    radius in Å against ASE's)."""
    return abs(theirs / ours - 1.0)


def half_unit(decimals: int) -> float:
    """The most a number printed with ``decimals`` decimals is off (absolute)."""
    return 0.5 * 10.0**-decimals


def printed_half_unit(text: str) -> float:
    """The most a number printed as ``text`` (e.g. ``1.3e-07``, ``0.25``) is off: half a
    unit of its last digit."""
    mantissa, _, exponent = text.strip().lower().partition("e")
    return half_unit(len(mantissa.partition(".")[2]) - int(exponent or 0))


def printed_at_most(text: str, bound: float) -> bool:
    """Whether a number printed as ``text`` can be the rounding of a value <= ``bound``:
    its printed value less ``printed_half_unit`` is <= bound."""
    return abs(float(text)) - printed_half_unit(text) <= bound


def relayed(ref: Result, structure: Structure,
            result_at: Callable[[np.ndarray, np.ndarray], Result], *, scaling: float = 0.0,
            rounding: float = 0.0, relative: float = 0.0, forces_decimals: int | None = None,
            h: float = 1e-4, seed: int = 0) -> Bounds:
    """Bounds on what a relay through another program adds to a float64 result (module
    doc): its geometry is ``structure``'s scaled by (1 + s), |s| <= ``scaling``
    (positions and cell: two programs' length units, ``mismatch``), each coordinate
    and cell entry then rounded by up to ``rounding`` Å (float64 conversions:
    ``roundings`` times the largest coordinate; text: ``half_unit``); its outputs are
    multiplied by (1 + d), |d| <= ``relative``; its forces printed with
    ``forces_decimals`` decimals. ``result_at(positions, cell)``: the model in float64;
    ``h``: the relative step (scaling) and the step in Å (rounding) of the central
    differences."""
    n = structure.n_atoms
    stress = ref.stress(structure.cell)
    energy = forces = stress_b = 0.0
    pos, cell = structure.positions, structure.cell
    if scaling:
        up, down = result_at(pos * (1 + h), cell * (1 + h)), result_at(pos * (1 - h),
                                                                       cell * (1 - h))
        energy += scaling * abs(up.energy - down.energy) / (2 * h) / n
        forces += scaling * float(np.abs(up.forces - down.forces).max()) / (2 * h)
        if stress is not None:
            d = up.stress(cell * (1 + h)) - down.stress(cell * (1 - h))
            stress_b += scaling * float(np.abs(d).max()) / (2 * h)
    if rounding:
        rng = np.random.default_rng(seed)
        u = rng.choice([-1.0, 1.0], size=pos.shape)
        v = rng.choice([-1.0, 1.0], size=cell.shape) * (np.abs(cell) > 0)
        up = result_at(pos + h * u, cell + h * v)
        down = result_at(pos - h * u, cell - h * v)
        # the rounding pattern's response measured along random signs, as ``geometry``
        # (positions and cell entries, each rounded on its own); energy: first order in
        # the positions, and the cell's share from that response
        energy += rounding * (float(np.abs(ref.forces).sum())
                              + LAMBDA * abs(up.energy - down.energy) / (2 * h)) / n
        forces += LAMBDA * rounding * float(np.abs(up.forces - down.forces).max()) / (2 * h)
        if stress is not None:
            d = up.stress(cell + h * v) - down.stress(cell - h * v)
            stress_b += LAMBDA * rounding * float(np.abs(d).max()) / (2 * h)
    if forces_decimals is not None:
        forces += half_unit(forces_decimals)
    return proportional(ref, structure, relative) + Bounds(
        energy_per_atom=energy, forces=forces, stress=stress_b,
        extras=dict.fromkeys(ref.extras, 0.0))


def proportional(ref: Result, structure: Structure, relative: float) -> Bounds:
    """Bounds on outputs each multiplied by (1 + d), |d| <= ``relative`` (a unit's
    ``mismatch``, ``roundings``): relative times each quantity's largest magnitude."""
    stress = ref.stress(structure.cell)
    return Bounds(energy_per_atom=relative * abs(ref.energy) / structure.n_atoms,
                  forces=relative * float(np.abs(ref.forces).max(initial=0.0)),
                  stress=0.0 if stress is None else relative * float(np.abs(stress).max()),
                  extras={k: relative * float(np.abs(np.asarray(v)).max(initial=0.0))
                          for k, v in ref.extras.items()})


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
        raise AssertionError(f"{what}: error / bound above 1: {bad}; errors "
                             f"{errors(got, ref, structure)}, bounds {bounds}")
    return r
