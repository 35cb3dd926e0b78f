"""One step of physics on any number of ranks: neighbour list, partition, halo, model,
forces. Front ends use ``make_engine`` and the ``Engine`` interface (``api``)."""

from mlipd.engine.api import DTYPES, Engine, make_engine

__all__ = ["DTYPES", "Engine", "make_engine"]
