"""eSEN / UMA (fairchem-core's ``eSCNMDBackbone``): not available in this release.

The entry point ``esen`` exists so that ``--model esen:...`` fails with the reason
instead of a misleading "pip install" hint. The adapter is blocked on the environment:
fairchem-core 2.24.0 (the release that accepts torch 2.13) requires ``e3nn>=0.5``,
while mace-torch 0.3.16 pins ``e3nn==0.4.4``; one environment cannot hold both, and
installing fairchem-core would break the MACE adapter. It would also pull
``nvalchemi-toolkit-ops`` (which switches matgl's TensorNet to its warp kernels by
default) and downgrade setuptools (< 81). See docs/models.md.
"""

from __future__ import annotations

BLOCKED = (
    "esen: no adapter in this mlipd release. fairchem-core 2.24.0 (the release for "
    "torch 2.13) requires e3nn>=0.5 while mace-torch 0.3.16 pins e3nn==0.4.4, so the two "
    "cannot share an environment (installing fairchem-core would break the mace adapter); "
    "see docs/models.md"
)


class ESENModel:
    """Placeholder that refuses to load, with the reason (see the module docstring)."""

    def __init__(self, *_args: object, **_options: object) -> None:
        raise ValueError(BLOCKED)
