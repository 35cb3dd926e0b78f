"""Where each model package keeps its pretrained files, read without importing it.

Importing mace, matgl or fairchem takes 10-20 s on a loaded 2-core machine, too long for
``mlipd models``; so the names come from each package's own data (mace's URL tables
parsed from its source, fairchem's ``pretrained_models.json``, Hugging Face's cache
layout), and each package's cache rule is restated here in one function with the place
it comes from. ``tests/test_pretrained.py`` (and ``test_sevennet.py`` for sevenn) check
every rule against the package's own functions, so a package that changes its rule
fails a test instead of silently disagreeing.

Nothing here downloads or imports a model package (``huggingface_hub`` is light).
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path


@dataclass(frozen=True)
class PretrainedFile:
    """One published name and the file it stands for.

    name:    the name after ``family:`` (``medium``, ``7net-0``, ...)
    path:    where the package looks for it (the file; for Hugging Face caches the
             snapshot file once cached, else the repository's cache folder)
    url:     where the package downloads it from (None: it ships inside the package)
    present: whether the file is there now
    """

    name: str
    path: Path
    url: str | None
    present: bool


# the mlipd extra that installs each model package
EXTRA_OF = {"chgnet": "chgnet", "mace-torch": "mace", "matgl": "tensornet",
            "fairchem-core": "esen", "sevenn": "sevennet"}


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None (no import)."""
    try:
        return distribution(dist).version
    except PackageNotFoundError:
        return None


def package_file(dist: str, relpath: str) -> Path | None:
    """A file inside an installed distribution, located from its metadata (no import)."""
    try:
        path = Path(str(distribution(dist).locate_file(relpath)))
    except PackageNotFoundError:
        return None
    return path if path.is_file() else None


def _module_dicts(source: Path, names: tuple[str, ...]) -> dict[str, dict]:
    """Module-level ``NAME = {...}`` literals of a Python file, without running it."""
    tree = ast.parse(source.read_text(), filename=str(source))
    found: dict[str, dict] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id in names:
            found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


# --- mace-torch ------------------------------------------------------------------------------
MACE_SOURCE = "mace/calculators/foundations_models.py"
MACE_BUNDLED = "mace/calculators/foundations_models/mace-mpa-0-medium.model"
# the options of every MACE model name (mlipd.models.mace.MaceModel), in --model syntax
MACE_OPTIONS = "[,head=NAME][,recompute=auto|0|1][,chunk=auto|EDGES][,cueq=0|1][,jit=0|1]"
MACE_DEFAULTS = {"mace-mp": "medium-mpa-0", "mace-off": "medium"}  # mace_mp(), mace_off()


def mace_cache_dir() -> Path:
    """mace/tools/utils.py ``get_cache_dir``: $XDG_CACHE_HOME/mace, else ~/.cache/mace."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mace"


def mace_cached_name(family: str, url: str) -> str:
    """The file name mace caches ``url`` under (foundations_models.py):
    ``download_mace_mp_checkpoint`` keeps the letters, digits and '_' of the URL's last
    part; ``mace_off`` the last part without a query."""
    base = os.path.basename(url)
    if family == "mace-mp":
        return "".join(c for c in base if c.isalnum() or c in "_")
    return base.split("?")[0]


@cache
def _mace_tables(source: Path) -> dict[str, dict[str, str]]:
    tables = _module_dicts(source, ("mace_mp_urls", "mace_off_urls"))
    return {"mace-mp": tables.get("mace_mp_urls", {}), "mace-off": tables.get("mace_off_urls", {})}


def mace_files(family: str) -> list[PretrainedFile]:
    """Every name of ``mace-mp`` or ``mace-off`` in the installed mace's tables, with
    its cache file (empty when mace-torch is not installed)."""
    source = package_file("mace-torch", MACE_SOURCE)
    if source is None:
        return []
    bundled = package_file("mace-torch", MACE_BUNDLED)
    out = []
    for name, url in _mace_tables(source)[family].items():
        path = mace_cache_dir() / mace_cached_name(family, url)
        if family == "mace-mp" and name == "medium-mpa-0" and bundled is not None:
            path = bundled  # download_mace_mp_checkpoint prefers a copy inside the package
        out.append(PretrainedFile(name, path, url, path.is_file()))
    return out


# --- Hugging Face caches (matgl, fairchem) -------------------------------------------------
def hf_cached(repo_id: str, filename: str, cache_dir: Path,
              revision: str | None = None) -> Path | None:
    """``filename`` of ``repo_id`` in a Hugging Face cache folder, or None: huggingface_hub's
    own lookup (``try_to_load_from_cache``), which never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    got = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache_dir), revision=revision)
    return Path(got) if isinstance(got, str) else None


def hf_repo_folder(repo_id: str, cache_dir: Path) -> Path:
    """The folder a Hugging Face cache keeps ``repo_id`` in (``models--ORG--NAME``)."""
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def hf_endpoint() -> str:
    """The hub huggingface_hub downloads from ($HF_ENDPOINT, default huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


# --- matgl (TensorNet) -----------------------------------------------------------------------
MATGL_ORG = "materialyze"  # matgl/utils/io.py HF_MATGL_ORG: a bare name is materialyze/NAME
MATGL_FILES = ("model.json", "model.pt", "state.pt")  # matgl/utils/io.py _MODEL_FILES
TENSORNET_EXAMPLES = ("TensorNet-MatPES-PBE-v2025.1-PES", "TensorNet-MatPES-r2SCAN-v2025.1-PES")


def matgl_cache_dir() -> Path:
    """matgl/config.py ``MATGL_CACHE``: ~/.cache/matgl (no environment variable)."""
    return Path.home() / ".cache" / "matgl"


def matgl_model_dir(name: str) -> Path | None:
    """The cached snapshot folder holding all of a matgl model's files, or None."""
    paths = [hf_cached(f"{MATGL_ORG}/{name}", f, matgl_cache_dir()) for f in MATGL_FILES]
    if any(p is None for p in paths) or len({p.parent for p in paths if p}) != 1:
        return None
    return paths[0].parent if paths[0] else None


def tensornet_files() -> list[PretrainedFile]:
    """TensorNet names found in matgl's cache, and the published examples."""
    names = set(TENSORNET_EXAMPLES)
    prefix = f"models--{MATGL_ORG}--"
    if matgl_cache_dir().is_dir():
        names |= {p.name[len(prefix):] for p in matgl_cache_dir().glob(prefix + "*")
                  if "TensorNet" in p.name}
    out = []
    for name in sorted(names):
        folder = matgl_model_dir(name)
        path = folder or hf_repo_folder(f"{MATGL_ORG}/{name}", matgl_cache_dir())
        out.append(PretrainedFile(name, path, f"{hf_endpoint()}/{MATGL_ORG}/{name}",
                                  folder is not None))
    return out


# --- fairchem-core (eSEN) --------------------------------------------------------------------
FAIRCHEM_TABLE = "fairchem/core/calculate/pretrained_models.json"


def fairchem_cache_dir() -> Path:
    """fairchem/core/_config.py ``CACHE_DIR``: $FAIRCHEM_CACHE_DIR, else ~/.cache/fairchem."""
    return Path(os.environ.get("FAIRCHEM_CACHE_DIR",
                               os.path.join(os.path.expanduser("~"), ".cache/fairchem")))


def fairchem_checkpoints() -> dict[str, dict]:
    """fairchem's registered checkpoints {name: {filename, repo_id, subfolder, ...}}."""
    table = package_file("fairchem-core", FAIRCHEM_TABLE)
    return json.loads(table.read_text()) if table is not None else {}


def fairchem_repo_file(entry: dict) -> str:
    sub = entry.get("subfolder")
    return f"{sub}/{entry['filename']}" if sub else entry["filename"]


def esen_names(table: dict[str, dict]) -> list[str]:
    """The registered names mlipd's eSEN adapter can run: eSEN backbones with energy
    (conserving) heads; UMA's mixture-of-experts and direct-force models are refused."""
    return [n for n in table if n.startswith("esen-") and "direct" not in n]


def esen_files() -> list[PretrainedFile]:
    table = fairchem_checkpoints()
    out = []
    for name in esen_names(table):
        entry = table[name]
        found = hf_cached(entry["repo_id"], fairchem_repo_file(entry), fairchem_cache_dir(),
                          entry.get("revision"))
        path = found or hf_repo_folder(entry["repo_id"], fairchem_cache_dir())
        out.append(PretrainedFile(name, path, f"{hf_endpoint()}/{entry['repo_id']}",
                                  found is not None))
    return out


# --- sevenn (SevenNet) -----------------------------------------------------------------------
# sevenn/_const.py SEVENNET_* (files under sevenn/pretrained_potentials) and the names
# sevenn/util.py get_available_pretrained_models gives them; the first four ship in the wheel,
# the others are downloaded by sevenn into the package or ~/.cache/sevennet
SEVENNET_FILES = {
    "7net-0": "SevenNet_0__11Jul2024/checkpoint_sevennet_0.pth",
    "7net-0_22may2024": "SevenNet_0__22May2024/checkpoint_sevennet_0.pth",
    "7net-l3i5": "SevenNet_l3i5/checkpoint_l3i5.pth",
    "7net-mf-0": "SevenNet_MF_0/checkpoint_sevennet_mf_0.pth",
    "7net-mf-ompa": "SevenNet_MF_ompa/checkpoint_sevennet_mf_ompa.pth",
    "7net-omat": "SevenNet_omat/checkpoint_sevennet_omat.pth",
    "7net-omni": "SevenNet_omni/checkpoint_sevennet_omni.pth",
    "7net-omni-i8": "SevenNet_omni_i8/checkpoint_sevennet_omni_i8.pth",
    "7net-omni-i12": "SevenNet_omni_i12/checkpoint_sevennet_omni_i12.pth",
}
SEVENNET_BUNDLED = ("7net-0", "7net-0_22may2024", "7net-l3i5", "7net-mf-0")


def sevennet_cache_dir() -> Path:
    """sevenn/util.py ``pretrained_name_to_path``: ~/.cache/sevennet, beside the package's
    own pretrained_potentials folder."""
    return Path(os.path.expanduser("~/.cache/sevennet"))


SEVENNET_RELEASES = "https://github.com/MDIL-SNU/SevenNet/releases"


def sevennet_files() -> list[PretrainedFile]:
    if installed_version("sevenn") is None:
        return []
    out = []
    for name, rel in SEVENNET_FILES.items():
        inside = package_file("sevenn", f"sevenn/pretrained_potentials/{rel}")
        path = inside or sevennet_cache_dir() / rel
        out.append(PretrainedFile(name, path, None if name in SEVENNET_BUNDLED else
                                  SEVENNET_RELEASES, path.is_file()))
    return out
