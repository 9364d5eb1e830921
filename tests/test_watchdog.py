"""The tick's WATCHDOG=1 pings keep coming while systemd is slow to answer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from helpers.catalogs import config

from llamad import app
from llamad.api import report
from llamad.app import Daemon
from llamad.systemd.activation import Notifier


class Pings(Notifier):
    def __init__(self) -> None:
        super().__init__()
        self.pings = 0

    def watchdog(self) -> None:
        self.pings += 1

    def status(self, status: str) -> None:
        pass


class Sup:
    """What the tick asks of the supervisor, with every model settled."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []

    def expire(self) -> None: ...
    def probe(self) -> None: ...
    def watch_sleep(self) -> None: ...

    def quiet(self) -> bool:
        return False

    def spawn(self, coro: Any, what: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=what)
        self.tasks.append(task)
        return task


async def test_a_slow_systemd_does_not_starve_the_watchdog(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Measuring memory asks systemd for each running model (a D-Bus call sd-bus gives 25 s
    before it gives up). Awaited in the tick, a systemd that does not answer held back the
    next WATCHDOG=1 for as long, and two models' calls outlast WatchdogSec=30s: systemd
    killed a healthy llamad. The measurement runs beside the tick, one at a time."""
    systemd_answers = asyncio.Event()
    measured = 0

    async def sample(sup: Any) -> None:
        nonlocal measured
        measured += 1
        await systemd_answers.wait()

    monkeypatch.setattr(app, "sample", sample)
    monkeypatch.setattr(report, "status_line", lambda sup: "")
    notifier = Pings()
    daemon = Daemon(config(tmp_path), notifier)
    sup = Sup()
    daemon.sup = sup  # type: ignore[assignment]
    try:
        for _ in range(3):
            await asyncio.wait_for(daemon._tick_once(), 5)
        await asyncio.sleep(0)  # the measurement's task starts
        assert notifier.pings == 3
        assert measured == 1  # the next tick does not queue another behind the slow one
        systemd_answers.set()
        await asyncio.gather(*sup.tasks)
        await daemon._tick_once()
        await asyncio.sleep(0)
        assert measured == 2
    finally:
        systemd_answers.set()
        await asyncio.gather(*sup.tasks)
        daemon.journal.close()
