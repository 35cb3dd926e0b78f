"""Image shifts of edges and the virial from the cell gradient, shared by the eager and the
compiled step.

The virial is taken from the cell gradient, not from a strain tensor: for
x -> x (1 + eps), cell -> cell (1 + eps), -dE/d(eps) at eps = 0 is
-(sum_i x_i^T dE/dx_i + cell^T dE/dcell). It saves two (N, 3) x (3, 3) products and
their backward, a large share of a call when there are few neighbours per atom.
"""

from __future__ import annotations

import torch


def edge_shifts(images: torch.Tensor, cells: torch.Tensor, edge_batch: torch.Tensor
                ) -> torch.Tensor:
    """(E, 3) Å: images (E, 3) in lattice vectors times the cell of each edge's structure."""
    if cells.shape[0] == 1:  # a view, not cells[0]: select's backward allocates and copies
        return images @ cells.view(3, 3)
    return torch.bmm(images.unsqueeze(1), cells[edge_batch]).squeeze(1)


def cell_virial(x: torch.Tensor, g_x: torch.Tensor, cells: torch.Tensor,
                g_cells: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) eV: dE/d(eps) = x^T dE/dx + cell^T dE/dcell per structure (module doc)."""
    if cells.shape[0] == 1:  # two products, one of them accumulating: fewest ops per step
        c, g = cells.view(3, 3), g_cells.view(3, 3)
        return torch.addmm(c.T @ g, x.T, g_x).unsqueeze(0)
    w = cells.transpose(1, 2) @ g_cells
    outer = (x.unsqueeze(2) * g_x.unsqueeze(1)).view(-1, 9)
    return w + torch.zeros(cells.shape[0], 9, dtype=x.dtype, device=x.device).index_add(
        0, batch, outer).view(-1, 3, 3)
