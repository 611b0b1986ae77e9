"""The systemd notify protocol, spoken to a socket the test opens (as systemd would)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from metis_async.systemd import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20.0)
    yield path, sock
    sock.close()


def _messages(sock: socket.socket, until: bytes, limit: int = 200) -> list[bytes]:
    seen = []
    for _ in range(limit):
        data = sock.recv(4096)
        seen.append(data)
        if until in data:
            return seen
    raise AssertionError(f"{until!r} never arrived: {seen[-5:]}")


def test_notify_sends_the_lines_as_one_datagram(notify_socket) -> None:  # type: ignore[no-untyped-def]
    path, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})

    sent = notifier.notify("READY=1", "STATUS=serving")

    assert sent
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"


def test_abstract_socket_names_are_understood() -> None:
    name = f"metis-async-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5.0)

    Notifier({"NOTIFY_SOCKET": "@" + name}).notify("WATCHDOG=1")

    assert sock.recv(64) == b"WATCHDOG=1"
    sock.close()


def test_outside_systemd_nothing_is_sent() -> None:
    notifier = Notifier({})

    assert not notifier.enabled
    assert not notifier.notify("READY=1")


def test_a_watchdog_meant_for_another_process_is_ignored() -> None:
    mine = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000"})
    other = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})

    assert mine.watchdog_seconds == 2.0
    assert other.watchdog_seconds is None


def test_serve_is_ready_pets_the_watchdog_and_stops_cleanly_on_sigterm(
    notify_socket,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    path, sock = notify_socket
    model = tmp_path / "init.npz"
    np.savez(model, np.zeros(4, np.float32))
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "300000"}
    command = [sys.executable, "-m", "metis_async.cli", "serve", "--port", "0"]
    command += ["--init-model", str(model), "--state-dir", str(tmp_path / "state")]
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        ready = _messages(sock, b"READY=1")
        beats = [m for m in _messages(sock, b"WATCHDOG=1") if m == b"WATCHDOG=1"]
        time.sleep(0.5)  # a few more beats
        process.send_signal(signal.SIGTERM)
        stopping = _messages(sock, b"STOPPING=1")
        code = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()

    assert b"STATUS=serving synchronous" in ready[-1]
    assert beats
    assert any(b"STOPPING=1" in m for m in stopping)
    assert code == 0
    assert list((tmp_path / "state").glob("checkpoint-*.npz"))  # version 0 was made durable
