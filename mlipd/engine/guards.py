"""Geometry guards: what a structure may ask of the neighbour list and the model,
checked on rank 0 before any native code (vesin) or any other rank sees it.

A single request could otherwise kill or stall the process that serves everyone:
vesin divides by a zero cell count (SIGFPE) when its grid is capped for an extreme
aspect ratio (two atoms 1e6 Å apart, a flat open structure 3000 Å wide, a
12 x 12 x 2e20 Å cell) or when cell products overflow (1e300 Å); it loops over
~1e9 periodic images for one atom in a nearly singular cell; and a tiny cell or a
dense cluster asks for billions of pairs. Each check below is O(N) vectorised numpy
(hashed bins; a sort only of the few atoms that share a bucket, all pairs only below
160 atoms), runs when the neighbour list is rebuilt (a reused list keeps every atom
within skin/2 of a checked structure, with the same cell: every check but the minimum
distance still holds, and that one is repeated at every reused step for the few pairs
that could come that close, ``CloseWatch``), and raises a typed error:
``ValidationError`` (``bad_input``) for input no model can mean, ``TooLarge``
(``too_large``) for work beyond a budget.

The checks, in order (``check_structure``):
1. magnitudes: cell vectors <= ``MAX_LENGTH``, fractional coordinates on periodic
   axes <= ``MAX_FRACTIONAL`` cells from the origin, coordinates <= ``MAX_COORDINATE``;
2. the cell: each periodic face height >= 2 x ``min_distance`` (an atom nearer to its
   own image), and the periodic images of one atom within cutoff + skin,
   prod(2 ceil(r / h) + 1), <= ``MAX_IMAGES`` (tiny or very skewed cells);
3. vesin's own cell grid, replicated (``vesin_grid``, vesin 0.6 ``cpu_cell_list.cpp``):
   no axis capped to zero cells, and its cell-pair visits <= ``MAX_GRID_VISITS``;
4. pairs: an upper bound on the pairs within cutoff + skin (``pair_bound``, bins as
   wide as the radius, Cauchy-Schwarz over neighbouring bins) <= ``Limits.max_pairs``;
5. the minimum interatomic distance (``closest_pair``, ``close_pairs``) >=
   ``Limits.min_distance``, and the pairs to watch until the next rebuild;
6. at P > 1, the partitioner's dense bin grid (``mlipd.engine.bins``) stays small;
then, for the whole batch, the memory estimate against the budget
(``mlipd.engine.budget``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mlipd.engine.bins import DEFAULT_SUBDIVISIONS, MAX_BINS_PER_AXIS, cell_basis
from mlipd.engine.budget import MemoryBudget
from mlipd.errors import TooLarge, ValidationError
from mlipd.types import Structure

MAX_LENGTH = 1e6  # Å, a cell vector: beyond any simulation, and 1e6 * eps = 2e-10 Å resolution
MAX_COORDINATE = 1e7  # Å from the origin: float64 then still resolves 2e-9 Å
MAX_FRACTIONAL = 1e4  # cells from the origin (unwrapped MD coordinates); vesin bins in int32
MAX_IMAGES = 20_000  # periodic images of one atom: 1-atom cells down to ~h = r / 13
MAX_GRID_VISITS = 2e8  # vesin cell-pair visits (~ns each): a second or two at most
VESIN_MAX_CELLS = 1e5  # vesin's MAX_NUMBER_OF_CELLS
MAX_PARTITION_BINS = 1 << 24  # dense bin grid of the partitioner (float64: 128 MiB)
MAX_CLOSE_PAIRS = 4_000_000  # candidate pairs of the minimum-distance check
_BRUTE_FORCE_ATOMS = 160  # up to this, the minimum distance is an all-pairs check
_P0, _P1 = np.int64(0x9E3779B1), np.int64(0x85EBCA77)  # odd multipliers of the bin key
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing

DEFAULT_MAX_PAIRS = 2e8  # the bound, ~4-8x the true count: ~300k atoms of dense bulk
DEFAULT_MIN_DISTANCE = 0.1  # Å: nuclei never come closer; a model would divide by ~0


@dataclass(frozen=True)
class Limits:
    """The budgets of ``check_structures`` (engine options).

    max_pairs:    refuse a structure whose bound on pairs within cutoff + skin exceeds
                  this (``--max-pairs``); the bound is ~4-8x the true count in bulk
    min_distance: Å, refuse atoms closer than this (``--min-distance``; 0 turns it off)
    max_request_memory: bytes one engine call may take per device (``--max-request-
                  memory``; ``mlipd.engine.budget``); None: half the device's free memory
                  when the engine starts; 0 turns the budget off
    """

    max_pairs: float = DEFAULT_MAX_PAIRS
    min_distance: float = DEFAULT_MIN_DISTANCE
    max_request_memory: float | None = None

    def __post_init__(self) -> None:
        if not self.max_pairs >= 1 or not self.min_distance >= 0:
            raise ValueError("max_pairs must be >= 1 and min_distance >= 0")
        if self.max_request_memory is not None and not self.max_request_memory >= 0:
            raise ValueError("max_request_memory must be >= 0 bytes")


def check_structures(structures: Sequence[Structure], *, radius: float, limits: Limits,
                     world_size: int = 1, skin: float = 0.0,
                     memory: MemoryBudget | None = None) -> CloseWatch:
    """Refuse the first structure of a batch that fails a guard (see module docstring),
    then the batch if its memory estimate is over ``memory``'s budget; ``radius``: the
    neighbour lists' cutoff + skin (Å), ``skin``: the Verlet skin (Å). Returns what the
    minimum-distance check must watch while the neighbour list is reused."""
    checked = []
    for k, s in enumerate(structures):
        try:
            checked.append(check_structure(s, radius=radius, limits=limits,
                                           world_size=world_size, skin=skin))
        except ValidationError as e:  # TooLarge included: keep the type, name the structure
            raise type(e)(f"structure {k}: {e}" if len(structures) > 1 else str(e)) from None
    if memory is not None:
        memory.check(list(structures), u_h=[(c.u, c.h) for c in checked], skin=skin)
    return CloseWatch(min_distance=limits.min_distance,
                      watched={k: c.watch for k, c in enumerate(checked) if c.watch is not None})


@dataclass(frozen=True)
class Checked:
    """What ``check_structure`` computed: reduced coordinates (N, 3), face heights (3,),
    and the pairs to watch between rebuilds (``Watch``; None: nothing can come close)."""

    u: np.ndarray
    h: np.ndarray
    watch: Watch | None


def check_structure(s: Structure, *, radius: float, limits: Limits,
                    world_size: int = 1, skin: float = 0.0) -> Checked:
    pbc = np.asarray(s.pbc, dtype=bool)
    positions, cell = s.positions, s.cell
    if np.abs(cell).max() > MAX_LENGTH:  # before any product of cell entries can overflow
        raise ValidationError(f"cell entry of {np.abs(cell).max():.3g} Å (limit "
                              f"{MAX_LENGTH:g} Å)")
    if np.abs(positions).max() > MAX_COORDINATE:
        raise ValidationError(f"coordinate of {np.abs(positions).max():.3g} Å from the origin "
                              f"(limit {MAX_COORDINATE:g} Å)")
    u, h, far = _reduced(positions, cell, pbc)
    if far > MAX_FRACTIONAL:  # vesin bins fractional coordinates in int32
        raise ValidationError(f"an atom {far:.3g} cells from the origin "
                              f"(limit {MAX_FRACTIONAL:g}); wrap the coordinates")
    _check_cell(h, pbc, radius=radius, min_distance=limits.min_distance)
    _check_grid(positions, h, pbc, radius=radius)
    bound = pair_bound(u, h, pbc, radius=radius)
    if bound > limits.max_pairs:
        raise TooLarge(f"up to {bound:.3g} atom pairs within {radius:g} Å (budget "
                       f"{limits.max_pairs:.3g}, --max-pairs): too many atoms too close "
                       "together, or a cell too small for the cutoff")
    watch = None
    if limits.min_distance > 0 and s.n_atoms > 1:
        watch = _check_distances(s, u, h, pbc, min_distance=limits.min_distance, skin=skin)
    if world_size > 1:
        bins = partition_bins(u, h, pbc, radius=radius)
        if bins > MAX_PARTITION_BINS:
            raise TooLarge(f"the atoms spread over {bins:.3g} partition bins of "
                           f"{radius / DEFAULT_SUBDIVISIONS:g} Å (limit "
                           f"{MAX_PARTITION_BINS:.3g}); run it on one rank")
    return Checked(u, h, watch)


def _too_close(i: int, j: int, d: float, min_distance: float) -> ValidationError:
    return ValidationError(f"atoms {i} and {j} are {d:.3g} Å apart "
                           f"(minimum {min_distance:g} Å, --min-distance)")


def _check_distances(s: Structure, u: np.ndarray, h: np.ndarray, pbc: np.ndarray, *,
                     min_distance: float, skin: float) -> Watch | None:
    """The minimum-distance check at a rebuild, and what to watch until the next one.

    While the list is reused every atom stays within skin / 2 of this structure (same
    cell), so a pair can come closer than ``min_distance`` only if it is now closer
    than ``min_distance + skin``: those pairs (none in sane matter at the default
    0.1 + 0.5 Å) are watched at every reused step. That needs the nearest image to be
    the wrapped one, i.e. face heights >= 2 (min_distance + skin); in a smaller cell
    the whole check runs again at every step instead (such cells hold few atoms)."""
    below = min_distance + skin
    hp = h[pbc]
    if skin > 0 and (hp.size == 0 or hp.min() >= 2 * below):
        try:
            i, j, d = close_pairs(u, h, pbc, cell=s.cell, below=below)
        except TooLarge:  # crowded within `below` (not yet within min_distance): see below
            i = None
        if i is not None:
            if d.size and d.min() < min_distance:
                k = int(np.argmin(d))
                raise _too_close(int(i[k]), int(j[k]), float(d[k]), min_distance)
            return Watch(i, j, s.cell.copy(), pbc.copy()) if i.size else None
    close = closest_pair(u, h, pbc, cell=s.cell, below=min_distance)
    if close is not None:
        raise _too_close(*close, min_distance)
    return Watch(None, None, s.cell.copy(), pbc.copy()) if skin > 0 else None


@dataclass(frozen=True)
class Watch:
    """Pairs of one structure (i, j: (W,) int64) that may come closer than the minimum
    distance before the next rebuild; ``i is None``: check every pair at every step."""

    i: np.ndarray | None
    j: np.ndarray | None
    cell: np.ndarray
    pbc: np.ndarray


@dataclass(frozen=True)
class CloseWatch:
    """The minimum-distance check of the steps that reuse a neighbour list
    (``check_structures`` returns it at a rebuild; ``check`` runs at every reuse).

    Why here and not in the step: rank 0 holds every structure's positions on the host
    before the step starts, so the check costs no device read and stops a refused
    structure before any rank computes (the step's candidate edges live on the device
    and, at P > 1, on every rank). The other guards need no repeat: the cell is the same,
    every atom is within skin / 2 of the checked structure, and the pairs are the
    rebuild's (checked) candidates."""

    min_distance: float = 0.0
    watched: dict[int, Watch] = field(default_factory=dict)

    def check(self, structures: Sequence[Structure]) -> None:
        """Refuse (``bad_input``) a structure with atoms closer than ``min_distance``.
        Cost: O(watched pairs), nothing when none are watched."""
        for k, w in self.watched.items():
            s = structures[k]
            try:
                if w.i is None:
                    u, h, _ = _reduced(s.positions, w.cell, w.pbc)
                    close = closest_pair(u, h, w.pbc, cell=w.cell, below=self.min_distance)
                    if close is not None:
                        raise _too_close(*close, self.min_distance)
                    continue
                d = _wrapped_distances(s.positions, w)
                if d.min() < self.min_distance:
                    m = int(np.argmin(d))
                    raise _too_close(int(w.i[m]), int(w.j[m]), float(d[m]), self.min_distance)
            except ValidationError as e:
                raise type(e)(f"structure {k}: {e}" if len(structures) > 1 else str(e)
                              ) from None


def _wrapped_distances(positions: np.ndarray, w: Watch) -> np.ndarray:
    """Nearest-image distances (Å) of the watched pairs (valid below half the smallest
    periodic face height, which ``_check_distances`` ensured)."""
    basis = cell_basis(w.cell, w.pbc)
    du = _times(positions[w.j] - positions[w.i], np.linalg.inv(basis))
    du[:, w.pbc] -= np.round(du[:, w.pbc])
    x = _times(du, basis)
    return np.sqrt((x * x).sum(axis=1))


# ---------------------------------------------------------------- geometry


def _reduced(positions: np.ndarray, cell: np.ndarray,
             pbc: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Reduced coordinates u (as ``mlipd.engine.bins``: fractional and wrapped on periodic
    axes, Å on open ones), the face heights h (3,) in Å (1 on open axes), and how many
    cells from the origin the farthest atom was before wrapping."""
    basis = cell_basis(cell, pbc)
    if pbc.any():
        periodic = basis[pbc]
        gram = np.linalg.det(periodic @ periodic.T)
        if not gram > 1e-24 * float(np.prod((periodic * periodic).sum(axis=1))):
            raise ValidationError("periodic cell vectors are linearly dependent (zero volume)")
    try:
        inverse = np.linalg.inv(basis)
    except np.linalg.LinAlgError as e:
        raise ValidationError(f"cell cannot be inverted: {e}") from None
    u = _times(positions, inverse)
    h = 1.0 / np.linalg.norm(inverse, axis=0)
    if not (np.isfinite(u).all() and np.isfinite(h).all()):
        raise ValidationError("cell too close to singular for these coordinates")
    far = float(np.abs(u[:, pbc]).max()) if pbc.any() else 0.0
    u[:, pbc] -= np.floor(u[:, pbc])
    return u, h, far


def _times(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``a @ m`` for (N, 3) @ (3, 3) as three axpy passes: a BLAS gemm here wakes its
    thread pool, which on a loaded machine costs far more than the arithmetic."""
    out = a[:, :1] * m[0]
    out += a[:, 1:2] * m[1]
    out += a[:, 2:] * m[2]
    return out


def _check_cell(h: np.ndarray, pbc: np.ndarray, *, radius: float, min_distance: float) -> None:
    if not pbc.any():
        return
    hp = h[pbc]
    if hp.min() < 2 * min_distance:
        raise ValidationError(f"periodic cell face height {hp.min():.3g} Å: an atom would sit "
                              f"within {2 * min_distance:g} Å of its own image")
    layers = np.ceil(radius / hp)
    images = float(np.prod(2 * layers + 1))
    if images > MAX_IMAGES:
        raise TooLarge(f"cell face heights {_fmt(hp)} Å against cutoff + skin {radius:g} Å: "
                       f"{images:.3g} periodic images of every atom (limit {MAX_IMAGES:,}); "
                       "the cell is too small or too skewed (reduce it, e.g. "
                       "ase.geometry.minkowski_reduce, or repeat it)")


def vesin_grid(positions: np.ndarray, h: np.ndarray, pbc: np.ndarray, *,
               radius: float) -> tuple[np.ndarray, np.ndarray] | None:
    """vesin's cell list (``CellList::CellList``, ``BoundingBox::make_bounding_for``):
    cells per axis and cells searched per axis, or None where its cap would leave an
    axis with no cell (its integer division by zero). Open axes use the Cartesian extent
    of the atoms, as vesin does."""
    d = np.empty(3)
    for k in range(3):
        if pbc[k]:
            d[k] = h[k]
        else:
            extent = float(positions[:, k].max() - positions[:, k].min())
            d[k] = max((1.0 if extent < 1e-6 else extent) * 1.01, 1.0)
    n = np.maximum(np.trunc(d / radius), 1.0)
    if float(np.prod(n)) > VESIN_MAX_CELLS:
        rxy, ryz = n[0] / n[1], n[1] / n[2]
        z = math.cbrt(VESIN_MAX_CELLS / (rxy * ryz * ryz))
        y = ryz * math.trunc(z)
        x = rxy * math.trunc(y)
        # a margin: C's and numpy's rounding may differ in the last bit near 1
        if min(x, y, z) < 1.0 + 1e-6:
            return None
        n = np.array([math.trunc(x), math.trunc(y), math.trunc(z)], dtype=float)
    search = np.maximum(np.ceil(radius * n / d), 1.0)
    if pbc.any() and not pbc.all():
        search[~pbc] = np.maximum(search[~pbc], n[~pbc] - 1)
    return n, search


def _check_grid(positions: np.ndarray, h: np.ndarray, pbc: np.ndarray, *,
                radius: float) -> None:
    grid = vesin_grid(positions, h, pbc, radius=radius)
    if grid is None:
        raise ValidationError(
            f"atoms spread over {_fmt(np.ptp(positions, axis=0))} Å with periodicity "
            f"{pbc.astype(int).tolist()}: too flat or elongated for the neighbour list's "
            "grid (vesin); split the structure or give it a cell")
    n, search = grid
    visits = float(np.prod(n) * np.prod(2 * search + 1))
    if visits > MAX_GRID_VISITS:
        raise TooLarge(f"the neighbour list would visit {visits:.3g} cell pairs (limit "
                       f"{MAX_GRID_VISITS:.3g}): the atoms spread too far along an open "
                       "axis of a periodic structure, or the cell is too small")


def _fmt(a: np.ndarray) -> str:
    return " x ".join(f"{x:.3g}" for x in a)


# ---------------------------------------------------------------- counting


def _buckets(idx: np.ndarray, bits: int) -> np.ndarray:
    """(N,) bucket in [0, 2**bits) of integer triples (N, 3) (multiplicative hashing);
    collisions only add work, never hide a pair."""
    key = idx[:, 0] * _P0 + idx[:, 1] * _P1 + idx[:, 2]  # int64, wraps
    return ((key.view(np.uint64) * _MIX) >> np.uint64(64 - bits)).astype(np.int64)


def _bits(n: int) -> int:
    """Table size 2**bits >= 8 n: about one atom in eight shares a bucket by chance."""
    return max(10, int(8 * n - 1).bit_length())


def pair_bound(u: np.ndarray, h: np.ndarray, pbc: np.ndarray, *, radius: float) -> float:
    """An upper bound on the ordered pairs (i, j, image) within ``radius`` (self pairs
    included). Bins at least ``radius`` wide: every such pair joins a bin to one of its
    f = prod(f_k) neighbours (f_k = 3, or the image layers 2 ceil(r / h) + 1 where an axis
    holds fewer than 3 bins), so the count is sum_b sum_o c_b c_(b+o) <= f sum_b c_b^2
    (Cauchy-Schwarz). Counts are per hash bucket, which can only raise the sum."""
    n_atoms = u.shape[0]
    idx = np.zeros(u.shape, dtype=np.int64)
    f = 1.0
    for k in range(3):
        if pbc[k]:
            bins = int(h[k] // radius)
            if bins < 3:
                f *= 2 * math.ceil(radius / h[k]) + 1
                continue
            idx[:, k] = np.minimum((u[:, k] * bins).astype(np.int64), bins - 1)
        else:
            lo = float(u[:, k].min())
            if float(u[:, k].max()) - lo < radius:
                continue  # one bin holds every atom along this axis
            idx[:, k] = ((u[:, k] - lo) / radius).astype(np.int64)
        f *= 3
    counts = np.bincount(_buckets(idx, _bits(n_atoms))).astype(np.float64)
    return f * float((counts * counts).sum())


def partition_bins(u: np.ndarray, h: np.ndarray, pbc: np.ndarray, *, radius: float) -> float:
    """Bins of the partitioner's dense grid (``BinGrid`` with the default subdivisions)."""
    width = radius / DEFAULT_SUBDIVISIONS
    total = 1.0
    for k in range(3):
        span = h[k] if pbc[k] else float(np.ptp(u[:, k]))
        n = math.floor(span / width) + (0 if pbc[k] else 1)
        total *= min(max(n, 1), MAX_BINS_PER_AXIS)
    return total


def closest_pair(u: np.ndarray, h: np.ndarray, pbc: np.ndarray, *, cell: np.ndarray,
                 below: float) -> tuple[int, int, float] | None:
    """Some pair of atoms (i, j, distance Å) nearer than ``below``, or None.

    Needs every periodic face height >= 2 ``below`` (``_check_cell``), so the nearest
    image of a close pair is the wrapped difference of reduced coordinates. Beyond a few
    atoms: bins >= 4 ``below`` wide on 4 grids shifted by a quarter bin along the
    diagonal. Two atoms nearer than ``below`` share a bin on at least one of them (along
    each axis the 4 grids' bin edges lie ``below`` apart, so at most one grid per axis
    cuts the pair, and 3 axes cut at most 3 grids). Atoms that share a hash bucket and
    then a bin get an exact distance; in sane matter no two atoms share a bin."""
    basis = cell_basis(cell, pbc)
    for i, j in _near_candidates(u, h, pbc, below):
        found = _closer(u, pbc, basis, i, j, below)
        if found is not None:
            return found
    return None


def close_pairs(u: np.ndarray, h: np.ndarray, pbc: np.ndarray, *, cell: np.ndarray,
                below: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of atoms nearer than ``below`` (nearest image): i < j (W,) int64 and
    their distances (W,) Å. Same conditions and candidates as ``closest_pair``."""
    basis = cell_basis(cell, pbc)
    found_i, found_j, found_d = [], [], []
    for i, j in _near_candidates(u, h, pbc, below):
        if i.size == 0:
            continue
        d = _distances(u, pbc, basis, i, j)
        near = d < below
        found_i.append(np.minimum(i[near], j[near]))
        found_j.append(np.maximum(i[near], j[near]))
        found_d.append(d[near])
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    i, j, d = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)
    _, first = np.unique(i * u.shape[0] + j, return_index=True)  # one per pair
    return i[first], j[first], d[first]


def _near_candidates(u: np.ndarray, h: np.ndarray, pbc: np.ndarray, below: float):
    """Candidate pairs (i, j) among which every pair nearer than ``below`` is (see
    ``closest_pair``): all pairs below a few atoms, else each grid's shared bins."""
    n_atoms = u.shape[0]
    if n_atoms <= _BRUTE_FORCE_ATOMS:
        yield np.triu_indices(n_atoms, k=1)
        return
    per_axis = np.where(pbc, np.maximum(np.floor(h / (4 * below)), 1.0), 1.0 / (4 * below))
    scaled = u * per_axis
    scaled[:, ~pbc] -= scaled[:, ~pbc].min(axis=0)
    wrap = [(k, int(per_axis[k])) for k in np.flatnonzero(pbc)]
    bits = _bits(n_atoms)
    for shift in (0.0, 0.25, 0.5, 0.75):
        idx = np.floor(scaled + shift).astype(np.int64)
        for k, n in wrap:
            idx[:, k] %= n
        bucket = _buckets(idx, bits)
        shared = np.flatnonzero(np.bincount(bucket)[bucket] > 1)
        if shared.size == 0:
            continue
        yield _pairs_within_bins(shared, idx[shared])


def _pairs_within_bins(atoms: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every pair of ``atoms`` in the same bin (``idx``: their (n, 3) bin indices)."""
    order = np.lexsort(idx.T)
    atoms, idx = atoms[order], idx[order]
    new = np.r_[True, (idx[1:] != idx[:-1]).any(axis=1)]
    starts = np.flatnonzero(new)
    sizes = np.diff(np.r_[starts, atoms.size])
    total = int((sizes * (sizes - 1) // 2).sum())
    if total > MAX_CLOSE_PAIRS:
        raise TooLarge(f"{total:,} atom pairs crowd within a few tenths of an Å "
                       f"(limit {MAX_CLOSE_PAIRS:,})")
    end = np.repeat(starts + sizes, sizes)
    pos = np.arange(atoms.size)
    partners = end - pos - 1  # later members of the same bin
    first = np.repeat(pos, partners)
    offset = np.arange(total) - np.repeat(np.cumsum(partners) - partners, partners)
    return atoms[first], atoms[first + offset + 1]


def _distances(u: np.ndarray, pbc: np.ndarray, basis: np.ndarray, i: np.ndarray,
               j: np.ndarray) -> np.ndarray:
    du = u[j] - u[i]
    du[:, pbc] -= np.round(du[:, pbc])
    x = _times(du, basis)
    return np.sqrt((x * x).sum(axis=1))


def _closer(u: np.ndarray, pbc: np.ndarray, basis: np.ndarray, i: np.ndarray, j: np.ndarray,
            below: float) -> tuple[int, int, float] | None:
    if i.size == 0:
        return None
    d = _distances(u, pbc, basis, i, j)
    k = int(np.argmin(d))
    if d[k] < below:
        return int(i[k]), int(j[k]), float(d[k])
    return None
