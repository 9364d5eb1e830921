"""Scheduling and per-model controls as users of Ollama, llama-swap and llama.cpp's router
mode meet them (outside-eye review, round 2): keep_alive against a pin and across llamad's
own idle exit, a concurrency limit raised while requests wait, and autoload off while a
model stops. systemd faked at the Units boundary, llama-server at its /health
(tests/helpers/supervised.py); tests wait on events, never on sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers.supervised import Rig, catalog, serving, with_config
from helpers.watch import Watch

from llamad.api import report
from llamad.errors import BadRequest, Unavailable
from llamad.supervisor.events import State
from llamad.supervisor.hooks import Hook
from llamad.supervisor.slot import Slot


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with serving(tmp_path) as r:
        yield r


async def test_a_requests_keep_alive_0_does_not_stop_a_pinned_model(rig: Rig) -> None:
    """keep_alive is a TTL, and a pinned model is never stopped by one: expired() kept it
    when another request was still in flight, but release() stopped it at once when the
    keep_alive 0 request was the last one (Continue and others send keep_alive with every
    request). Unpinned, the same request stops it, as in Ollama."""
    slot = await rig.ready("tiny-a")
    rig.sup.set_pin(slot, True)
    await rig.sup.acquire(slot)
    rig.sup.release(slot, keep_alive=0)
    assert slot.state is State.READY
    rig.sup.expire()
    assert slot.state is State.READY
    rig.sup.set_pin(slot, False)
    await rig.sup.acquire(slot)
    rig.sup.release(slot, keep_alive=0)
    assert slot.state is State.STOPPING  # type: ignore[comparison-overlap]  # moved by release


async def test_a_keep_alive_outlives_llamads_idle_exit(rig: Rig) -> None:
    """With idle-exit, llamad hands each model's idle TTL left to a systemd timer and the
    next llamad takes it back. A request's keep_alive ("10m", as an Ollama client sends)
    lived only in the old llamad: with idle-ttl 0 (the default) the new one stopped the
    timer and kept the model loaded for good; with a shorter idle-ttl it cut the time."""
    for idle_ttl, keep_alive in ((0.0, 600.0), (60.0, 600.0)):
        before = with_config(rig, idle_ttl=idle_ttl)
        slot = await before.ready("tiny-a")
        await before.sup.acquire(slot)
        before.sup.release(slot, keep_alive=keep_alive)
        assert await before.sup.hand_off()
        timer = "llamad-ttl@tiny-a.timer"
        (_, usec), = before.units.transient[timer]["TimersMonotonic"]
        due = time.monotonic() + usec / 1e6
        after = with_config(rig, idle_ttl=idle_ttl)
        after.units.units = before.units.units  # the model unit ran on while llamad was away
        after.units.transient[timer] = {"due": int(due * 1e6)}
        await after.sup.adopt()
        await after.sup.take_back()
        adopted = after.slot("tiny-a")
        after.units.active(after.sup, adopted.unit)
        await after.state("tiny-a", State.READY)
        left = report.describe(after.sup, adopted)["ttl_left"]
        assert left is not None and keep_alive - 5 < left <= keep_alive, (idle_ttl, left)
        adopted.last_used -= keep_alive  # its time runs out: the new llamad stops it
        after.sup.expire()
        assert adopted.state is State.STOPPING
        await before.sup.close()
        await after.sup.close()


async def test_raising_a_concurrency_limit_lets_waiting_requests_in(
        rig: Rig, tmp_path: Path) -> None:
    """A preset edit applies without a restart, but a raised concurrency-limit let the
    requests already waiting in line in only when one in flight ended: behind a long
    stream they waited (to queue-timeout's 503) with places free."""
    preset = tmp_path / "presets.ini"
    preset.write_text("[tiny-a]\nconcurrency-limit = 1\n")
    r = with_config(rig, models_preset=preset)
    slot = await r.ready("tiny-a")
    await r.sup.acquire(slot)  # a long stream holds the one place
    waiting = asyncio.ensure_future(r.sup.acquire(slot))
    await r.watch.until("one waiting", lambda: slot.gate.waiting == 1)
    preset.write_text("[tiny-a]\nconcurrency-limit = 2\n")
    catalog(r, models_preset=preset)
    await asyncio.wait_for(waiting, 5)
    assert (slot.in_flight, slot.queued, slot.gate.inside) == (2, 0, 2)
    await r.sup.close()


@pytest.mark.parametrize("how", ["models-autoload = no", "?autoload=false"])
async def test_autoload_off_a_request_waiting_on_a_stopping_model_does_not_load_it(
        rig: Rig, how: str) -> None:
    """models-autoload = no: "requests for unloaded models get 400" (router mode's "model
    is not loaded"; ?autoload=false "never loads it"). A request that came while the
    model drained for an unload waited and then loaded it again, undoing the unload."""
    r = with_config(rig, models_autoload=how == "?autoload=false")
    load = False if how == "?autoload=false" else None
    slot = await r.ready("tiny-a")
    await r.sup.acquire(slot)  # in flight: the unload drains it
    unload = asyncio.ensure_future(r.sup.unload(slot))
    await r.state("tiny-a", State.STOPPING)
    late = asyncio.ensure_future(r.sup.acquire(slot, load=load))
    await r.watch.until("the late request to wait", lambda: slot.queued == 1)
    r.sup.release(slot)
    await unload
    await r.stopped("tiny-a")
    with pytest.raises(BadRequest) as err:
        await asyncio.wait_for(late, 5)
    assert err.value.code == "model_not_loaded"
    assert r.starts("tiny-a") == 1 and slot.state is State.UNLOADED
    await r.sup.close()


class SlowAdmit(Hook):
    """An admit that takes its time, as rpcguard's probe of a model's rpc workers does."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.came = 0
        self.go = asyncio.Event()

    async def admit(self, slot: Slot) -> None:
        self.came += 1
        self.watch.poke()
        await self.go.wait()


async def test_the_queue_limit_holds_for_a_burst_that_came_while_a_hook_awaited(
        rig: Rig) -> None:
    """queue-size was checked before the hooks' admit, which may await (a model over rpc
    workers probes them first): every request of a burst that came meanwhile saw the queue
    empty, and all of them queued past the limit."""
    r = with_config(rig, queue_size=2)
    slow = SlowAdmit(r.watch)
    r.sup.hooks = (slow,)
    slot = r.slot("tiny-a")
    burst = [asyncio.ensure_future(r.sup.acquire(slot)) for _ in range(4)]
    await r.watch.until("the burst at the hook", lambda: slow.came == 4)
    slow.go.set()
    await r.watch.until("the burst sorted", lambda: slot.queued == 2 and sum(
        f.done() for f in burst) == 2)
    refused = [f.exception() for f in burst if f.done()]
    assert all(isinstance(e, Unavailable) and e.code == "queue_full" for e in refused)
    for f in burst:
        f.cancel()
    await asyncio.gather(*burst, return_exceptions=True)
    assert slot.queued == 0
    await r.sup.close()
