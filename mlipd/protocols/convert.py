"""i-PI messages <-> mlipd values: the one place where atomic units and i-PI's
column-vector cell meet Å, eV and ASE's row-vector cell.

Atomic numbers and periodicity never travel over i-PI; the caller supplies them.
Virial: mlipd's ``Result.virial`` is ``-dE/dstrain`` in eV (ASE: ``-V * stress``);
on the wire it is the same tensor transposed and in Hartree, exactly what ASE's
``IPIProtocol.sendforce`` and i-PI's ``pes/_ase.py`` send.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from mlipd.protocols.ipi import ForceReady, PosData
from mlipd.types import Result, Structure
from mlipd.units import BOHR_ANG, FORCE_AU_EV_ANG, HARTREE_EV


def structures_from_posdata(m: PosData, *, numbers: np.ndarray, pbc: np.ndarray
                            ) -> list[Structure]:
    """One Structure per batch entry; ``numbers`` (N,) and ``pbc`` (3,) from a template."""
    return [
        Structure(numbers=numbers, positions=m.positions[b] * BOHR_ANG,
                  cell=m.cells[b].T * BOHR_ANG, pbc=pbc)
        for b in range(m.batch)
    ]


def posdata_from_structures(structures: Sequence[Structure]) -> PosData:
    """What a server sends for ``structures`` (all with the same atom count)."""
    cells = np.stack([s.cell.T / BOHR_ANG for s in structures])
    # i-PI sends inv(h) (pinv here, so that a cluster's zero cell still encodes)
    return PosData(cells=cells, inverse_cells=np.linalg.pinv(cells),
                   positions=np.stack([s.positions / BOHR_ANG for s in structures]))


def forceready_from_results(results: Sequence[Result]) -> ForceReady:
    """Results (eV, eV/Å) to the wire; a missing virial is sent as zeros because
    the wire has no "absent" (i-PI then sees no pressure contribution)."""
    zeros = np.zeros((3, 3))
    return ForceReady(
        energies=np.array([r.energy for r in results], dtype=np.float64) / HARTREE_EV,
        forces=np.stack([r.forces for r in results]) / FORCE_AU_EV_ANG,
        virials=np.stack([(zeros if r.virial is None else r.virial).T for r in results])
        / HARTREE_EV,
        extras=tuple(encode_extras(r.extras) for r in results),
    )


def results_from_forceready(m: ForceReady) -> list[Result]:
    """The inverse of ``forceready_from_results`` (servers and tests)."""
    return [
        Result(energy=float(m.energies[b]) * HARTREE_EV,
               forces=m.forces[b] * FORCE_AU_EV_ANG,
               virial=m.virials[b].T * HARTREE_EV,
               extras=decode_extras(m.extras[b]))
        for b in range(m.batch)
    ]


def encode_extras(extras) -> bytes:
    """JSON, as i-PI's ``parse_extra`` expects; nothing at all when there are none."""
    return json.dumps(dict(extras)).encode("utf-8") if extras else b""


def decode_extras(raw: bytes) -> dict:
    """JSON extras; non-JSON (e.g. ASE's single NUL byte) is kept under ``raw``
    unless blank, as i-PI does."""
    text = raw.decode("utf-8", errors="replace")
    if not text.strip(" \t\r\n\x00"):
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"raw": text}
