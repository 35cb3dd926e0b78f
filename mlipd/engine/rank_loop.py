"""The per-step protocol every rank follows, and its one-rank special case.

Rank 0 (the front end, which owns all I/O) drives; the other ranks run ``follow``:

    rank 0:  broadcast StepHeader -> share frame -> Step.run -> gather -> parts
    others:  receive StepHeader   -> share frame -> Step.run -> gather
    a StepHeader with cmd="stop" ends ``follow``.

The frame travels as broadcasts: positions (N, 3) and cells every step; atomic numbers
and the owner of every atom only when the partition is rebuilt. The owner array is
computed on rank 0 alone so all ranks agree on it bit for bit, also across nodes.
At one rank (``step.comm is None``) nothing is broadcast or gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlipd.engine.results import pack, packed_size
from mlipd.engine.step import Frame, Step
from mlipd.engine.topology import GEOMETRY_DTYPE

STEP, STOP = "step", "stop"


@dataclass(frozen=True)
class StepHeader:
    cmd: str
    counts: tuple[int, ...] = ()
    pbc: tuple[tuple[bool, bool, bool], ...] = ()
    virial: bool = True
    rebuild: bool = False


@dataclass(frozen=True)
class Positions:
    """A step's coordinates on rank 0: positions (N, 3) Å, cells (B, 3, 3) Å (float64)."""

    positions: np.ndarray
    cells: np.ndarray


class RankLoop:
    """One rank's side of every step; keeps the last partition's numbers and owners."""

    def __init__(self, step: Step) -> None:
        self.step = step
        self.comm = step.comm
        self._numbers: np.ndarray | None = None
        self.owner: np.ndarray | None = None  # (N,) owner rank of every atom, last partition

    def execute(self, header: StepHeader, coords: Positions | None = None,
                frame: Frame | None = None) -> list[np.ndarray] | None:
        """One step on this rank: rank 0 passes the coordinates (and on a rebuild the
        frame) and gets every rank's packed output; other ranks get None."""
        step = self.step
        step.h2d.new_step()
        if self.comm is None:
            if header.rebuild:
                step.rebuild(frame)
            packed = pack(step.run(step.h2d(coords.positions, GEOMETRY_DTYPE),
                                   step.h2d(coords.cells, GEOMETRY_DTYPE), virial=header.virial))
            return [packed.cpu().numpy()]
        if coords is not None:
            self.comm.broadcast_object(header)
        positions, cells = self._share(header, coords, frame)
        packed = pack(step.run(positions, cells, virial=header.virial))
        owned = np.bincount(self.owner, minlength=self.comm.world_size).max()
        n_max = packed_size(len(header.counts), int(owned), step.layout)
        gathered = self.comm.gather_rows(packed.view(-1, 1), n_max=n_max)
        return None if gathered is None else [g.view(-1).numpy() for g in gathered]

    def _share(self, header: StepHeader, coords: Positions | None,
               frame: Frame | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and cells on this rank's device; on a rebuild, the new partition."""
        c, h2d = self.comm, self.step.h2d
        n, b = sum(header.counts), len(header.counts)
        if header.rebuild:
            self._numbers = c.broadcast_array(frame and frame.numbers, shape=(n,),
                                              dtype=torch.long)
            self.owner = c.broadcast_array(frame and frame.owner, shape=(n,), dtype=torch.long)
        if self._numbers is None or self.owner is None:
            raise RuntimeError("first step must rebuild the partition")
        if coords is not None:  # rank 0: upload, then send
            positions = c.broadcast_tensor(h2d(coords.positions, GEOMETRY_DTYPE))
            cells = c.broadcast_tensor(h2d(coords.cells, GEOMETRY_DTYPE))
        else:
            empty = lambda *shape: torch.empty(shape, dtype=GEOMETRY_DTYPE, device=c.wire)  # noqa: E731
            positions = h2d(c.broadcast_tensor(empty(n, 3)), GEOMETRY_DTYPE)
            cells = h2d(c.broadcast_tensor(empty(b, 3, 3)), GEOMETRY_DTYPE)
        if header.rebuild:
            offsets = np.concatenate([[0], np.cumsum(header.counts)]).astype(np.int64)
            self.step.rebuild(frame or Frame(
                numbers=self._numbers, positions=positions.cpu().numpy(),
                cells=cells.cpu().numpy(), pbc=np.array(header.pbc, dtype=bool).reshape(b, 3),
                offsets=offsets, owner=self.owner))
        return positions, cells

    def follow(self) -> None:
        """Non-zero ranks: run steps until rank 0 says stop."""
        while True:
            header = self.comm.broadcast_object()
            if header.cmd == STOP:
                return
            self.execute(header)

    def stop(self) -> None:
        """Rank 0: release the followers."""
        if self.comm is not None:
            self.comm.broadcast_object(StepHeader(cmd=STOP))
