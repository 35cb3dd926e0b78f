"""i-PI's own Python driver with a package's ASE calculator, for ``mlipd bench ipi``:

    i-pi-py_driver -m custom -P mlipd/bench/ipi_ase_driver.py \\
        -o template=init.xyz,model=chgnet,path=,device=cpu

i-PI ships an ``ase`` driver base class (``ipi.pes._ase.ASEDriver``) that evaluates
any ASE calculator structure by structure but sets none; this file gives it the
calculator of one of ``mlipd.bench.zoo``'s models, exactly as the suites build it
for their own comparisons.

``compute_structure`` is i-PI's, except that it reads the calculator's results
directly: ``Atoms.get_properties`` (which i-PI's calls) refuses the (3, 3) stress
that ``CHGNetCalculator`` returns, and i-PI's ``post_process`` accepts it.
"""

from ase.calculators.calculator import all_changes
from ipi.pes._ase import ASEDriver

from mlipd.bench.zoo import Case, package_calculator

__DRIVER_NAME__ = "mlipd_bench_ase"
__DRIVER_CLASS__ = "ZooASEDriver"


class ZooASEDriver(ASEDriver):
    """``template``: structure file; ``model``: a zoo model name; ``path``: its file."""

    def __init__(self, template, model, path="", device="cpu", *args, **kwargs):
        self.case = Case(model, "", path, "", "")
        self.device = device
        super().__init__(template, *args, **kwargs)

    def check_parameters(self):
        super().check_parameters()
        self.ase_calculator = package_calculator(self.case, self.device)

    def compute_structure(self, cell, pos):
        cell, pos = self.convert_units(cell, pos)
        structure = self.template_ase.copy()
        structure.positions[:] = pos
        structure.cell[:] = cell
        self.ase_calculator.calculate(structure, list(self.capabilities), all_changes)
        results = self.ase_calculator.results
        return self.post_process({k: results[k] for k in self.capabilities}, structure)
