"""Peak memory of one engine call against the memory budget's estimate (a child process
of ``test_memory_estimate.py``; one JSON line per size).

argv: model ('chgnet' | 'mace' | 'tensornet' | 'sevennet' | 'esen'), dtype, lattice
('si': diamond Si; 'cu': fcc at a = 3.0 Å, 12 bonds within CHGNet's 3 Å, so angles
weigh), then repetitions of the cubic cell such as 2x2x2. The peak is VmHWM after a
reset (``/proc/self/clear_refs``) minus the resident memory before the call; a fresh
engine per size (its first call), after a warm-up call of the model on one cell.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import torch
from ase.build import bulk

from mlipd.engine.budget import exact_counts
from mlipd.engine.single_rank import SingleRankEngine
from mlipd.model_api import memory_cost
from mlipd.types import Structure

torch.set_num_threads(1)

def rss() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                  .splitlines())
    return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)

def build(name):
    if name in ("lj", "reference"):
        from mlipd.models.registry import load_model
        return load_model(name), 18
    if name == "chgnet":
        from mlipd.models.registry import load_model
        return load_model("chgnet"), 14
    if name == "mace":
        from test_mace import build_mace

        from mlipd.models.mace import MaceModel
        net = build_mace(hidden="32x0e+32x1o", max_ell=3, correlation=3)
        return MaceModel(model=net, recompute="0", chunk=0), 14
    if name == "tensornet":
        import matgl
        from test_tensornet import build_potential

        from mlipd.models.tensornet import TensorNetModel
        matgl.set_default_dtype("float", 64)
        return TensorNetModel(potential=build_potential()), 14
    if name == "sevennet":
        from mlipd.models.registry import load_model
        return load_model("sevennet"), 14
    if name == "esen":
        import tempfile

        from test_esen import _save

        from mlipd.models.esen import ESENModel

        path = _save(Path(tempfile.mkdtemp()) / "esen.pt", 300, 0)
        return ESENModel(str(path)), 14
    raise SystemExit(name)

name, dtype, lattice = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
model, z = build(name)
rng = np.random.default_rng(0)
def make(reps):
    at = (bulk("Si", "diamond", a=5.43, cubic=True) if lattice == "si"
          else bulk("Cu", "fcc", a=3.0, cubic=True)).repeat(reps)
    at.numbers[:] = z
    at.positions += rng.normal(scale=0.05, size=at.positions.shape)
    return Structure.from_atoms(at)
SingleRankEngine(model, dtype=dtype, skin=0.5).compute([make((1, 1, 1))])  # warm-up
for r in sys.argv[4:]:
    s = make(tuple(int(x) for x in r.split("x")))
    eng = SingleRankEngine(model, dtype=dtype, skin=0.5)
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
    base, _ = rss()
    eng.compute([s])
    _, peak = rss()
    cost = memory_cost(model, dtype)
    c = exact_counts(s, cutoff=model.spec.cutoff, radius=model.spec.cutoff + 0.5, cost=cost)
    sys.stdout.write(json.dumps(dict(model=name, lattice=lattice, atoms=s.n_atoms, edges=c.edges,
                          angles=c.angles, measured=peak - base, estimate=c.bytes(cost),
                          ratio=round(c.bytes(cost) / (peak - base), 2))) + "\n")
    sys.stdout.flush()
