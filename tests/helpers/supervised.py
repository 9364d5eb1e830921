"""The real Supervisor over systemd faked at its Units boundary (helpers/fakesystemd.py), no
GPU unless a test gives one (helpers/nvml.py), and an empty journal: the rig of the
supervisor's unit tests. Drive it as systemd would with `rig.units.active(...)`/`gone(...)`,
and wait with `rig.watch.until(...)`, never with sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from helpers.fakesystemd import FakeLlamaServers, FakeSystemd, fake_llama_servers, short_dir
from helpers.ggufgen import write_model
from helpers.nvml import NoNvml
from helpers.watch import Watch
from llamad.catalog.catalog import scan
from llamad.config import Config
from llamad.memory.gpu import GpuMonitor
from llamad.memory.measure import Measure
from llamad.supervisor.events import State
from llamad.supervisor.slot import Slot
from llamad.supervisor.supervisor import Supervisor

MODELS = ("tiny-a", "tiny-b", "tiny-c")
MakeRig = Callable[..., "Rig"]  # the make_rig fixture (tests/conftest.py)


def models_config(root: Path, names: Sequence[str], **settings: Any) -> Config:
    """Tiny models `names` in root/models, older than the settle window, the state in
    root/state, no memory held back; `settings` are more Config fields."""
    models = root / "models"
    for name in names:
        os.utime(write_model(models / f"{name}.gguf"), (0, 0))
    return Config.default(**{"models_dirs": (models,), "llama_cache": False,
                             "models_preset": None, "state_dir": root / "state",
                             "memory_reserve_mb": 0, **settings})


async def no_journal(unit: str) -> str:
    return ""


class Rig:
    """A supervisor on a fake systemd, and the Watch that wakes on both."""

    def __init__(self, config: Config, gpus: GpuMonitor | None = None,
                 servers: FakeLlamaServers | None = None) -> None:
        self.others: list[Rig] = []  # made by with_config(self, ...): closed with it
        self.watch = Watch()
        self.units = FakeSystemd(self.watch)
        if gpus is None:
            gpus = GpuMonitor(nvml=NoNvml())
        measure = Measure(config, gpus, state_dir=config.state_dir)
        self.sup = Supervisor(config, scan(config), self.units, measure, no_journal)
        self.watch.follow(self.sup)
        self.servers = servers if servers is not None else FakeLlamaServers()

    def slot(self, name: str) -> Slot:
        return self.sup.slots[name]

    async def close(self) -> None:
        for r in [self, *self.others]:
            await r.sup.close()

    async def state(self, name: str, want: State) -> None:
        await self.watch.until(f"{name} to be {want.value}",
                               lambda: self.slot(name).state is want)

    async def probe(self) -> None:
        """What the daemon's tick does once a second: probe, here awaited to its end."""
        self.sup.probe()
        await asyncio.gather(*(t for t in asyncio.all_tasks()
                               if t.get_name().startswith("probing ")))

    async def started(self, name: str) -> Slot:
        """Wait until the model's unit has been started (by a load or a request)."""
        slot = self.slot(name)
        await self.watch.until(f"{slot.unit} to start", lambda: slot.unit in self.units.running)
        return slot

    async def running(self, name: str) -> Slot:
        """Once the model's unit has been started, drive it to READY as systemd and
        llama-server would."""
        slot = await self.started(name)
        self.units.active(self.sup, slot.unit)
        await self.state(name, State.READY)
        return slot

    async def ready(self, name: str) -> Slot:
        """Load through the real decision path and drive the model to READY."""
        await self.sup.load(self.slot(name))
        return await self.running(name)

    async def stopped(self, name: str) -> None:
        """systemd's side of a stop llamad asked for: the unit goes."""
        slot = self.slot(name)
        await self.watch.until(f"{slot.unit} to be stopped",
                               lambda: slot.unit in self.units.stopped)
        self.units.stopped.remove(slot.unit)
        self.units.gone(self.sup, slot.unit)
        await self.state(name, State.UNLOADED)

    def starts(self, name: str) -> int:
        """How often the model's unit was started."""
        return self.units.started.count(self.slot(name).unit)


def with_config(r: Rig, **changes: Any) -> Rig:
    """Another rig over the same fake llama-servers, with Config fields changed; closed
    with `r`."""
    other = Rig(dataclasses.replace(r.sup.config, **changes), servers=r.servers)
    r.others.append(other)
    return other


def catalog(r: Rig, **changes: Any) -> None:
    """A rescan, as the watcher would publish it."""
    r.sup.update_snapshot(scan(dataclasses.replace(r.sup.config, **changes),
                               previous=r.sup.snapshot))


@contextlib.asynccontextmanager
async def serving(root: Path, names: Sequence[str] = MODELS,
                  **settings: Any) -> AsyncIterator[Rig]:
    """A rig over tiny models `names`, each with a fake llama-server answering /health on
    its socket; closed afterwards (with those with_config made of it)."""
    with short_dir() as run:
        r = Rig(models_config(root, names, run_dir=run, **settings))
        async with fake_llama_servers(run, list(names)) as servers:
            r.servers = servers
            try:
                yield r
            finally:
                await r.close()
