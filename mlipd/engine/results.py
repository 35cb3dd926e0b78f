"""A rank's step output (``RankOutput``, what ``Step.run`` returns), its packed form for
the gather and the copy from an accelerator (``pack`` / ``unpack`` / ``to_host``), and
Results from the ranks' outputs (``assemble``):
the one place where energies and virials are summed over ranks, forces put back in the
caller's atom order, extras reshaped, and non-finite output refused."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from mlipd.errors import CalculationFailed
from mlipd.types import Result, Structure

HEADER_COLUMNS = 10  # per structure in a packed output: energy, virial (9)
N_STATS = 3  # owned atoms, edges (r < cutoff), halo atoms
ROW_EXTRAS = 4  # first column of the extras in an owned atom's row: forces (3), site energy


@dataclass(frozen=True)
class ExtraLayout:
    """A per-atom extra in the packed rows: its name and trailing shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def width(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class RankOutput:
    """One rank's step (float64, on the rank's device).

    energies: (B,) eV, this rank's part of each structure's energy
    virials:  (B, 3, 3) eV, this rank's part, or None if not computed
    forces:   (n_owned, 3) eV/Å of the owned atoms, in the rank's row order
    site_energies: (n_owned,) eV, the owned atoms' own energies (their sum is ``energies``)
    extras:   per-atom extras of the owned atoms, each flattened to (n_owned, width)
    stats:    (owned atoms, edges (r < cutoff), halo atoms): ints, or 0-d tensors on the
              device where counting them on the host would be a read (masked edges)
    """

    energies: torch.Tensor
    virials: torch.Tensor | None
    forces: torch.Tensor
    site_energies: torch.Tensor
    extras: tuple[torch.Tensor, ...]
    stats: tuple[int | torch.Tensor, int | torch.Tensor, int | torch.Tensor]


def unpad(out: RankOutput, n_real: int) -> RankOutput:
    """``out`` with only its first ``n_real`` rows (the padding atoms' rows are last)."""
    return RankOutput(energies=out.energies, virials=out.virials, forces=out.forces[:n_real],
                      site_energies=out.site_energies[:n_real],
                      extras=tuple(t[:n_real] for t in out.extras), stats=out.stats)


def pack(out: RankOutput) -> torch.Tensor:
    """One flat float64 tensor: energies (B), virials (9B, zeros if not computed), stats
    (3), then the owned atoms' rows (forces, site energy, then each extra flattened)."""
    energies = out.energies
    nb = energies.shape[0]
    vir = energies.new_zeros(9 * nb) if out.virials is None else out.virials.reshape(-1)
    rows = torch.cat([out.forces, out.site_energies[:, None], *out.extras], dim=1)
    stats = torch.stack([torch.as_tensor(v, device=energies.device).to(energies.dtype)
                         for v in out.stats])  # device scalars stay on the device
    head = torch.cat([energies, vir, stats])
    return torch.cat([head, rows.reshape(-1)])


def packed_size(n_structures: int, n_owned: int, layout: Sequence[ExtraLayout]) -> int:
    """Elements of a packed output of ``n_owned`` rows."""
    return n_structures * HEADER_COLUMNS + N_STATS + n_owned * row_width(layout)


def row_width(layout: Sequence[ExtraLayout]) -> int:
    """Columns of one owned atom's row: forces (3), site energy (1), then every extra."""
    return ROW_EXTRAS + sum(x.width for x in layout)


def unpack(flat: np.ndarray | torch.Tensor, n_structures: int,
           layout: Sequence[ExtraLayout]) -> RankOutput:
    """``pack``'s inverse (padded rows beyond the stats' owned count are dropped);
    virials are always present (zeros where they were not computed)."""
    flat = torch.as_tensor(flat)
    nb, width = n_structures, row_width(layout)
    head = nb * HEADER_COLUMNS + N_STATS
    stats = tuple(int(v) for v in flat[HEADER_COLUMNS * nb: head])
    rows = flat[head: head + stats[0] * width].reshape(stats[0], width)
    extras, col = [], ROW_EXTRAS
    for x in layout:
        extras.append(rows[:, col: col + x.width])
        col += x.width
    return RankOutput(energies=flat[:nb], virials=flat[nb: HEADER_COLUMNS * nb].reshape(nb, 3, 3),
                      forces=rows[:, :3], site_energies=rows[:, 3], extras=tuple(extras),
                      stats=stats)


def to_host(out: RankOutput, layout: Sequence[ExtraLayout]) -> RankOutput:
    """A rank's output on the host, for ``assemble``. On a CPU it is already there (no
    copy: packing it would cost more than the step of a small system); from an
    accelerator it crosses packed, in one copy."""
    if out.forces.device.type == "cpu":
        return replace(out, stats=tuple(int(v) for v in out.stats))
    return unpack(pack(out).cpu(), out.energies.shape[0], layout)


def assemble(structures: Sequence[Structure], outputs: Sequence[RankOutput],
             owned: Sequence[np.ndarray | None], layout: Sequence[ExtraLayout], *,
             virial: bool) -> tuple[list[Result], np.ndarray]:
    """Results per structure and the (P, 3) stats (owned atoms, edges, halo atoms) per rank.

    outputs: per rank, its output on the host (``to_host``, or ``unpack`` of a gathered
             packed output), stats as ints
    owned:   per rank, the batch-global ids of its owned atoms in row order; None means
             every atom, in order (one rank)
    """
    nb = len(structures)
    energies, virials = np.zeros(nb), np.zeros((nb, 3, 3))
    stats = np.zeros((len(outputs), N_STATS))
    forces = site = None
    extras: list[np.ndarray] = []
    for q, (out, ids) in enumerate(zip(outputs, owned, strict=True)):
        energies += out.energies.numpy()
        if out.virials is not None:
            virials += out.virials.numpy()
        stats[q] = out.stats
        if ids is None:  # one rank: the rows are the batch, in order
            forces, site = out.forces.numpy(), out.site_energies.numpy()
            extras = [t.numpy() for t in out.extras]
            continue
        if forces is None:
            n = sum(len(i) for i in owned)
            forces, site = np.empty((n, 3)), np.empty(n)
            extras = [np.empty((n, x.width)) for x in layout]
        forces[ids] = out.forces.numpy()
        site[ids] = out.site_energies.numpy()
        for mine, t in zip(extras, out.extras, strict=True):
            mine[ids] = t.numpy()
    if not _all_finite(energies) or not _all_finite(forces):
        raise CalculationFailed("model returned NaN or infinite energy or forces")
    offsets = np.concatenate([[0], np.cumsum([s.n_atoms for s in structures])])
    results = []
    for b, s in enumerate(structures):
        lo, hi = offsets[b], offsets[b + 1]
        # a view of this call's own fresh arrays where one structure has them all
        f = forces if nb == 1 else forces[lo:hi]
        results.append(Result(
            energy=float(energies[b]),
            forces=np.ascontiguousarray(f),
            virial=virials[b].copy() if virial and s.pbc.all() else None,
            extras={x.name: e[lo:hi].reshape(hi - lo, *x.shape).tolist()
                    for x, e in zip(layout, extras, strict=True)},
            energies=site[lo:hi].copy()))
    return results, stats


def _all_finite(a: np.ndarray) -> bool:
    """isfinite(a).all() with one reduction in the common case: a finite sum means no
    NaN and no infinity (the element-wise check runs only when the sum is not finite)."""
    return bool(np.isfinite(a.sum())) or bool(np.isfinite(a).all())
