"""The only physical constants of mlipd.

Inside mlipd: Å, eV, eV/Å, and ASE's row-vector cell. On the i-PI wire: Bohr and
Hartree (atomic units). We take ASE's CODATA set (``ase.units``) so that results
passed through ASE's own SocketIOCalculator round-trip to ~1e-15; i-PI's own
constants differ from ASE's by 1.4e-8 (Bohr) and 9.6e-8 (Hartree) relative, so
comparisons against i-PI's files hold to ~1e-7 relative.
"""

from ase import units as _ase_units

BOHR_ANG: float = float(_ase_units.Bohr)  # Å per Bohr
HARTREE_EV: float = float(_ase_units.Hartree)  # eV per Hartree
FORCE_AU_EV_ANG: float = HARTREE_EV / BOHR_ANG  # eV/Å per Hartree/Bohr
EV_A3_TO_GPA: float = 1.0 / float(_ase_units.GPa)
