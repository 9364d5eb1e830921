"""What llamad tells systemd over NOTIFY_SOCKET (sd_notify), read from a real socket."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamad import app
from llamad.systemd.activation import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    with sock:
        yield sock


async def test_a_stop_asks_systemd_for_the_time_it_may_take(
        notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    """shutdown-grace may be up to 300 s and llamad then takes up to STOP_DEADLINE more,
    while llamad.service's stop timeout is systemd's default 90 s: a grace over 20 s let
    systemd SIGKILL llamad before its own deadline said where it hung, and one over 90 s
    while it still drained. From SIGTERM on, STOPPING=1 extends the timeout to cover it,
    and the deadline counts from SIGTERM, not from the end of the grace."""
    armed: list[float] = []
    monkeypatch.setattr(app, "stop_deadline", armed.append)
    notifier = Notifier()
    slow = app.begin_stop(notifier, grace=300)
    slow.cancel()
    assert notifier._sd is not None
    notifier._sd.socket.close()  # sdnotify's, held for the process's life in llamad
    said = dict(line.split("=", 1) for line in notify_socket.recv(4096).decode().splitlines())
    assert said["STOPPING"] == "1"
    assert armed == [300 + app.STOP_DEADLINE]
    # Past llamad's own deadline, so that its traceback comes before systemd's SIGKILL.
    assert int(said["EXTEND_TIMEOUT_USEC"]) > armed[0] * 1_000_000
    assert slow.when() == pytest.approx(asyncio.get_running_loop().time() + 300
                                        + app.STOP_SLOW, abs=1)
