"""restore = yes (guards/comeback.py): the order of things when a model wants to come back,
with systemd faked at the Units boundary and llama-server at its /health. The whole path on
the real box, KV cache included: tests/integration/test_kvdefault.py."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fakesystemd import FakeSystemd, Watch, fake_llama_servers, short_dir
from ggufgen import write_model
from test_measure import NoNvml

from llamad.catalog.catalog import scan
from llamad.config import Config
from llamad.memory.gpu import GpuMonitor
from llamad.memory.measure import Measure
from llamad.sizes import MIB
from llamad.supervisor.events import State
from llamad.supervisor.slot import Slot
from llamad.supervisor.supervisor import Supervisor

MODELS = ["tiny-a", "tiny-x", "tiny-b", "tiny-c"]
# tiny-a comes back; tiny-c's context makes it about twice the others' size.
PRESET = "[tiny-a]\nrestore = true\n[tiny-c]\nc = 65536\n"


class Rig:
    def __init__(self, config: Config) -> None:
        self.watch = Watch()
        self.units = FakeSystemd(self.watch)
        measure = Measure(config, GpuMonitor(nvml=NoNvml()), state_dir=config.state_dir)
        self.sup = Supervisor(config, scan(config), self.units, measure, no_journal)
        self.watch.follow(self.sup)

    def slot(self, name: str) -> Slot:
        return self.sup.slots[name]

    async def state(self, name: str, want: State) -> None:
        await self.watch.until(f"{name} to be {want.value}",
                               lambda: self.slot(name).state is want)

    async def started(self, name: str) -> None:
        slot = self.slot(name)
        await self.watch.until(f"{slot.unit} to start", lambda: slot.unit in self.units.running)
        self.units.active(self.sup, slot.unit)
        await self.state(name, State.READY)

    async def stopped(self, name: str) -> None:
        """systemd's side of a stop llamad asked for: the unit goes."""
        slot = self.slot(name)
        await self.watch.until(f"{slot.unit} to be stopped",
                               lambda: slot.unit in self.units.stopped)
        self.units.stopped.remove(slot.unit)
        self.units.gone(self.sup, slot.unit)
        await self.state(name, State.UNLOADED)

    def starts(self, name: str) -> int:
        return self.units.started.count(self.slot(name).unit)


async def no_journal(unit: str) -> str:
    return ""


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    with short_dir() as run_dir:
        models = tmp_path / "models"
        for name in MODELS:
            os.utime(write_model(models / f"{name}.gguf"), (0, 0))
        (tmp_path / "presets.ini").write_text(PRESET)
        config = Config.default(models_dirs=(models,), llama_cache=False,
                                models_preset=tmp_path / "presets.ini",
                                state_dir=tmp_path / "state", memory_reserve_mb=0,
                                run_dir=run_dir)
        # Room for two small models, or for tiny-c alone.
        r = Rig(config)
        small = r.sup.measure.need(r.slot("tiny-a").model).ram
        big = r.sup.measure.need(r.slot("tiny-c").model).ram
        budget = 2 * small + 10 * MIB
        assert small + big > budget >= big, (small, big)
        await r.sup.close()  # it only measured
        r = Rig(dataclasses.replace(config, memory_budget_mb=budget // MIB))
        async with fake_llama_servers(run_dir, MODELS):
            yield r
            await r.sup.close()


async def test_an_evicted_model_comes_back_after_waiting_requests_and_gives_way_to_them(
        rig: Rig) -> None:
    sup, a = rig.sup, rig.slot("tiny-a")
    assert a.model.settings.restore and not rig.slot("tiny-b").model.settings.restore
    for name in ("tiny-a", "tiny-b"):
        await sup.load(rig.slot(name))
        await rig.started(name)
    await sup.load(rig.slot("tiny-x"))  # evicts tiny-a, the least recently used
    await rig.stopped("tiny-a")
    await rig.started("tiny-x")
    assert a.state is State.UNLOADED and sup.comeback.wanted.keys() == {"tiny-a"}

    # tiny-c needs the room of both others while both are busy: its request waits.
    x = await sup.acquire(rig.slot("tiny-x"))
    b = await sup.acquire(rig.slot("tiny-b"))
    assert x is not None and b is not None
    waiting = asyncio.create_task(sup.acquire(rig.slot("tiny-c")))
    await rig.watch.until("tiny-c's request to wait", lambda: rig.slot("tiny-c").queued)
    sup.release(rig.slot("tiny-x"))
    await sup.unload(rig.slot("tiny-x"))
    await rig.stopped("tiny-x")  # room for tiny-a again, but tiny-c's request waits
    sup.release(rig.slot("tiny-b"))  # tiny-c evicts tiny-b
    await rig.stopped("tiny-b")
    await rig.started("tiny-c")
    await waiting
    sup.release(rig.slot("tiny-c"))
    assert rig.starts("tiny-a") == 1 and a.state is State.UNLOADED

    # tiny-c leaves: nothing waits and tiny-a fits, so it loads again...
    await sup.unload(rig.slot("tiny-c"))
    await rig.stopped("tiny-c")
    await rig.watch.until("tiny-a to load again", lambda: rig.starts("tiny-a") == 2)
    assert a.state is State.STARTING and sup.comeback.loading == {"tiny-a"}
    # ...but a request that needs its room stops that load and goes first.
    waiting = asyncio.create_task(sup.acquire(rig.slot("tiny-c")))
    await rig.watch.until("tiny-a's load to stop", lambda: a.state is State.STOPPING)
    await rig.stopped("tiny-a")
    await rig.started("tiny-c")
    await waiting
    sup.release(rig.slot("tiny-c"))
    assert sup.comeback.wanted.keys() == {"tiny-a"}  # still wanted, once there is room
    await sup.unload(rig.slot("tiny-c"))
    await rig.stopped("tiny-c")
    await rig.started("tiny-a")
    assert rig.starts("tiny-a") == 3 and not sup.comeback.wanted
