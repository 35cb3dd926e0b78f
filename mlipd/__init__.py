"""mlipd: a long-running, graph-partitioned force server for machine-learned potentials."""

from mlipd.types import Result, Structure

__version__ = "0.1.0"
__all__ = ["Result", "Structure", "__version__"]
