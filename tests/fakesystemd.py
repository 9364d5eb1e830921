"""systemd faked at the supervisor's Units boundary, a llama-server faked at its /health,
and a way to wait for what they and the supervisor do without sleeping.

The property dicts the fake sends are the ones systemd sends, so the supervisor's real
signal path runs. Every call into the fake and every state change of a model pokes
one event that `Watch.until` waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from llamad.supervisor import Supervisor
from llamad.units import UnitError, UnitSpec, UnitStatus


class Watch:
    """Wakes on every call into a FakeSystemd and every model state change."""

    def __init__(self) -> None:
        self._poked = asyncio.Event()

    def poke(self, *_: Any) -> None:
        self._poked.set()

    def follow(self, sup: Supervisor) -> None:
        sup.events.subscribe(self.poke)

    async def until(self, what: str, cond: Callable[[], object], timeout: float = 5) -> None:
        """Wait until cond() holds, re-checking it only when something happened."""
        async def wait() -> None:
            while not cond():
                self._poked.clear()
                await self._poked.wait()
        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


class FakeSystemd:
    """Records calls; a unit exists from its start until the test says it stopped."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.running: dict[str, UnitSpec] = {}
        self.status_error: Exception | None = None
        self.memory_current: int | None = None

    async def start(self, spec: UnitSpec) -> None:
        self.started.append(spec.name)
        self.running[spec.name] = spec
        self.watch.poke()

    async def stop(self, name: str) -> None:
        self.stopped.append(name)
        self.watch.poke()
        if name not in self.running:
            raise UnitError(f"org.freedesktop.systemd1.NoSuchUnit: Unit {name} not loaded.")

    async def reset_failed(self, name: str) -> None:
        pass

    async def status(self, name: str) -> UnitStatus:
        self.watch.poke()
        if self.status_error is not None:
            raise self.status_error
        if name not in self.running:
            return UnitStatus(name)
        return UnitStatus(name, "loaded", "active", "running",
                          memory_current=self.memory_current)

    async def list_ours(self) -> list[UnitStatus]:
        return []

    # What systemd sends (Service interface first, then Unit) ----------------

    def active(self, sup: Supervisor, name: str, pid: int = 4242) -> None:
        sup.on_unit_change(name, {"MainPID": pid, "InvocationID": os.urandom(16)})
        sup.on_unit_change(name, {"ActiveState": "active", "SubState": "running"})

    def gone(self, sup: Supervisor, name: str, result: str = "success") -> None:
        self.running.pop(name, None)
        sup.on_unit_change(name, {"Result": result, "MainPID": 0})
        sup.on_unit_change(name, {"ActiveState": "inactive" if result == "success"
                                  else "failed", "SubState": "dead"})


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A directory whose UNIX socket paths fit in sun_path's 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="llamad-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def fake_llama_servers(run_dir: Path, instances: list[str]) -> AsyncIterator[None]:
    """An HTTP server answering GET /health 200 on each model's socket under run_dir."""
    app = web.Application()
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    for name in instances:
        (run_dir / name).mkdir(parents=True, exist_ok=True)
        await web.UnixSite(runner, str(run_dir / name / "llama.sock")).start()
    try:
        yield
    finally:
        await runner.cleanup()
