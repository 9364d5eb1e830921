"""llamad's exit status after it gave up on itself: non-zero, so that systemd restarts it."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from helpers.catalogs import config

from llamad import app
from llamad.app import Daemon
from llamad.systemd.activation import Notifier


async def test_a_tick_that_ended_is_a_failure(tmp_path: Path) -> None:
    """llamad.service has Restart=on-failure, which restarts nothing after exit status 0:
    a llamad whose tick died exited 0 and stayed down (no idle TTLs, no reconciling) until
    a client happened to connect."""
    async def tick() -> None:
        raise RuntimeError("a bug")

    daemon = Daemon(config(tmp_path), Notifier())
    try:
        task = asyncio.get_running_loop().create_task(tick())
        await asyncio.gather(task, return_exceptions=True)
        daemon._tick_ended(task)
        assert daemon.stop.is_set()
        assert daemon.exit_status == 1
    finally:
        daemon.journal.close()


def test_serve_s_status_is_llamads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def serve(config: Any, sockets: list[socket.socket], notifier: Notifier) -> int:
        for sock in sockets:
            sock.close()
        return 1

    conf = tmp_path / "llamad.conf"
    conf.write_text(f"models-dir = {tmp_path}\nllama-cache = no\nstate-dir = {tmp_path}\n")
    monkeypatch.setattr(app, "serve", serve)
    monkeypatch.setattr(app, "load", lambda path: (config(tmp_path), None))
    assert app.run(conf, "127.0.0.1:0") == 1
