"""The models the suites compare, each with its package's own ASE calculator.

CHGNet is the pretrained 0.3.0 bundled with ``chgnet``. MACE, TensorNet and eSEN are
randomly initialised (no weights can be downloaded here) but real: built from their
packages' own classes at the sizes of published models, saved as those packages save
them, and loaded by mlipd (``--model NAME:FILE``) and by the package's calculator from
the same file. Timings depend on the architecture, not the weights.

Everything runs in float32, the precision these calculators use by default.
"""

from __future__ import annotations

import contextlib
import importlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODELS = ("chgnet", "mace", "tensornet", "esen")
# (Mn,Ni)O and Si: the suites' structures
SPECIES = (8, 14, 25, 28)


@dataclass(frozen=True)
class Case:
    """One model as both contenders load it.

    name: chgnet, mace, tensornet, esen; spec: mlipd's ``--model``; path: the model file
    or directory ('' for pretrained CHGNet); package: what mlipd is compared with
    """

    name: str
    spec: str
    path: str
    description: str
    package: str


# per model: the configuration at "small" (tests, quick CPU runs) and "large" (published
# sizes: the full tables and the GPU)
MACE = {"small": dict(hidden="32x0e+32x1o", max_ell=2, correlation=2, r_max=5.0),
        "large": dict(hidden="128x0e+128x1o", max_ell=3, correlation=3, r_max=6.0)}
TENSORNET = {"small": dict(units=16, num_rbf=16, cutoff=4.5),
             "large": dict(units=64, num_rbf=32, cutoff=5.0)}
ESEN = {"small": dict(sphere_channels=16, lmax=2, cutoff=4.5, max_neighbors=20),
        "large": dict(sphere_channels=64, lmax=2, cutoff=6.0, max_neighbors=30)}


def make_case(name: str, *, scale: str, workdir: Path) -> Case:
    """Write model ``name`` at ``scale`` ("small" or "large") under ``workdir`` (once)
    and describe it. Raises ImportError when the model's package is missing."""
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "chgnet":
        import chgnet  # noqa: F401  (fail early, as the other models do)

        return Case("chgnet", "chgnet", "", "CHGNet 0.3.0 pretrained (the `chgnet` package)",
                    "chgnet CHGNetCalculator")
    if name == "mace":
        cfg = MACE[scale]
        path = workdir / f"mace-{scale}.model"
        if not path.exists():
            _save_mace(path, **cfg)
        return Case("mace", f"mace:{path}", str(path),
                    f"random ScaleShiftMACE {cfg['hidden']}, max_ell {cfg['max_ell']}, "
                    f"correlation {cfg['correlation']}, 2 layers, r_max {cfg['r_max']} Å",
                    "mace MACECalculator")
    if name == "tensornet":
        cfg = TENSORNET[scale]
        path = workdir / f"tensornet-{scale}"
        if not (path / "model.json").exists():
            _save_tensornet(path, **cfg)
        return Case("tensornet", f"tensornet:{path}", str(path),
                    f"random TensorNet (matgl, PyG) units {cfg['units']}, 2 blocks, "
                    f"cutoff {cfg['cutoff']} Å", "matgl PESCalculator")
    if name == "esen":
        cfg = ESEN[scale]
        path = workdir / f"esen-{scale}.pt"
        if not path.exists():
            _save_esen(path, **cfg)
        return Case("esen", f"esen:{path}", str(path),
                    f"random eSEN (fairchem eSCNMDBackbone) {cfg['sphere_channels']} channels, "
                    f"lmax {cfg['lmax']}, 2 layers, cutoff {cfg['cutoff']} Å, max_neighbors "
                    f"{cfg['max_neighbors']}", "fairchem FAIRChemCalculator")
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def package_calculator(case: Case, device: str):
    """The package's own ASE calculator for ``case`` on ``device``."""
    quiet = contextlib.redirect_stdout(io.StringIO())  # calculators print banners
    if case.name == "chgnet":
        from chgnet.model.dynamics import CHGNetCalculator

        from mlipd.models.chgnet import load_chgnet

        with quiet:
            return CHGNetCalculator(model=load_chgnet(), use_device=device)
    if case.name == "mace":
        _first_adapter("mace")
        from mace.calculators import MACECalculator

        with quiet:
            return MACECalculator(model_paths=case.path, device=device)
    if case.name == "tensornet":
        import matgl
        from matgl.ext.ase import PESCalculator

        with quiet:
            return PESCalculator(matgl.load_model(case.path).to(device), stress_unit="eV/A3")
    if case.name == "esen":
        _first_adapter("esen")
        from fairchem.core import FAIRChemCalculator
        from fairchem.core.calculate import pretrained_mlip
        from fairchem.core.units.mlip_unit.api.inference import InferenceSettings


        # fairchem's FP32 path without torch.compile (mlipd compiles nothing either)
        settings = InferenceSettings(tf32=False, activation_checkpointing=False,
                                     merge_mole=False, compile=False,
                                     external_graph_gen=False, internal_graph_gen_version=2)
        with quiet:
            unit = pretrained_mlip.load_predict_unit(case.path, inference_settings=settings,
                                                     device=device.split(":")[0])
            return FAIRChemCalculator(unit, task_name="omat")
    raise ValueError(case.name)


def package_efs(calc, atoms) -> tuple[float, np.ndarray, np.ndarray | None]:
    """Energy (eV), forces (eV/Å) and, for periodic cells, stress (Voigt, eV/Å³) from
    one call of ``calc``: what mlipd computes per call."""
    props = ["energy", "forces"] + (["stress"] if atoms.pbc.all() else [])
    calc.calculate(atoms, props, ["positions", "numbers", "cell", "pbc"])
    r = calc.results
    return float(r["energy"]), np.asarray(r["forces"]), r.get("stress")


def _first_adapter(name: str) -> None:
    """Import mlipd's adapter of ``name`` before its package's own imports: it imports
    e3nn the way e3nn 0.4.4 can load its constants under torch >= 2.6."""
    importlib.import_module(f"mlipd.models.{name}")


def _save_mace(path: Path, *, hidden: str, max_ell: int, correlation: int,
               r_max: float) -> None:
    _first_adapter("mace")
    import torch
    from e3nn import o3
    from mace import modules


    torch.manual_seed(0)
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=r_max, num_bessel=10, num_polynomial_cutoff=5, max_ell=max_ell,
        interaction_cls=block, interaction_cls_first=block, num_interactions=2,
        num_elements=len(SPECIES), hidden_irreps=o3.Irreps(hidden),
        MLP_irreps=o3.Irreps("16x0e"), gate=torch.nn.functional.silu,
        atomic_energies=np.array([-1.0, -2.0, -3.0, -4.0]), avg_num_neighbors=40.0,
        atomic_numbers=list(SPECIES), correlation=correlation, pair_repulsion=False,
        atomic_inter_scale=1.0, atomic_inter_shift=0.0).float().eval()
    torch.save(model, path)


def _save_tensornet(path: Path, *, units: int, num_rbf: int, cutoff: float) -> None:
    import torch
    from ase.data import chemical_symbols
    from matgl.apps.pes import Potential
    from matgl.models import TensorNet

    torch.manual_seed(0)
    net = TensorNet(element_types=tuple(chemical_symbols[z] for z in SPECIES), units=units,
                    nblocks=2, num_rbf=num_rbf, cutoff=cutoff, is_intensive=False,
                    dtype=torch.float32, use_warp=False)
    pot = Potential(model=net, element_refs=np.array([-1.0, -2.0, -3.0, -4.0])).eval()
    pot.save(path)


def _task(name: str, level: str, prop: str, dim: list[int], refs: bool = False) -> dict:
    target = "fairchem.core.units.mlip_unit.mlip_unit"
    task = {"_target_": f"{target}.Task", "name": name, "level": level, "property": prop,
            "datasets": ["omat"],
            "out_spec": {"_target_": f"{target}.OutputSpec", "dim": dim, "dtype": "float32"},
            "normalizer": {"_target_": "fairchem.core.modules.normalization.normalizer."
                                       "Normalizer", "mean": 0.0, "rmsd": 1.7}}
    if refs:
        task["element_references"] = {
            "_target_": "fairchem.core.modules.normalization.element_references."
                        "ElementReferences",
            "element_references": {"_target_": "torch.linspace", "start": -3.0, "end": 2.0,
                                   "steps": 100}}
    return task


def _save_esen(path: Path, *, sphere_channels: int, lmax: int, cutoff: float,
               max_neighbors: int) -> None:
    """An inference checkpoint as fairchem writes them: one EFS head with the dataset's
    prefix, and energy, forces and stress tasks (what ``FAIRChemCalculator`` reads)."""
    _first_adapter("esen")
    import hydra
    import torch
    from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint


    backbone = dict(
        model="fairchem.core.models.uma.escn_md.eSCNMDBackbone", max_num_elements=100,
        sphere_channels=sphere_channels, lmax=lmax, mmax=2, otf_graph=True,
        max_neighbors=max_neighbors, cutoff=cutoff, edge_channels=sphere_channels,
        num_distance_basis=16, direct_forces=False, regress_forces=True, regress_stress=True,
        num_layers=2, hidden_channels=sphere_channels, norm_type="rms_norm_sh",
        act_type="gate", ff_type="grid", chg_spin_emb_type="pos_emb",
        dataset_mapping={"omat": "omat"}, use_dataset_embedding=True)
    config = {"_target_": "fairchem.core.models.base.HydraModel", "backbone": backbone,
              "pass_through_head_outputs": True,
              "heads": {"efs": {"module": "fairchem.core.models.uma.escn_md.MLP_EFS_Head",
                                "prefix": "omat"}}}
    tasks = [_task("omat_energy", "system", "energy", [1], refs=True),
             _task("omat_forces", "atom", "forces", [3]),
             _task("omat_stress", "system", "stress", [1, 9])]
    torch.manual_seed(0)
    model = hydra.utils.instantiate(config)
    ema = torch.optim.swa_utils.AveragedModel(model).state_dict()  # fairchem loads the EMA
    torch.save(MLIPInferenceCheckpoint(model_config=config, model_state_dict=model.state_dict(),
                                       ema_state_dict=ema, tasks_config=tasks), path)
