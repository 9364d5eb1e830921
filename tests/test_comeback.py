"""restore = yes (guards/comeback.py): the order of things when a model wants to come back,
with systemd faked at the Units boundary and llama-server at its /health. The whole path on
the real box, KV cache included: tests/integration/test_kvdefault.py."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers.fakesystemd import fake_llama_servers, short_dir
from helpers.supervised import Rig, models_config

from llamad.sizes import MIB
from llamad.supervisor.events import State

MODELS = ["tiny-a", "tiny-x", "tiny-b", "tiny-c"]
# tiny-a comes back; tiny-c's context makes it about twice the others' size.
PRESET = "[tiny-a]\nrestore = true\n[tiny-c]\nc = 65536\n"


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    with short_dir() as run_dir:
        (tmp_path / "presets.ini").write_text(PRESET)
        config = models_config(tmp_path, MODELS, models_preset=tmp_path / "presets.ini",
                               run_dir=run_dir)
        # Room for two small models, or for tiny-c alone.
        sizing = Rig(config)
        small, big = (sizing.sup.measure.need(sizing.slot(name).model).ram
                      for name in ("tiny-a", "tiny-c"))
        await sizing.sup.close()  # it only measured
        budget = 2 * small + 10 * MIB
        assert small + big > budget >= big, (small, big)
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
        await rig.running(name)
    await sup.load(rig.slot("tiny-x"))  # evicts tiny-a, the least recently used
    await rig.stopped("tiny-a")
    await rig.running("tiny-x")
    assert a.state is State.UNLOADED and sup.comeback.wanted.keys() == {"tiny-a"}
    evicted_at = sup.comeback.wanted["tiny-a"]  # wall-clock seconds, as events tell it

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
    await rig.running("tiny-c")
    await waiting
    sup.release(rig.slot("tiny-c"))
    assert rig.starts("tiny-a") == 1 and a.state is State.UNLOADED

    # tiny-c leaves: nothing waits and tiny-a fits, so it loads again...
    await sup.unload(rig.slot("tiny-c"))
    await rig.stopped("tiny-c")
    await rig.watch.until("tiny-a to load again", lambda: rig.starts("tiny-a") == 2)
    assert a.state is State.STARTING and sup.comeback.loading == {"tiny-a"}  # type: ignore[comparison-overlap]  # changed by the calls above
    # ...but a request that needs its room stops that load and goes first.
    waiting = asyncio.create_task(sup.acquire(rig.slot("tiny-c")))
    await rig.watch.until("tiny-a's load to stop", lambda: a.state is State.STOPPING)
    await rig.stopped("tiny-a")
    await rig.running("tiny-c")
    await waiting
    sup.release(rig.slot("tiny-c"))
    # Still wanted, once there is room, in the order of its eviction among the others.
    assert sup.comeback.wanted == {"tiny-a": evicted_at}
    await sup.unload(rig.slot("tiny-c"))
    await rig.stopped("tiny-c")
    await rig.running("tiny-a")
    assert rig.starts("tiny-a") == 3 and not sup.comeback.wanted
