"""TensorNet's per-edge work and halo rows in a compact form of its 3x3 tensors.

TensorNet (matgl/layers/_embedding.py ``TensorEmbedding``, _graph_convolution.py
``TensorNetInteraction``) carries per atom and channel a 3x3 tensor split into a scalar
part I = s·1, a skew part A and a symmetric traceless part S, and its messages scale
each part of the *sender's* tensor by an edge weight: f_I·I_j + f_A·A_j + f_S·S_j. matgl
does that on full 3x3 matrices: three (E, units, 3, 3) products and three scatters per
layer. Here the parts travel as their 10 independent numbers per channel,
``[s | A01 A02 A12 | S00 S01 S02 S11 S12 S22]``, so an edge moves 10 numbers where
matgl moves 27, and the halo exchange sends 10 per channel where the full tensor X has 9
(it must send the parts: the senders' parts are what the messages read, and computing
them from a halo X would be node work on halo rows). Node work stays on full matrices,
with matgl's own functions and modules.

The aggregation is our own ``index_add`` on a contiguous source: matgl's reads the
channels-last view its linears return, and with int64 indices torch's CPU index_add
then takes a strided scatter path much slower than on contiguous rows, which made
mlipd slower than matgl's own calculator (whose graphs carry int32 indices and avoid that path).
"""

from __future__ import annotations

import torch

# rows and columns of the parts' entries in a 3x3 matrix
_A_ROWS, _A_COLS = (0, 0, 1), (1, 2, 2)
_S_ROWS, _S_COLS = (0, 0, 0, 1, 1, 2), (0, 1, 2, 1, 2, 2)
_SPLIT = (1, 3, 6)


def pack(scalars: torch.Tensor, skew: torch.Tensor, traceless: torch.Tensor) -> torch.Tensor:
    """Full parts (n, u, 3, 3) each -> (n, u, 10)."""
    return torch.cat([scalars[..., 0, 0, None], skew[..., _A_ROWS, _A_COLS],
                      traceless[..., _S_ROWS, _S_COLS]], dim=-1)


def unpack(parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, u, 10) -> the full scalar, skew and symmetric traceless parts (n, u, 3, 3)."""
    s, a, t = parts.split(_SPLIT, dim=-1)
    eye = torch.eye(3, dtype=parts.dtype, device=parts.device)
    scalars = s[..., None] * eye
    zero = torch.zeros_like(a[..., 0])
    skew = torch.stack([zero, a[..., 0], a[..., 1],
                        -a[..., 0], zero, a[..., 2],
                        -a[..., 1], -a[..., 2], zero], dim=-1).unflatten(-1, (3, 3))
    traceless = torch.stack([t[..., 0], t[..., 1], t[..., 2],
                             t[..., 1], t[..., 3], t[..., 4],
                             t[..., 2], t[..., 4], t[..., 5]], dim=-1).unflatten(-1, (3, 3))
    return scalars, skew, traceless


def edge_parts(unit: torch.Tensor) -> torch.Tensor:
    """(E, 10) parts of 1, skew(v) and sym(v) - tr/3 for unit vectors v (E, 3), as
    matgl's ``vector_to_skewtensor`` / ``vector_to_symtensor`` build them."""
    x, y, z = unit.unbind(-1)
    third = (x * x + y * y + z * z) / 3.0
    return torch.stack([torch.ones_like(x), -z, y, -x,
                        x * x - third, x * y, x * z, y * y - third, y * z, z * z - third], -1)


def spread(weights: torch.Tensor) -> torch.Tensor:
    """Per-part edge weights (E, u, 3) -> (E, u, 10), one per entry of ``pack``."""
    # output_size: the host knows the width (10), so no read of the repeats back
    return weights.repeat_interleave(torch.tensor(_SPLIT, device=weights.device), dim=-1,
                                     output_size=sum(_SPLIT))


def aggregate(messages: torch.Tensor, receivers: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sum of edge rows (E, ...) into their receivers: (n_rows, ...)."""
    out = messages.new_zeros((n_rows, *messages.shape[1:]))
    return out.index_add(0, receivers, messages.contiguous())
