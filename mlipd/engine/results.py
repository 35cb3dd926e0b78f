"""Results from the ranks' packed outputs (``mlipd.engine.step.pack``): the one place
where energies and virials are summed over ranks, forces put back in the caller's atom
order, extras reshaped, and non-finite output refused."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlipd.engine.step import HEADER_COLUMNS, N_STATS, ExtraLayout
from mlipd.errors import CalculationFailed
from mlipd.types import Result, Structure


def assemble(structures: Sequence[Structure], parts: Sequence[np.ndarray],
             owned: Sequence[np.ndarray | None], layout: Sequence[ExtraLayout], *,
             virial: bool) -> tuple[list[Result], np.ndarray]:
    """Results per structure and the (P, 3) stats (owned atoms, edges, halo atoms) per rank.

    parts: per rank, its flat float64 packed output (padded rows allowed)
    owned: per rank, the batch-global ids of its owned atoms in row order; None means
           every atom, in order (one rank)
    """
    nb = len(structures)
    head = nb * HEADER_COLUMNS + N_STATS
    width = 3 + sum(x.width for x in layout)
    energies, virials = np.zeros(nb), np.zeros((nb, 3, 3))
    stats = np.zeros((len(parts), N_STATS))
    rows = None
    for q, (flat, ids) in enumerate(zip(parts, owned, strict=True)):
        energies += flat[:nb]
        virials += flat[nb: HEADER_COLUMNS * nb].reshape(nb, 3, 3)
        stats[q] = flat[HEADER_COLUMNS * nb: head]
        body = flat[head:].reshape(-1, width)
        if ids is None:  # one rank: the rows are the batch, in order
            rows = body
        else:
            if rows is None:
                rows = np.empty((sum(len(i) for i in owned), width))
            rows[ids] = body[: ids.size]
    if not _all_finite(energies) or not _all_finite(rows[:, :3]):
        raise CalculationFailed("model returned NaN or infinite energy or forces")
    offsets = np.concatenate([[0], np.cumsum([s.n_atoms for s in structures])])
    results = []
    for b, s in enumerate(structures):
        lo, hi = offsets[b], offsets[b + 1]
        mine = rows if nb == 1 else rows[lo:hi]
        extras, col = {}, 3
        for x in layout:
            extras[x.name] = mine[:, col: col + x.width].reshape(hi - lo, *x.shape).tolist()
            col += x.width
        results.append(Result(
            energy=float(energies[b]),
            # a view of this call's own fresh buffer where it is contiguous
            forces=np.ascontiguousarray(mine[:, :3]),
            virial=virials[b].copy() if virial and s.pbc.all() else None,
            extras=extras))
    return results, stats


def _all_finite(a: np.ndarray) -> bool:
    """isfinite(a).all() with one reduction in the common case: a finite sum means no
    NaN and no infinity (the element-wise check runs only when the sum is not finite)."""
    return bool(np.isfinite(a.sum())) or bool(np.isfinite(a).all())
