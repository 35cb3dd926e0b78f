"""Pretrained models by their published names, loaded through their own package.

    mace-mp[:NAME]   MACE-MP-0 / MPA-0 / OMAT-0 / MatPES ... (mace's ``mace_mp_urls``)
    mace-off[:NAME]  MACE-OFF23 small / medium / large (mace's ``mace_off_urls``)
    tensornet:NAME   a matgl model of the ``materialyze`` Hugging Face org, in matgl's cache
    esen:NAME        a registered fairchem eSEN checkpoint, in fairchem's cache
    sevennet:NAME    a SevenNet checkpoint shipped in (or downloaded by) sevenn

Where each package keeps its files is in ``caches``. This module decides whether a name
can load, and loads it with the package's own functions.

Network policy. A file already in its package's cache loads without touching the
network. A missing one is downloaded by the package's own downloader, and only when
the model's options do not say ``offline=1`` and the download host (or the configured
HTTPS proxy) accepts a TCP connection within ``PROBE_TIMEOUT_S``. Otherwise the load
fails at once with a one-line ``ModelUnavailable`` naming the file, the directory to
put it in and where it comes from (exit code 2 from the command line). The probe is
there because the packages' own waits are long: mace reads with a 120 s socket timeout,
huggingface_hub retries, and on a compute node without a route a connect can hang
until the kernel gives up; the probe runs in a daemon thread, so even a name lookup
that hangs costs at most ``PROBE_TIMEOUT_S``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch

from mlipd.errors import ModelUnavailable
from mlipd.models import caches
from mlipd.models.options import flag, parse_options

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


def proxy_for(url: str) -> str | None:
    """The proxy urllib (and so mace, requests, huggingface_hub) would use for ``url``."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        return proxy if "://" in proxy else f"http://{proxy}"
    return None


def reachable(url: str, *, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether ``url``'s host (or the proxy urllib would use for it) accepts a TCP
    connection within ``timeout`` seconds, name lookup included."""
    parts = urllib.parse.urlsplit(proxy_for(url) or url)
    host = parts.hostname
    if not host:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    answer: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=connect, name="mlipd-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def require_download(what: str, *, missing: Path, folder: Path, url: str, offline: bool,
                     fix: str | None = None) -> None:
    """Raise ``ModelUnavailable`` unless a download of ``missing`` may start now. The
    message ends with what to do by hand: ``fix``, by default "download URL and save it
    as FOLDER/NAME" (the exact name the package looks for, which is not always the
    URL's: mace keeps only the letters, digits and '_' of it)."""
    where = f"{missing.name} is not in {folder}"
    fix = fix or f"download {url} and save it as {folder / missing.name}"
    if offline:
        raise ModelUnavailable(f"{what}: {where} and offline=1 forbids a download; {fix}")
    if not reachable(url):
        host = urllib.parse.urlsplit(url).hostname
        proxy = proxy_for(url)
        host = f"{host} (via proxy {proxy})" if proxy else host
        raise ModelUnavailable(f"{what}: {where} and {host} cannot be reached to download "
                               f"it; {fix}")
    log.warning("%s: downloading %s from %s into %s", what, missing.name, url, folder)


def hf_fix(repo: str, cache_dir: Path, *, files: str = "", revision: str | None = None,
           other: str = "") -> str:
    """By hand, for a file kept in a Hugging Face cache (snapshots and refs, not one
    file): the hub's own command where the network is, then the folder copied."""
    rev = f" --revision {revision}" if revision else ""
    folder = caches.hf_repo_folder(repo, cache_dir)
    return (f"where the network is, run `hf download {repo}{files}{rev} --cache-dir "
            f"{cache_dir}` and copy {folder.name} into {cache_dir}{other}")


@contextlib.contextmanager
def _stdout_to_log(what: str) -> Iterator[None]:
    """The packages print progress and licence notes; a server keeps stdout clean."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    for line in buf.getvalue().splitlines():
        if line.strip():
            log.info("%s: %s", what, line.strip())


def _pick(files: list[caches.PretrainedFile], name: str, what: str,
          package: str) -> caches.PretrainedFile:
    if not files:
        raise ModelUnavailable(f"{what} needs the {package} package; try: pip install "
                               f"'mlipd[{caches.EXTRA_OF.get(package, package)}]'")
    found = [f for f in files if f.name == name]
    if not found:
        known = ", ".join(f.name for f in files)
        raise ModelUnavailable(f"{what}: unknown name {name!r}; known: {known}")
    return found[0]


# --- MACE ------------------------------------------------------------------------------------
def mace_file(family: str, name: str | None, *, offline: bool = False) -> Path:
    """The model file of ``mace-mp:NAME`` or ``mace-off:NAME`` (mace's default name when
    None), from mace's cache, downloaded by mace when missing and allowed."""
    name = name or caches.MACE_DEFAULTS[family]
    what = f"{family}:{name}"
    entry = _pick(caches.mace_files(family), name, what, "mace-torch")
    if not entry.present:
        require_download(what, missing=entry.path, folder=entry.path.parent,
                         url=entry.url or "", offline=offline)
    importlib.import_module("mlipd.models.mace")  # mace first (see the adapter)
    with _env_kept("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):  # mace/calculators/mace.py sets it
        from mace.calculators import foundations_models as fm

    if family == "mace-mp":
        # mace's own lookup: returns the cached (or bundled) file, downloads only if missing
        with _stdout_to_log(what):
            return Path(fm.download_mace_mp_checkpoint(name))
    if not entry.present:
        # mace_off downloads into its cache, then loads the file with torch.load (which
        # needs weights_only off); mlipd loads the cached file itself below
        with _stdout_to_log(what), _weights_only_off():
            fm.mace_off(name, device="cpu", return_raw_model=True)
    return entry.path


@contextlib.contextmanager
def _env_kept(name: str) -> Iterator[None]:
    """Environment variable ``name`` as it was before the block, whatever the block did."""
    prior = os.environ.get(name)
    try:
        yield
    finally:
        if prior is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = prior


@contextlib.contextmanager
def _weights_only_off() -> Iterator[None]:
    with _env_kept("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        yield


MACE_MP_SYNTAX = "mace-mp[:NAME]" + caches.MACE_OPTIONS + "[,offline=1]"
MACE_OFF_SYNTAX = "mace-off[:NAME]" + caches.MACE_OPTIONS + "[,offline=1]"


def _mace(family: str, syntax: str, arg: str | None) -> torch.nn.Module:
    from mlipd.models.mace import OPTION_KEYS, MaceModel, load_mace_file

    name, opts = parse_options(arg, model=family, syntax=syntax, positional=True,
                               keys={**OPTION_KEYS, "offline": flag})
    path = mace_file(family, name, offline=opts.pop("offline", False))
    log.info("%s:%s from %s", family, name or caches.MACE_DEFAULTS[family], path)
    return MaceModel(model=load_mace_file(path), **opts)


def mace_mp(arg: str | None = None) -> torch.nn.Module:
    """``--model mace-mp[:NAME][,OPTIONS][,offline=1]`` (entry point ``mace-mp``)."""
    return _mace("mace-mp", MACE_MP_SYNTAX, arg)


def mace_off(arg: str | None = None) -> torch.nn.Module:
    """``--model mace-off[:NAME][,OPTIONS][,offline=1]`` (entry point ``mace-off``)."""
    return _mace("mace-off", MACE_OFF_SYNTAX, arg)


# --- matgl (TensorNet) -----------------------------------------------------------------------
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".model", ".ckpt")


def looks_like_path(arg: str) -> bool:
    """A path rather than a published name: it exists, has a directory part or a model
    file's suffix."""
    return (os.path.exists(arg) or os.sep in arg or arg.startswith(".")
            or arg.endswith(MODEL_FILE_SUFFIXES))


def matgl_dir(name: str, *, offline: bool = False) -> Path:
    """The folder of a cached matgl model ``materialyze/NAME``, downloaded by matgl into
    its cache when missing and allowed."""
    what = f"tensornet:{name}"
    if caches.installed_version("matgl") is None:
        raise ModelUnavailable(f"{what} needs matgl; try: pip install 'mlipd[tensornet]'")
    found = caches.matgl_model_dir(name)
    if found is not None:
        return found
    repo = f"{caches.MATGL_ORG}/{name}"
    folder = caches.hf_repo_folder(repo, caches.matgl_cache_dir())
    require_download(what, missing=folder, folder=caches.matgl_cache_dir(),
                     url=f"{caches.hf_endpoint()}/{repo}", offline=offline,
                     fix=hf_fix(repo, caches.matgl_cache_dir(),
                                other=f"; or save {', '.join(caches.MATGL_FILES)} from "
                                      f"{caches.hf_endpoint()}/{repo} in a directory DIR "
                                      "and give tensornet:DIR"))
    import matgl

    with _stdout_to_log(what):
        matgl.load_model(name)  # matgl's own hub download into its cache
    found = caches.matgl_model_dir(name)
    if found is None:
        raise ModelUnavailable(f"{what}: matgl loaded it but {folder} holds no model files")
    return found


# --- fairchem (eSEN) -------------------------------------------------------------------------
def fairchem_checkpoint(name: str, *, offline: bool = False) -> Path:
    """A registered fairchem checkpoint from fairchem's cache, downloaded by fairchem
    (``pretrained_checkpoint_path_from_name``) when missing and allowed."""
    what = f"esen:{name}"
    table = caches.fairchem_checkpoints()
    if not table:
        raise ModelUnavailable(f"{what} needs fairchem-core; try: pip install 'mlipd[esen]'")
    if name not in caches.esen_names(table):
        raise ModelUnavailable(f"{what}: not an eSEN checkpoint mlipd can run; known: "
                               f"{', '.join(caches.esen_names(table))}, or a file esen:PATH")
    entry = table[name]
    cache_dir = caches.fairchem_cache_dir()
    found = caches.hf_cached(entry["repo_id"], caches.fairchem_repo_file(entry), cache_dir,
                             entry.get("revision"))
    if found is not None:
        return found
    folder = caches.hf_repo_folder(entry["repo_id"], cache_dir)
    require_download(what, missing=Path(entry["filename"]), folder=folder,
                     url=f"{caches.hf_endpoint()}/{entry['repo_id']}", offline=offline,
                     fix=hf_fix(entry["repo_id"], cache_dir,
                                files=f" {caches.fairchem_repo_file(entry)}",
                                revision=entry.get("revision"),
                                other="; or download that file and give esen:PATH"))
    from fairchem.core.calculate.pretrained_mlip import pretrained_checkpoint_path_from_name

    with _stdout_to_log(what):
        return Path(pretrained_checkpoint_path_from_name(name))


# --- sevenn (SevenNet) -----------------------------------------------------------------------
def sevennet_checkpoint(name: str, *, offline: bool = False) -> Path:
    """A SevenNet checkpoint by sevenn's name (``7net-0``, ``SevenNet-0``, ``7net-l3i5``,
    ...): the file inside the sevenn package, or in ~/.cache/sevennet, through sevenn's own
    ``pretrained_name_to_path``, which downloads the names that do not ship in the wheel;
    that download happens only when allowed (module docstring)."""
    from sevenn import _const
    from sevenn.util import get_available_pretrained_models, pretrained_name_to_path

    what = f"sevennet:{name}"
    try:
        # sevenn's name -> its file (no download yet: only the path is computed here)
        canonical = _canonical_sevennet(name, get_available_pretrained_models())
    except ValueError as e:
        raise ModelUnavailable(f"{what}: {e}") from e
    rel = caches.SEVENNET_FILES[canonical]
    inside = Path(_const._prefix) / rel
    cached = caches.sevennet_cache_dir() / rel
    if not inside.is_file() and not cached.is_file():
        url = _const.CHECKPOINT_DOWNLOAD_LINKS.get(str(inside))
        if url is None:
            raise ModelUnavailable(f"{what}: {inside} is missing from the sevenn package; "
                                   "reinstall sevenn")
        require_download(what, missing=cached, folder=cached.parent, url=url, offline=offline)
    with _stdout_to_log(what):
        return Path(pretrained_name_to_path(name))


def _canonical_sevennet(name: str, available: list[str]) -> str:
    """sevenn's canonical ``7net-*`` name for any spelling sevenn accepts."""
    low = name.lower()
    for head in ("sevennet", "7net"):
        if low.startswith(head):
            low = "7net" + low[len(head):]
    aliases = {"7net-0_11jul2024": "7net-0", "7net-0_11july2024": "7net-0"}
    low = aliases.get(low, low)
    if low not in available or low not in caches.SEVENNET_FILES:
        raise ValueError(f"unknown name; known: {', '.join(available)}")
    return low
