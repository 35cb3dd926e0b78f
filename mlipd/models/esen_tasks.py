"""fairchem's energy post-processing (normalizer, element references) as per-atom terms.

fairchem's ``MLIPPredictUnit`` turns the head's system energy E into
``E * rmsd + mean`` (``Normalizer.denorm``) and then adds ``sum_i ref[Z_i]``
(``ElementReferences.undo_refs``). Both split over atoms exactly:
``e_i * rmsd + mean / N + ref[Z_i]``, so each rank adds them to its owned atoms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EnergyTask:
    """rmsd, mean (eV) of the energy normalizer; refs: (n_elements,) eV or None."""

    rmsd: float
    mean: float
    refs: torch.Tensor | None

    def site_energy(self, site: torch.Tensor, numbers: torch.Tensor,
                    n_atoms: torch.Tensor) -> torch.Tensor:
        """site, n_atoms (atoms of each owned atom's structure): (n_owned,) -> eV."""
        out = site * self.rmsd + self.mean / n_atoms
        if self.refs is not None:
            out = out + self.refs.to(device=site.device, dtype=site.dtype)[numbers]
        return out


def energy_task(checkpoint: object, dataset: str | None) -> EnergyTask | None:
    """The system-level energy task of ``dataset`` in a checkpoint's ``tasks_config``
    (None when the checkpoint has no tasks: the head's energy is used as is)."""
    import hydra

    configs = getattr(checkpoint, "tasks_config", None) or []
    tasks = [hydra.utils.instantiate(c) for c in configs]
    energy = [t for t in tasks if t.property == "energy" and t.level == "system"
              and (dataset is None or dataset in t.datasets)]
    if not energy:
        return None
    if len(energy) > 1:
        raise ValueError(f"esen: several energy tasks for dataset {dataset!r}: "
                         f"{[t.name for t in energy]}")
    task = energy[0]
    refs = None
    if task.element_references is not None:
        refs = task.element_references.element_references.detach().clone()
    return EnergyTask(rmsd=float(task.normalizer.rmsd), mean=float(task.normalizer.mean),
                      refs=refs)
