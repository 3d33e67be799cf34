"""The node's talk with HAProxy's master CLI: a reload is asked again while the master refuses
connections (it is running a reload asked a moment before, or starting), never twice."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from workers.proxy import _ask_master


def bound_not_listening(path: Path) -> socket.socket:
    """A socket file nobody accepts on: a connection is refused, as HAProxy's master's is then."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    return server


def test_a_reload_is_asked_again_while_the_master_refuses_and_delivered_once(tmp_path: Path) -> None:
    path = tmp_path / "master.sock"
    server = bound_not_listening(path)
    received: list[bytes] = []

    def accept_later() -> None:
        time.sleep(0.3)
        server.listen(1)
        connection, _ = server.accept()
        data = b""
        while chunk := connection.recv(1024):  # the master CLI answers once the client half-closes
            data += chunk
        received.append(data)
        connection.sendall(b"ok\n")
        connection.close()

    later = threading.Thread(target=accept_later)
    later.start()
    try:
        assert _ask_master(path, "reload", busy_for=5) == "ok\n"
    finally:
        later.join(timeout=5)
        server.close()
    assert received == [b"reload\n"]


@pytest.mark.parametrize("socket_file", [True, False])  # refused, or no socket file at all
def test_a_master_that_keeps_refusing_fails_after_its_time(tmp_path: Path, socket_file: bool) -> None:
    path = tmp_path / "master.sock"
    server = bound_not_listening(path) if socket_file else None
    t0 = time.monotonic()
    with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
        _ask_master(path, "reload", busy_for=0.3)
    assert 0.3 <= time.monotonic() - t0 < 3
    if server is not None:
        server.close()
