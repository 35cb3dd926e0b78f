"""``mlipd`` as one process of a job started by torchrun or srun: rank 0 runs the
command (it owns all I/O), every other rank follows its engine.

    torchrun --nnodes 2 --nproc-per-node 4 --master-addr HOST --master-port 29500 \\
        -m mlipd.launch serve --model mace:m.model --zmq tcp://127.0.0.1:5555
    srun --nodes 2 --ntasks-per-node 4 mlipd serve --model mace:m.model --zmq ...

The ``mlipd`` command is this module's ``main``, so ``srun mlipd ...`` needs nothing
else. Where a process sits comes from the launcher's own variables: torchrun's
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``; Slurm's
``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID`` (inside an srun step only).
The rendezvous is ``MASTER_ADDR``/``MASTER_PORT`` where set, else (Slurm) the first host
of the step's node list and a port derived from the job id. ``--ranks`` is ignored
there: the job's size is the launcher's.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only for commands that run an engine (not --version)
    from mlipd.engine.ranks import World

ENGINE_COMMANDS = ("drive", "serve")  # commands that run an engine on every rank
SLURM_PORT_BASE = 20000  # MASTER_PORT default under Slurm: base + job id mod 20000


def detect_world(env: Mapping[str, str] = os.environ) -> World | None:
    """This process's place in a torchrun or srun job of several ranks, else None."""
    from mlipd.engine.ranks import World

    if "RANK" in env and int(env.get("WORLD_SIZE", "1")) > 1:  # torchrun
        size = int(env["WORLD_SIZE"])
        return World(rank=int(env["RANK"]), size=size,
                     local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
                     local_size=int(env.get("LOCAL_WORLD_SIZE", size)),
                     host=env.get("MASTER_ADDR", "127.0.0.1"),
                     port=int(env.get("MASTER_PORT", "29500")))
    size = int(env.get("SLURM_STEP_NUM_TASKS", "1"))  # set by srun, not by sbatch's shell
    if "SLURM_PROCID" in env and size > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        per_node = re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE", "") or str(size))
        return World(rank=int(env["SLURM_PROCID"]), size=size,
                     local_rank=int(env.get("SLURM_LOCALID", "0")),
                     local_size=int(per_node.group()) if per_node else size,
                     host=env.get("MASTER_ADDR") or first_host(nodes),
                     port=int(env.get("MASTER_PORT") or SLURM_PORT_BASE
                              + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    return None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[03-05,09],cpu1`` -> ``gpu03``."""
    m = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist.strip())
    if m is None:
        raise ValueError(f"cannot read a host from the node list {nodelist!r}")
    return m.group(1) + (m.group(2) or "")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``mlipd`` command: plain, or as a rank of a torchrun/srun job."""
    from mlipd import cli

    argv = sys.argv[1:] if argv is None else list(argv)
    args = cli.parse(argv)
    world = detect_world() if args.command in ENGINE_COMMANDS else None
    if world is None:
        return cli.run(args)
    if world.rank == 0:
        return cli.run(args, world=world)
    return _follow(args, world)


def _follow(args, world: World) -> int:
    import logging

    from mlipd.engine.devices import node_devices, pick_backend
    from mlipd.engine.ranks import follower_main
    from mlipd.engine.threads import threads_per_rank
    from mlipd.errors import SetupError

    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s rank{world.rank} %(name)s %(levelname)s: "
                               "%(message)s")
    from mlipd.quiet import quiet_third_party

    quiet_third_party()
    try:
        backend = pick_backend(args.backend, node_devices(args.device, args.devices),
                               world.local_size)
        threads = threads_per_rank(args.threads, world.local_size)
    except SetupError as e:
        logging.getLogger("mlipd").error("%s", e)
        return 2
    return follower_main(world.rank, world.size, backend=backend,
                         timeout_s=args.collective_timeout, host=world.host, port=world.port,
                         local_rank=world.local_rank, threads=threads)


if __name__ == "__main__":
    sys.exit(main())
