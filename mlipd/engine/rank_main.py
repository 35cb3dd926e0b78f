"""The program of a spawned rank: ``python -m mlipd.engine.rank_main SPEC``.

``DistributedEngine`` starts its ranks 1..P-1 with this module (``rank_procs``), never
with ``multiprocessing``: a spawn of ``__main__`` re-runs the user's script, which
without ``if __name__ == "__main__":`` starts ranks of its own and hangs. Here a rank
imports mlipd and torch only; the model (a registry name, or a factory importable by
name) reaches it from rank 0 over the process group.

SPEC is one JSON object: rank, world_size, backend, host, port (rank 0's TCPStore),
timeout_s, threads, parent (rank 0's pid), path (rank 0's ``sys.path``, so a factory
importable there is importable here), beats_fd and errors_fd (inherited descriptors:
the heartbeat slots and the pipe a failure is reported through).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import struct
import sys
import threading
import time

HEARTBEAT_PERIOD_S = 0.5  # how often a rank writes its heartbeat (and checks its parent)
SLOT = struct.Struct("d")  # one float64 per rank 1..P-1: CLOCK_MONOTONIC of its last beat


def _beat(beats: mmap.mmap, rank: int, parent: int) -> None:
    """Write this rank's slot (the monotonic clock is shared by every process of the
    host) while the process is scheduled; leave when rank 0 is gone, since nobody
    will stop this rank then."""
    while True:
        SLOT.pack_into(beats, SLOT.size * (rank - 1), time.monotonic())
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(HEARTBEAT_PERIOD_S)


def _reporter(fd: int):
    def report(text: str) -> None:
        # one write below PIPE_BUF: atomic, so ranks sharing the pipe never interleave;
        # rank 0 may be gone (EPIPE): the rank exits anyway
        with contextlib.suppress(OSError):
            os.write(fd, (text.replace("\n", " ")[:2000] + "\n").encode(errors="replace"))
    return report


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((sys.argv[1:] if argv is None else argv)[0])
    rank = int(spec["rank"])
    sys.path[:] = list(dict.fromkeys([*spec["path"], *sys.path]))
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s: %(message)s")
    from mlipd.quiet import quiet_third_party

    quiet_third_party()
    beats = mmap.mmap(spec["beats_fd"], SLOT.size * max(spec["world_size"] - 1, 1))
    threading.Thread(target=_beat, args=(beats, rank, spec["parent"]), daemon=True,
                     name="mlipd-heartbeat").start()
    from mlipd.engine.ranks import follower_main

    return follower_main(rank, spec["world_size"], backend=spec["backend"],
                         timeout_s=spec["timeout_s"], host=spec["host"], port=spec["port"],
                         local_rank=rank, threads=spec["threads"],
                         report=_reporter(spec["errors_fd"]))


if __name__ == "__main__":
    sys.exit(main())
