"""systemd faked at the supervisor's Units boundary (the one fake of it), and a
llama-server faked at its /health.

The property dicts the fake sends are the ones systemd sends, so the supervisor's real
signal path runs. Every call into the fake pokes the Watch (helpers/watch.py) that the
test waits on; helpers/supervised.py puts it under a real Supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from helpers.watch import Watch
from llamad.supervisor.supervisor import Supervisor
from llamad.systemd.unitname import TTL_TIMER_PATTERN, unit_of_ttl_timer
from llamad.systemd.units import UnitError, UnitSpec, UnitStatus, environment, ttl_timer


class FakeSystemd:
    """Records calls and keeps systemd's view of the units (`units`); a unit is
    activating from its start until the test says it is active, and exists until the
    test says it is gone. Signals are sent only where a test sends them."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.killed: list[tuple[str, int]] = []
        self.asked: list[str] = []  # status() calls
        self.units: dict[str, UnitStatus] = {}
        self.specs: dict[str, UnitSpec] = {}  # the latest start of each unit
        self.transient: dict[str, dict[str, Any]] = {}  # other transient units: properties
        self.status_error: Exception | None = None
        self.memory_current: int | None = None

    @property
    def running(self) -> set[str]:
        return set(self.units)

    async def start(self, spec: UnitSpec, wanted: Any = None) -> None:
        self.started.append(spec.name)
        self.specs[spec.name] = spec
        self.units[spec.name] = UnitStatus(spec.name, "loaded", "activating", "start",
                                           environment=environment(spec))
        self.watch.poke()

    async def stop(self, name: str) -> None:
        self.stopped.append(name)
        self.watch.poke()
        if self.transient.pop(name, None) is not None:
            return
        if name not in self.units:
            raise UnitError(f"org.freedesktop.systemd1.NoSuchUnit: Unit {name} not loaded.")

    async def kill(self, name: str, signal: int) -> None:
        self.killed.append((name, signal))
        self.watch.poke()

    async def reset_failed(self, name: str) -> None:
        pass

    async def status(self, name: str) -> UnitStatus:
        self.asked.append(name)
        self.watch.poke()
        if self.status_error is not None:
            raise self.status_error
        found = self.units.get(name, UnitStatus(name))
        return dataclasses.replace(found, memory_current=self.memory_current)

    async def memory(self, name: str) -> tuple[int | None, int | None]:
        status = await self.status(name)
        return status.memory_current, status.memory_peak

    async def list_ours(self) -> list[UnitStatus]:
        return [s for s in self.units.values() if s.ours]

    async def start_ttl_timer(self, unit: str, seconds: float) -> None:
        for name, props in ttl_timer(unit, seconds):  # what systemd would be asked for
            self.transient[name] = {key: value for key, _sig, value in props}
        self.watch.poke()

    async def take_ttl_timers(self) -> dict[str, float]:
        due = {}
        for timer in [n for n in self.transient if fnmatch.fnmatchcase(n, TTL_TIMER_PATTERN)]:
            due[unit_of_ttl_timer(timer)] = self.transient[timer].get("due", 0) / 1e6
            await self.stop(timer)
        return due

    # systemd's side: its view changes, and (unless quiet) the signals it sends ----------

    def active(self, sup: Supervisor, name: str, pid: int = 4242, quiet: bool = False) -> None:
        invocation = os.urandom(16)
        self.units[name] = dataclasses.replace(
            self.units[name], active_state="active", sub_state="running", main_pid=pid,
            invocation_id=invocation.hex())
        if not quiet:  # the Service interface, then the Unit interface
            sup.on_unit_change(name, {"MainPID": pid, "InvocationID": invocation})
            sup.on_unit_change(name, {"ActiveState": "active", "SubState": "running"})

    def gone(self, sup: Supervisor, name: str, result: str = "success",
             quiet: bool = False) -> None:
        self.units.pop(name, None)
        if not quiet:
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


class FakeLlamaServers:
    """llama-server's /health on each model's socket under run_dir: 200, or no answer at
    all for the instances in `stalled` (a stopped or hung process); its /props, whose
    `is_sleeping` is true for the instances in `sleeping` (--sleep-idle-seconds)."""

    def __init__(self) -> None:
        self.stalled: set[str] = set()
        self.sleeping: set[str] = set()
        self.asked: list[str] = []
        self.ended = asyncio.Event()  # the servers close: stalled answers end too


@contextlib.asynccontextmanager
async def fake_llama_servers(run_dir: Path, instances: list[str]
                             ) -> AsyncIterator[FakeLlamaServers]:
    fake = FakeLlamaServers()
    runners = []
    for name in instances:
        async def health(_: web.Request, name: str = name) -> web.Response:
            fake.asked.append(name)
            if name in fake.stalled:
                await fake.ended.wait()
            return web.json_response({"status": "ok"})
        async def props(_: web.Request, name: str = name) -> web.Response:
            return web.json_response({"role": "model", "is_sleeping": name in fake.sleeping})
        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/props", props)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        (run_dir / name).mkdir(parents=True, exist_ok=True)
        await web.UnixSite(runner, str(run_dir / name / "llama.sock")).start()
        runners.append(runner)
    try:
        yield fake
    finally:
        fake.ended.set()
        for runner in runners:
            await runner.cleanup()
