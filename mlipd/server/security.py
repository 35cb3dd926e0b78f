"""Who may reach a ZeroMQ endpoint: loopback by default, owner-only ipc sockets, CURVE.

- ``tcp://`` binds loopback addresses only (127.0.0.0/8, ::1, localhost) unless the
  caller allows remote clients explicitly.
- ``ipc://PATH`` sockets are created owner-only (mode 0600, whatever the umask), are
  refused over an existing file that is not a socket (ZeroMQ would delete it) and
  over a socket another server still listens on (ZeroMQ would take it over
  silently), and are removed at stop (``IpcSocket``).
- CURVE (``CurveServer``): the server's key pair and the public keys it accepts, read
  with ``mlipd.curve`` (the key files, shared with the client). Denied clients are
  logged (warning) with their public key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import zmq

from mlipd.curve import UMASK_LOCK, CurveKeys
from mlipd.errors import SetupError
from mlipd.protocols.zmq_address import ZmqAddress

log = logging.getLogger(__name__)



def check_reach(address: ZmqAddress, *, allow_remote: bool) -> None:
    """Refuse a non-loopback bind unless ``allow_remote``."""
    if not address.loopback and not allow_remote:
        raise SetupError(f"{address.text}: binds beyond loopback (anyone who reaches the "
                         "port is served); pass --allow-remote to mean it, ideally with "
                         "--curve DIR")


def check_free(address: ZmqAddress) -> None:
    """Refuse, before the model loads, an address another process holds: a TCP port
    bound already (tried with a plain socket, as libzmq binds: SO_REUSEADDR), an ipc
    path that is not free (``IpcSocket.check_free``). Port 0 / ``*`` is always free."""
    if address.transport == "ipc":
        IpcSocket(address.path).check_free()
        return
    if address.port == 0:
        return
    host = None if address.host == "*" else address.host
    try:
        infos = socket.getaddrinfo(host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SetupError(f"{address.text}: host does not resolve ({e.strerror})") from None
    for family, kind, proto, _name, sockaddr in infos[:1]:
        probe = socket.socket(family, kind, proto)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
        except OSError as e:
            shown = address.text.rsplit(":", 1)[0]
            raise SetupError(f"cannot bind {address.text}: {e.strerror} (another process "
                             f"listens there); pick another port, or {shown}:* for any "
                             "free one (the READY line names it)") from None
        finally:
            probe.close()


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
        with UMASK_LOCK:
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

    def __init__(self, directory: str | os.PathLike, *, context: zmq.Context,
                 allow_readable_secret: bool = False) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        if not zmq.has("curve"):
            raise SetupError("this libzmq was built without CURVE")
        self.keys = CurveKeys(Path(directory), allow_readable_secret=allow_readable_secret)
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
