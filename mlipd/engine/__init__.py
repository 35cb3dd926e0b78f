"""One step of physics on any number of ranks: neighbour list, partition, halo, model, forces.

``make_engine`` is the one way front ends get an engine; every engine has
``compute(structures, *, virial=True) -> list[Result]``, ``spec`` (the model's
``ModelSpec``), ``world_size``, ``calls`` (engine calls so far) and ``close()``.
"""

from __future__ import annotations

import os

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def make_engine(model: str, *, device: str = "cpu", dtype: str | None = None, ranks: int = 1):
    """Load ``model`` (``name`` or ``name:path``) and return an engine on ``ranks`` ranks.

    dtype defaults to float32 on GPU and float64 on CPU.
    """
    from mlipd.errors import SetupError

    if dtype is None:
        dtype = "float32" if device.startswith("cuda") else "float64"
    if dtype not in DTYPES:
        raise SetupError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if ranks < 1:
        raise SetupError(f"--ranks must be >= 1, got {ranks}")
    if os.environ.get("MLIPD_TORCHRUN") == "1":
        # rank 0 of a torchrun job (python -m mlipd.engine.ranks): join its ranks
        from mlipd.engine.distributed import DistributedEngine

        return DistributedEngine(model, device=device, dtype=DTYPES[dtype], attach=True)
    if ranks == 1:
        from mlipd.engine.local import LocalEngine
        from mlipd.models.registry import load_model

        loaded = load_model(model)
        if getattr(loaded, "whole_structure", False):
            # a whole-structure calculator (mlipd.models.ase_generic) brings its own engine
            return loaded.engine(device=device, dtype=DTYPES[dtype])
        return LocalEngine(loaded, device=device, dtype=DTYPES[dtype])
    if _whole_structure(model):
        raise SetupError(
            f"{model!r} is a single-device (whole-structure) model and cannot run on "
            f"{ranks} ranks: distributing it needs an mlipd adapter (see docs/models.md)"
        )
    from mlipd.engine.distributed import DistributedEngine

    return DistributedEngine(model, device=device, dtype=DTYPES[dtype], ranks=ranks)


def _whole_structure(model: str) -> bool:
    """Whether the entry point behind ``model`` declares ``whole_structure`` (no import of
    the model's own package beyond its adapter module)."""
    from importlib.metadata import entry_points

    name = model.partition(":")[0]
    for ep in entry_points(group="mlipd.models", name=name):
        try:
            return bool(getattr(ep.load(), "whole_structure", False))
        except ImportError:
            return False  # the distributed engine reports the missing package
    return False
