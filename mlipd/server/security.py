"""Who may reach a ZeroMQ endpoint: loopback by default, owner-only ipc sockets, CURVE.

- ``tcp://`` binds loopback addresses only (127.0.0.0/8, ::1, localhost) unless the
  caller allows remote clients explicitly.
- ``ipc://PATH`` sockets are created owner-only (mode 0600, whatever the umask), are
  refused over an existing file that is not a socket (ZeroMQ would delete it) and
  over a socket another server still listens on (ZeroMQ would take it over
  silently), and are removed at stop (``IpcSocket``).
- CURVE (``CurveKeys``, ``mlipd keygen DIR``): the server's key pair and the public
  keys it accepts, in pyzmq's certificate format::

      DIR/server.key, DIR/server.key_secret      the server's pair
      DIR/client.key, DIR/client.key_secret      a client's pair (the one keygen made)
      DIR/clients/*.key                          the public keys the server accepts

  Denied clients are logged (warning) with their public key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zmq

from mlipd.errors import SetupError
from mlipd.protocols.zmq_address import ZmqAddress

log = logging.getLogger(__name__)

_UMASK_LOCK = threading.Lock()  # the umask is per process: one bind at a time changes it


def check_reach(address: ZmqAddress, *, allow_remote: bool) -> None:
    """Refuse a non-loopback bind unless ``allow_remote``."""
    if not address.loopback and not allow_remote:
        raise SetupError(f"{address.text}: binds beyond loopback (anyone who reaches the "
                         "port is served); pass --allow-remote to mean it, ideally with "
                         "--curve DIR")


class IpcSocket:
    """The socket file of an ``ipc://`` endpoint: checked before bind, owner-only,
    removed at stop (only if it is still the file this server created)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._identity: tuple[int, int] | None = None

    def check_free(self) -> None:
        """Refuse a path that holds a regular file, a directory, or a live socket."""
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise SetupError(f"ipc://{self.path}: exists and is not a socket; refusing to "
                             "replace it (ZeroMQ would delete it)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except OSError:
            log.info("ipc://%s: removing a stale socket file (nothing listens on it)",
                     self.path)
            return
        finally:
            probe.close()
        raise SetupError(f"ipc://{self.path}: another server is listening on this socket")

    @contextlib.contextmanager
    def owner_only(self) -> Iterator[None]:
        """Bind inside this block: the socket file is created with mode 0600."""
        with _UMASK_LOCK:
            old = os.umask(0o177)
            try:
                yield
            finally:
                os.umask(old)
        os.chmod(self.path, 0o600)  # in case the file existed (a stale socket replaced)
        st = self.path.lstat()
        self._identity = (st.st_dev, st.st_ino)

    def remove(self) -> None:
        if self._identity is None:
            return
        with contextlib.suppress(FileNotFoundError):
            st = self.path.lstat()
            if (st.st_dev, st.st_ino) == self._identity:
                self.path.unlink()
        self._identity = None


# ---------------------------------------------------------------- CURVE


@dataclass(frozen=True)
class CurveKeys:
    """A key directory (layout in the module docstring)."""

    directory: Path

    @property
    def clients(self) -> Path:
        return self.directory / "clients"

    def server_pair(self) -> tuple[bytes, bytes]:
        return _load(self.directory / "server.key_secret", secret=True)

    def server_public(self) -> bytes:
        return _load(self.directory / "server.key", secret=False)[0]

    def client_pair(self) -> tuple[bytes, bytes]:
        return _load(self.directory / "client.key_secret", secret=True)

    def accepted(self) -> set[bytes]:
        """The public keys (z85) in ``clients/``."""
        if not self.clients.is_dir():
            raise SetupError(f"{self.clients}: no such directory (mlipd keygen makes it)")
        return {_load(p, secret=False)[0] for p in sorted(self.clients.glob("*.key"))}


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    from zmq.auth import load_certificate

    try:
        public, private = load_certificate(path)
    except (OSError, ValueError) as e:
        raise SetupError(f"cannot read CURVE certificate {path}: {e}") from e
    if secret and private is None:
        raise SetupError(f"{path}: holds no secret key")
    return public, private


class _KnownClients:
    """pyzmq's credentials provider: the keys in ``clients/``, read again for every new
    connection (so keys can be added or removed while serving); denials are logged."""

    def __init__(self, keys: CurveKeys) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            allowed = key in self.keys.accepted()
        except SetupError as e:
            log.warning("CURVE: cannot read accepted keys (%s); denying", e)
            return False
        if not allowed:
            log.warning("CURVE: denied a client whose public key %s is not in %s",
                        key.decode(errors="replace"), self.keys.clients)
        return allowed


class CurveServer:
    """CURVE on the server's sockets, with a ZAP authenticator thread."""

    def __init__(self, directory: str | os.PathLike, *, context: zmq.Context) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        if not zmq.has("curve"):
            raise SetupError("this libzmq was built without CURVE")
        self.keys = CurveKeys(Path(directory))
        self.public, self.secret = self.keys.server_pair()
        n = len(self.keys.accepted())
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("mlipd.server.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=_KnownClients(
            self.keys))
        log.info("CURVE: %d accepted client key(s) in %s", n, self.keys.clients)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def stop(self) -> None:
        self._auth.stop()


def apply_client_curve(sock: zmq.Socket, directory: str | os.PathLike) -> None:
    """CURVE on a client socket: its pair and the server's public key from ``directory``."""
    keys = CurveKeys(Path(directory))
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
    with _UMASK_LOCK:
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
