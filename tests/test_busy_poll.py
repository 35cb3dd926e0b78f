"""``FramedSocket``'s busy poll (``--busy-poll-us``) over a real socket pair: a message
arriving within the window is read by polling, one arriving later by the blocking
read that follows, a close is an end, the idle timeout still holds; the option's
bounds are checked before the model loads."""

from __future__ import annotations

import socket
import subprocess
import threading

import pytest
from conftest import MLIPD

from mlipd.driver.socket_io import FramedSocket
from mlipd.errors import ProtocolError


class CountingSocket:
    """A real socket that counts its reads and the reads that found nothing."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reads = self.empty = 0

    def settimeout(self, t):
        self.sock.settimeout(t)

    def sendall(self, data):
        self.sock.sendall(data)

    def recv_into(self, view, *args):
        self.reads += 1
        try:
            return self.sock.recv_into(view, *args)
        except BlockingIOError:
            self.empty += 1
            raise


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield CountingSocket(a), b
    a.close()
    b.close()


def send_later(sock: socket.socket, delay_s: float, data: bytes | None) -> threading.Timer:
    """``data`` on ``sock`` after ``delay_s`` (None: close it instead)."""
    t = threading.Timer(delay_s, sock.sendall if data is not None else sock.close,
                        args=(data,) if data is not None else ())
    t.start()
    return t


@pytest.mark.parametrize(("window_s", "delay_s", "empty"), [
    (30.0, 0.05, 2),  # within the window: polls that found nothing, then the one that got it
    (0.01, 0.3, 1),  # after the window: polls, then one blocking read got it
])
def test_a_message_is_read_by_polling_then_by_blocking(pair, window_s, delay_s, empty):
    mine, peer = pair
    conn = FramedSocket(mine, timeout=30.0, busy_poll=window_s)
    timer = send_later(peer, delay_s, b"POSDATA     ")
    assert bytes(conn.recv_exact_or_eof(12)) == b"POSDATA     "
    timer.join()
    assert mine.empty >= empty
    assert mine.reads == mine.empty + 1


def test_a_reply_larger_than_the_socket_buffer_is_sent_whole(pair):
    """After a polled read the socket blocks again: a 4 MB reply (65,536 atoms' forces
    are 1.5 MB) waits for its reader instead of failing at a full buffer."""
    mine, peer = pair
    conn = FramedSocket(mine, timeout=30.0, busy_poll=30.0)
    send_later(peer, 0.05, b"GETFORCE    ").join()
    conn.recv_exact_or_eof(12)
    got = bytearray()

    def read_all():
        while len(got) < 4 << 20:
            got.extend(peer.recv(1 << 16))

    reader = threading.Timer(0.2, read_all)  # starts once the buffer is full
    reader.start()
    conn.send(b"x" * (4 << 20))
    reader.join()
    assert len(got) == 4 << 20


def test_a_close_within_the_window_is_an_end(pair):
    mine, peer = pair
    conn = FramedSocket(mine, timeout=30.0, busy_poll=30.0)
    send_later(peer, 0.05, None).join()
    assert conn.recv_exact_or_eof(12) is None


def test_the_idle_timeout_holds_after_the_window(pair):
    mine, _peer = pair
    conn = FramedSocket(mine, timeout=0.3, busy_poll=0.05)
    with pytest.raises(ProtocolError, match=r"no message for 0\.3 s"):
        conn.recv_exact_or_eof(12)


@pytest.mark.parametrize("value", ["-1", "2e6"])
def test_busy_poll_out_of_bounds_is_refused_before_the_model_loads(processes, value):
    proc = processes.start([*MLIPD, "drive", "--address", "unix:nothing", "--species", "Ar",
                            "--model", "lj", "--busy-poll-us", value],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert "--busy-poll-us must be within 0..1e+06" in out, out
    assert "engine ready" not in out, out
