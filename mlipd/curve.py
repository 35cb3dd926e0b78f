"""CURVE key files, read by both sides: ``mlipd serve --curve DIR`` and
``mlipd.client.Client(curve=DIR)``; written by ``mlipd keygen DIR``.

pyzmq's certificate format::

    DIR/server.key, DIR/server.key_secret      the server's pair
    DIR/client.key, DIR/client.key_secret      a client's pair (the one keygen made)
    DIR/clients/*.key                          the public keys the server accepts

A secret key file that group or others can read is refused (with a warning that says
how to fix it) unless the caller allows it explicitly: whoever reads it can pose as
the server or as that client.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from mlipd.errors import SetupError

log = logging.getLogger(__name__)

UMASK_LOCK = threading.Lock()  # the umask is per process: one change at a time


@dataclass(frozen=True)
class CurveKeys:
    """A key directory (layout in the module docstring).

    allow_readable_secret: accept a secret key file readable by group or others
    (warned about either way)
    """

    directory: Path
    allow_readable_secret: bool = False

    @property
    def clients(self) -> Path:
        return self.directory / "clients"

    def server_pair(self) -> tuple[bytes, bytes]:
        return self._load(self.directory / "server.key_secret", secret=True)

    def server_public(self) -> bytes:
        return self._load(self.directory / "server.key", secret=False)[0]

    def client_pair(self) -> tuple[bytes, bytes]:
        return self._load(self.directory / "client.key_secret", secret=True)

    def accepted(self) -> set[bytes]:
        """The public keys (z85) in ``clients/``."""
        if not self.clients.is_dir():
            raise SetupError(f"{self.clients}: no such directory (mlipd keygen makes it)")
        return {self._load(p, secret=False)[0] for p in sorted(self.clients.glob("*.key"))}

    def _load(self, path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
        from zmq.auth import load_certificate

        if secret:
            check_secret_mode(path, allow=self.allow_readable_secret)
        try:
            public, private = load_certificate(path)
        except (OSError, ValueError) as e:
            raise SetupError(f"cannot read CURVE certificate {path}: {e}") from e
        if secret and private is None:
            raise SetupError(f"{path}: holds no secret key")
        return public, private


def check_secret_mode(path: Path, *, allow: bool) -> None:
    """Warn about, and unless ``allow`` refuse, a secret key file that group or others
    may read (a missing file is left to the reader's own error)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if not mode & (stat.S_IRWXG | stat.S_IRWXO):
        return
    what = (f"{path}: secret key readable by group or others (mode "
            f"{stat.S_IMODE(mode):o}); fix with `chmod 600 {path}`")
    log.warning("%s", what)
    if not allow:
        raise SetupError(f"{what} (or `mlipd serve --allow-readable-key` to use it anyway)")


def apply_client_curve(sock, directory: str | os.PathLike, *,
                       allow_readable_secret: bool = False) -> None:
    """CURVE on a client ``zmq.Socket``: its pair and the server's public key from
    ``directory``."""
    keys = CurveKeys(Path(directory), allow_readable_secret=allow_readable_secret)
    sock.curve_publickey, sock.curve_secretkey = keys.client_pair()
    sock.curve_serverkey = keys.server_public()


def keygen(directory: str | os.PathLike) -> list[Path]:
    """Write a server pair, a client pair, and the client's public key into ``clients/``;
    secret files are owner-only. Refuses to overwrite existing keys."""
    from zmq.auth import create_certificates

    d = Path(directory)
    targets = [d / f"{n}.{e}" for n in ("server", "client") for e in ("key", "key_secret")]
    existing = [p for p in targets if p.exists()]
    if existing:
        raise SetupError(f"{', '.join(map(str, existing))} exist; keygen never overwrites keys")
    (d / "clients").mkdir(parents=True, exist_ok=True)
    with UMASK_LOCK:
        old = os.umask(0o077)
        try:
            for name in ("server", "client"):
                create_certificates(d, name)
        finally:
            os.umask(old)
    for p in targets:
        os.chmod(p, 0o600 if p.suffix == ".key_secret" else 0o644)
    shutil.copy(d / "client.key", d / "clients" / "client.key")
    return [*targets, d / "clients" / "client.key"]
