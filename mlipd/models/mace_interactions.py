"""mace's interaction blocks cut where they read other atoms, so that every rank does
node work on its owned atoms only.

Each interaction of mace/modules/blocks.py (0.3.16) is, in order: per-node maps of the
atom's features (``linear_up``, the skip connection, and for some variants embeddings or
a down-projection), per-edge messages that read those maps at the *senders* and sum into
the receivers, then per-node maps of the summed message. Here the three parts are
separate calls: ``node`` on owned rows, whose output rows the messages read (``payload``)
are exchanged to the halo by the caller; ``edges`` for a contiguous range of receivers
(edge chunking); ``finish`` on owned rows. Only the interaction classes below are
accepted (any other, or a subclass, is refused at load: its forward could differ).

Every call reuses the block's own modules and weights; the maths is that of each class's
``forward``, re-ordered but not changed (messages summed by receiver range).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mace.modules import blocks
from mace.tools.scatter import scatter_sum

# class -> (skip connection before the messages, density normalisation, kind)
VARIANTS = {
    blocks.RealAgnosticInteractionBlock: ("none", False, "plain"),
    blocks.RealAgnosticResidualInteractionBlock: ("skip_tp", False, "plain"),
    blocks.RealAgnosticDensityInteractionBlock: ("none", True, "plain"),
    blocks.RealAgnosticDensityResidualInteractionBlock: ("skip_tp", True, "plain"),
    blocks.RealAgnosticAttResidualInteractionBlock: ("skip_linear", False, "attention"),
    blocks.RealAgnosticResidualNonLinearInteractionBlock: ("skip_linear", True, "nonlinear"),
}


def check_supported(block: torch.nn.Module) -> None:
    if type(block) not in VARIANTS:
        names = ", ".join(sorted(c.__name__ for c in VARIANTS))
        raise ValueError(f"mace: interaction block {type(block).__name__} is not supported "
                         f"(supported: {names})")


@dataclass
class NodeOut:
    """What ``node`` computed for the owned atoms.

    payload:   (n_owned, k) rows the messages read at their senders (exchange these)
    receiver:  (n_owned, k') rows the messages read at their receivers, or None
    sc:        the skip connection for the product, or None
    residual:  the non-linear block's ``linear_res`` rows, or None
    """

    payload: torch.Tensor
    receiver: torch.Tensor | None
    sc: torch.Tensor | None
    residual: torch.Tensor | None


class SplitInteraction:
    """One interaction block as ``node`` -> (exchange) -> ``edges`` per chunk -> ``finish``."""

    def __init__(self, block: torch.nn.Module) -> None:
        check_supported(block)
        self.block = block
        self.skip, self.density, self.kind = VARIANTS[type(block)]
        self.d_up = int(block.linear_up.irreps_out.dim)
        self.fused = hasattr(block, "conv_fusion")  # cuEquivariance's fused convolution

    def node(self, feats: torch.Tensor, attrs: torch.Tensor) -> NodeOut:
        """Per-node maps before the messages, on owned rows (feats, attrs: (n_owned, ...))."""
        b = self.block
        sc = None
        if self.skip == "skip_tp":
            sc = b.skip_tp(feats, attrs)
        elif self.skip == "skip_linear":
            sc = b.skip_linear(feats) if self.kind == "attention" else b.skip_tp(feats)
        up = b.linear_up(feats)
        if self.kind == "attention":
            return NodeOut(torch.cat([up, b.linear_down(feats)], dim=-1), None, sc, None)
        if self.kind == "nonlinear":
            return NodeOut(torch.cat([up, b.source_embedding(attrs)], dim=-1),
                           b.target_embedding(attrs), sc, b.linear_res(up))
        return NodeOut(up, None, sc, None)

    def edges(self, payload: torch.Tensor, receiver: torch.Tensor | None,
              edge_attrs: torch.Tensor, edge_feats: torch.Tensor, cutoff: torch.Tensor | None,
              senders: torch.Tensor, receivers: torch.Tensor, first_row: int, n_rows: int
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Messages summed into receivers ``first_row .. first_row + n_rows - 1`` from the
        edges given (all of whose receivers lie there): (n_rows, mid) and the density
        (n_rows, 1) or None. ``payload``: (n_local, k), the senders' ``node`` rows."""
        b = self.block
        up = payload if self.kind == "plain" else payload[:, : self.d_up]
        if self.kind == "attention":
            down = payload[:, self.d_up:]
            edge_feats = torch.cat([edge_feats, down[senders], down[receivers]], dim=-1)
        elif self.kind == "nonlinear":
            edge_feats = torch.cat([edge_feats, payload[senders, self.d_up:],
                                    receiver[receivers]], dim=-1)
        weights = b.conv_tp_weights(edge_feats)
        density = torch.tanh(b.density_fn(edge_feats) ** 2) if self.density else None
        if cutoff is not None:
            weights = weights * cutoff
            density = None if density is None else density * cutoff
        local = receivers - first_row
        if self.fused:  # sums into every row of ``up``: keep ours
            edge_index = torch.stack([senders, receivers])
            message = b.conv_tp(up, edge_attrs, weights, edge_index)[first_row:first_row + n_rows]
        else:
            message = scatter_sum(b.conv_tp(up[senders], edge_attrs, weights), local, dim=0,
                                  dim_size=n_rows)
        if density is not None:
            density = scatter_sum(density, local, dim=0, dim_size=n_rows)
        return message, density

    def finish(self, message: torch.Tensor, density: torch.Tensor | None,
               sc: torch.Tensor | None, residual: torch.Tensor | None, attrs: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-node maps after the messages, on owned rows (``sc``, ``residual``: from
        ``node``): (features, skip connection), what the block's ``forward`` returns."""
        b = self.block
        if self.kind == "nonlinear":
            message = b.linear_1(message) / (density * b.beta + b.alpha) + residual
            message = b.linear_2(b.equivariant_nonlin(message))
            return b.reshape(message), sc
        scale = (density + 1) if self.density else b.avg_num_neighbors
        message = b.linear(message) / scale
        if self.skip == "none":  # the plain blocks mix species after the messages
            return b.reshape(b.skip_tp(message, attrs)), None
        return b.reshape(message), sc
