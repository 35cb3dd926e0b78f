"""Atom and edge counts padded to buckets, so that the shapes of a one-rank step change
only when the counts move past a bucket edge (what a captured CUDA graph needs: a rebuild
that changes counts a little keeps every shape, see ``mlipd.engine.cuda_graphs``).

Padding atoms are owned rows after the real ones: the species of the first real atom,
at fixed positions far apart (further than the candidate radius from each other and
from the structure), in the last structure of the batch. Padding edges all go from the
first padding atom to the second, with no image: never within the cutoff, so a
``masked_edges`` model weights them out exactly, and their length is finite (no 0/0).
The step sums energies, and packs forces and extras, over the real atoms only; a
padding atom has no live edge and no energy counted, so its gradient is exactly zero
and the virial's x^T dE/dx gets exact zeros from its rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mlipd.engine.topology import RankEdges

PAD_ATOMS = 2  # the least padding: the two ends of the padding edges
FAR = 1.0e4  # Å, where the padding atoms sit (x of the first one)


def bucket(n: int, *, steps_per_octave: int = 16) -> int:
    """The smallest bucket >= n: multiples of 2^(floor(log2 n) - log2 steps), i.e. about
    ``steps_per_octave`` buckets between n and 2n (padding <= ~6% at 16)."""
    if n <= steps_per_octave:
        return max(int(n), 0)
    q = 2 ** max((int(n).bit_length() - 1) - (steps_per_octave.bit_length() - 1), 0)
    return -(-int(n) // q) * q


@dataclasses.dataclass(frozen=True)
class Padding:
    """How a one-rank topology was padded.

    n_real:    atoms of the batch (the first rows)
    n_atoms:   rows after padding (>= n_real + PAD_ATOMS)
    n_edges:   candidate edges after padding (the real ones first)
    positions: (n_atoms - n_real, 3) float64 Å, the padding atoms' positions
    numbers:   (n_atoms - n_real,) int64
    """

    n_real: int
    n_atoms: int
    n_edges: int
    positions: np.ndarray
    numbers: np.ndarray


def pad_topology(topo: RankEdges, numbers: np.ndarray, *, radius: float
                 ) -> tuple[RankEdges, Padding]:
    """``topo`` (one rank: every atom owned, ``local_ids`` = 0..N-1) with atoms and
    edges padded to buckets; numbers: (N,) of the batch. radius: the candidate radius."""
    n = topo.n_owned
    if topo.n_local != n:
        raise ValueError("padding is for one rank (no halo)")
    n_atoms = bucket(n + PAD_ATOMS)
    n_pad = n_atoms - n
    e = int(topo.receivers.shape[0])
    n_edges = bucket(e + 1)  # at least one padding edge: every bucket keeps its pair
    gap = 2.0 * radius + 1.0
    positions = np.zeros((n_pad, 3))
    positions[:, 0] = FAR + gap * np.arange(n_pad)
    first, second = n, n + 1
    last = int(topo.batch[-1]) if n else 0
    extra = n_edges - e
    pad = Padding(n_real=n, n_atoms=n_atoms, n_edges=n_edges, positions=positions,
                  numbers=np.full(n_pad, int(numbers[0]) if n else 1, dtype=np.int64))
    cat = np.concatenate
    padded = dataclasses.replace(
        topo,
        local_ids=np.arange(n_atoms, dtype=np.int64),
        n_owned=n_atoms,
        local_owner=cat([topo.local_owner, np.zeros(n_pad, dtype=np.int64)]),
        batch=cat([topo.batch, np.full(n_pad, last, dtype=np.int64)]),
        receivers=cat([topo.receivers, np.full(extra, first, dtype=np.int64)]),
        senders=cat([topo.senders, np.full(extra, second, dtype=np.int64)]),
        images=cat([topo.images, np.zeros((extra, 3), dtype=np.int64)]),
        edge_batch=cat([topo.edge_batch, np.full(extra, last, dtype=np.int64)]),
    )
    return padded, pad
