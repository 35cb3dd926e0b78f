"""ZeroMQ endpoints mlipd accepts, parsed once with a message that shows the expected form.

Only two transports: ``tcp://HOST:PORT`` (IPv4, ``[IPv6]`` or a host name) and
``ipc://PATH`` (a UNIX socket file, whose permissions say who may connect). Abstract
UNIX sockets (``ipc://@name``) have no permissions and are refused, as are ZeroMQ's
other transports (inproc, pgm, udp, ...). Pure: no sockets.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mlipd.errors import SetupError

FORMS = "tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555, tcp://[::1]:5555) or ipc:///PATH"
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\[\]/:]+):(?P<port>\*|\d+)$")


@dataclass(frozen=True)
class ZmqAddress:
    """A checked endpoint. ``text`` is what zmq binds or connects to (port 0 -> ``*``)."""

    transport: str  # "tcp" or "ipc"
    text: str
    host: str | None = None  # tcp: without brackets
    port: int | None = None  # tcp: 0 when any free port (bind only)
    path: str | None = None  # ipc

    @property
    def ipv6(self) -> bool:
        return self.host is not None and ":" in self.host

    @property
    def loopback(self) -> bool:
        """Reachable from this host only (an ipc socket file is always local)."""
        if self.transport == "ipc":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host or interface name, or "*": not known to be loopback


def parse_zmq_address(text: str, *, bind: bool) -> ZmqAddress:
    """Check ``text``; ``bind``: a server's address (port 0 or ``*`` allowed)."""
    if not isinstance(text, str) or not text:
        raise SetupError(f"ZeroMQ endpoint must be {FORMS}; got {text!r}")
    scheme, sep, rest = text.partition("://")
    if not sep:
        hint = f" (did you mean tcp://{text}?)" if _HOST_PORT.match(text) else ""
        raise SetupError(f"ZeroMQ endpoint {text!r} has no transport{hint}; expected {FORMS}")
    if scheme == "ipc":
        if not rest or rest.startswith("@"):
            raise SetupError(f"{text!r}: expected ipc:///PATH (a socket file; abstract "
                             "sockets have no permissions and are refused)")
        return ZmqAddress(transport="ipc", text=text, path=rest)
    if scheme != "tcp":
        raise SetupError(f"{text!r}: transport {scheme!r} is not supported; expected {FORMS}")
    m = _HOST_PORT.match(rest)
    if m is None:
        raise SetupError(f"{text!r}: expected {FORMS}")
    host, port_text = m.group("host"), m.group("port")
    if host.startswith("["):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SetupError(f"{text!r}: {host!r} is not an IPv6 address") from None
    if port_text == "*":
        port = 0
    else:
        port = int(port_text)
        if port > 65535:
            raise SetupError(f"{text!r}: port {port} outside 0..65535")
    if not bind and (port == 0 or host == "*"):
        raise SetupError(f"{text!r}: a client needs the server's real host and port "
                         "(as printed in its READY line)")
    shown = f"[{host}]" if ":" in host else host
    return ZmqAddress(transport="tcp", host=host, port=port,
                      text=f"tcp://{shown}:{'*' if port == 0 else port}")
