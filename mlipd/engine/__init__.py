"""One step of physics on any number of ranks: neighbour list, partition, halo, model, forces.

``make_engine`` is the one way front ends get an engine; every engine has
``compute(structures, *, virial=True) -> list[Result]``, ``spec`` (the model's
``ModelSpec``), ``world_size``, ``calls`` (engine calls so far) and ``close()``.
"""

from __future__ import annotations

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
    if ranks == 1:
        from mlipd.engine.local import LocalEngine
        from mlipd.models.registry import load_model

        return LocalEngine(load_model(model), device=device, dtype=DTYPES[dtype])
    from mlipd.engine.distributed import DistributedEngine

    return DistributedEngine(model, device=device, dtype=DTYPES[dtype], ranks=ranks)
