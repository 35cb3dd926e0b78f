"""The per-step protocol every rank follows, and its one-rank special case.

Rank 0 (the caller's process, which owns all I/O) drives; the other ranks run ``follow``:

    rank 0:  broadcast StepHeader -> share frame -> Step.run -> gather -> parts
    others:  receive StepHeader   -> share frame -> Step.run -> gather
    a StepHeader with cmd="stop" ends ``follow``.

The header is a fixed-size int64 tensor (one broadcast of ``HEADER_WORDS`` numbers, no
pickling), followed on a rebuild by the structures' sizes and pbc ((B, 4) int64). The
frame travels as broadcasts: positions (N, 3) and cells every step; atomic numbers
and the owner of every atom only when the partition is rebuilt. The owner array is
computed on rank 0 alone so all ranks agree on it bit for bit, also across nodes.
At one rank (``step.comm is None``) nothing is broadcast or gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlipd.engine.results import RankOutput, pack, packed_size, to_host, unpack
from mlipd.engine.step import Frame, Step
from mlipd.engine.topology import GEOMETRY_DTYPE

STEP, STOP = "step", "stop"
_COMMANDS = (STEP, STOP)
HEADER_WORDS = 5  # command, virial, rebuild, structures B, atoms N


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

    def __init__(self, step: Step, *, run=None) -> None:
        self.step = step
        self.run = run  # at one rank: what runs the step (a GraphedRun), else step.run
        self.comm = step.comm
        self._last: StepHeader | None = None  # sizes and pbc of the last rebuild
        self._numbers: np.ndarray | None = None
        self.owner: np.ndarray | None = None  # (N,) owner rank of every atom, last partition

    def execute(self, header: StepHeader, coords: Positions | None = None,
                frame: Frame | None = None) -> list[RankOutput] | None:
        """One step on this rank: rank 0 passes the coordinates (and on a rebuild the
        frame) and gets every rank's output on the host; other ranks get None."""
        step = self.step
        step.h2d.new_step()
        if self.comm is None:
            if header.rebuild:
                step.rebuild(frame)
            positions = step.h2d(coords.positions, GEOMETRY_DTYPE, staged=True)
            cells = step.h2d(coords.cells, GEOMETRY_DTYPE, staged=True)
            if self.run is None:
                out = step.run(positions, cells, virial=header.virial)
            else:
                out = self.run(positions, cells, virial=header.virial, rebuilt=header.rebuild)
            return [to_host(out, step.layout)]
        if coords is not None:
            self._send_header(header)
        positions, cells = self._share(header, coords, frame)
        packed = pack(step.run(positions, cells, virial=header.virial))
        owned = np.bincount(self.owner, minlength=self.comm.world_size).max()
        n_max = packed_size(len(header.counts), int(owned), step.layout)
        gathered = self.comm.gather_rows(packed.view(-1, 1), n_max=n_max)
        if gathered is None:
            return None
        return [unpack(g.view(-1), len(header.counts), step.layout) for g in gathered]

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
            positions = c.broadcast_tensor(h2d(coords.positions, GEOMETRY_DTYPE, staged=True))
            cells = c.broadcast_tensor(h2d(coords.cells, GEOMETRY_DTYPE, staged=True))
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
            header = self._receive_header()
            if header.cmd == STOP:
                return
            self.execute(header)

    def stop(self) -> None:
        """Rank 0: release the followers."""
        if self.comm is not None:
            self._send_header(StepHeader(cmd=STOP))

    def _send_header(self, header: StepHeader) -> None:
        words = encode_header(header)
        self.comm.broadcast_tensor(words)
        if header.cmd == STEP and header.rebuild:
            self.comm.broadcast_tensor(encode_structures(header))
            self._last = header

    def _receive_header(self) -> StepHeader:
        """The header rank 0 sent; the structures' sizes and pbc come with a rebuild and
        are kept for the steps that reuse it."""
        words = self.comm.broadcast_tensor(torch.zeros(HEADER_WORDS, dtype=torch.long))
        cmd, virial, rebuild, b, n = words.tolist()
        if _COMMANDS[cmd] == STOP:
            return StepHeader(cmd=STOP)
        if rebuild:
            table = self.comm.broadcast_tensor(torch.zeros((b, 4), dtype=torch.long))
            self._last = decode_structures(table)
        last = self._last
        if last is None or len(last.counts) != b or sum(last.counts) != n:
            raise RuntimeError("a step without rebuild changed the batch's sizes")
        return StepHeader(cmd=STEP, counts=last.counts, pbc=last.pbc, virial=bool(virial),
                          rebuild=bool(rebuild))


def encode_header(header: StepHeader) -> torch.Tensor:
    """(HEADER_WORDS,) int64: command, virial, rebuild, structures, atoms."""
    return torch.tensor([_COMMANDS.index(header.cmd), int(header.virial), int(header.rebuild),
                         len(header.counts), sum(header.counts)], dtype=torch.long)


def encode_structures(header: StepHeader) -> torch.Tensor:
    """(B, 4) int64: atoms and pbc (3) of each structure."""
    return torch.tensor([[c, *map(int, p)] for c, p in zip(header.counts, header.pbc,
                                                              strict=True)],
                        dtype=torch.long).reshape(len(header.counts), 4)


def decode_structures(table: torch.Tensor) -> StepHeader:
    rows = table.tolist()
    return StepHeader(cmd=STEP, counts=tuple(r[0] for r in rows),
                      pbc=tuple(tuple(bool(x) for x in r[1:]) for r in rows))
