"""Races between requests, the load/unload routes, catalog changes and llamad's own restart,
as users of llama.cpp's router mode and llama-swap would meet them; systemd faked at the
Units boundary and llama-server at its /health (tests/helpers/supervised.py). Tests wait
on events, never on sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers.supervised import Rig, catalog, serving, with_config

from llamad.api import report
from llamad.errors import Unavailable
from llamad.supervisor.events import State
from llamad.supervisor.hooks import Hook
from llamad.supervisor.slot import Slot


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with serving(tmp_path) as r:
        yield r


async def test_a_load_while_the_model_stops_loads_it_once_stopped(rig: Rig) -> None:
    """POST /models/load answered success for a model on its way out, which then stayed
    unloaded: router mode says "already running" instead; llamad loads it again once it
    has stopped, as it does for a request."""
    slot = await rig.ready("tiny-a")
    await rig.sup.unload(slot)
    assert slot.state is State.STOPPING
    await rig.sup.load(slot)
    await rig.watch.until("the stop", lambda: slot.unit in rig.units.stopped)
    rig.units.gone(rig.sup, slot.unit)
    await rig.watch.until("tiny-a to start again", lambda: rig.starts("tiny-a") == 2)
    assert slot.state is State.STARTING  # type: ignore[comparison-overlap]  # moved by the calls above


async def test_an_adopted_model_keeps_the_idle_ttl_it_had_left(rig: Rig) -> None:
    """A model the earlier llamad handed to a TTL timer keeps the time left, even when it
    becomes ready (its /health answers) only after the timer was taken back."""
    r = with_config(rig, idle_ttl=100.0)
    slot = r.slot("tiny-a")
    spec, _ = r.sup.spec(slot)
    await r.units.start(spec)  # systemd restarts the unit while no llamad runs
    await r.units.start_ttl_timer(slot.unit, 40)
    r.units.transient["llamad-ttl@tiny-a.timer"]["due"] = int((time.monotonic() + 40) * 1e6)
    await r.sup.adopt()
    await r.sup.take_back()
    r.units.active(r.sup, slot.unit)
    await r.state("tiny-a", State.READY)
    assert 39 < report.describe(r.sup, slot)["ttl_left"] <= 40
    await r.sup.close()


class SlowSave(Hook):
    """A before_stop that takes its time (a KV cache saved within kv-cache-timeout)."""

    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def before_stop(self, slot: Slot) -> None:
        await self.go.wait()


async def test_an_unload_answers_once_drained_even_while_the_cache_is_saved(rig: Rig) -> None:
    """The unload route waited for the stop call itself, one second past drain-timeout:
    a KV save longer than that (kv-cache-timeout is 3 s by default) made it a 503 timeout
    although the stop went on."""
    r = with_config(rig, drain_timeout=0.0)
    slot = await r.ready("tiny-a")
    save = SlowSave()
    r.sup.hooks = (*r.sup.hooks, save)
    try:
        await asyncio.wait_for(r.sup.unload(slot), 5)
    except Unavailable as e:
        pytest.fail(f"the unload was answered {e.status}: {e.message}")
    assert slot.state is State.STOPPING
    save.go.set()
    await r.watch.until("the stop", lambda: slot.unit in r.units.stopped)
    await r.sup.close()


async def test_a_failed_model_whose_preset_changed_is_tried_again(
        rig: Rig, tmp_path: Path) -> None:
    """A crash loop ends the model failed; the operator fixes its preset. Router mode
    clears a failure when it reloads its presets; llamad kept answering the old reason
    until an explicit load."""
    slot = await rig.ready("tiny-a")
    rig.units.gone(rig.sup, slot.unit, result="exit-code")  # the start limit: failed
    await rig.state("tiny-a", State.FAILED)
    (tmp_path / "presets.ini").write_text("[tiny-a]\nctx-size = 2048\n")
    catalog(rig, models_preset=tmp_path / "presets.ini")
    assert slot.state is State.UNLOADED and not slot.reason
    async def served() -> None:
        backend = await rig.sup.acquire(slot)
        assert backend is slot.backend
        rig.sup.release(slot)
    request = asyncio.ensure_future(served())
    await rig.running("tiny-a")
    await asyncio.wait_for(request, 5)
    assert "2048" in rig.units.specs[slot.unit].argv


async def test_a_swap_with_drain_timeout_0_waits_for_the_evicted_unit_to_exit(
        rig: Rig) -> None:
    """drain-timeout bounds the requests in flight, not llama-server's exit: with 0 every
    load that had to evict failed its model at once (failed for good, until an explicit
    load), since no stop is over in no time."""
    need = rig.sup.measure.need(rig.slot("tiny-a").model).ram
    r = with_config(rig, drain_timeout=0.0, memory_budget_mb=need * 3 // 2 // 2**20 + 1)
    a = await r.ready("tiny-a")
    b = r.slot("tiny-b")
    request = asyncio.ensure_future(r.sup.acquire(b))
    await r.watch.until("tiny-a's stop", lambda: a.unit in r.units.stopped)
    r.units.gone(r.sup, a.unit)
    await r.running("tiny-b")
    assert await asyncio.wait_for(request, 5) is b.backend
    r.sup.release(b)
    await r.sup.close()
