"""The supervisor's state machine and queueing rules, with systemd faked at the Units
boundary and llama-server at its /health (tests/helpers/supervised.py).

The real thing is covered on the box (tests/integration); these pin the bounds and races
that are slow or unreliable to hit there. Tests wait on events, never on sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import resource
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from helpers.fakesystemd import FakeSystemd
from helpers.ggufgen import write_model
from helpers.nvml import NoNvml
from helpers.supervised import Rig, catalog, no_journal, serving, with_config
from helpers.watch import Watch

from llamad.api import report
from llamad.catalog.catalog import Snapshot, scan
from llamad.config import Config
from llamad.errors import NotFound, Unavailable
from llamad.memory.gpu import GpuMonitor
from llamad.memory.measure import Measure
from llamad.supervisor import lifecycle, reconcile
from llamad.supervisor.events import Cause, State
from llamad.supervisor.slot import Slot
from llamad.supervisor.supervisor import IllegalMove, Supervisor
from llamad.systemd.units import Markers, UnitError, UnitSpec, UnitStatus


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with serving(tmp_path) as r:
        yield r


@pytest.fixture
def config(rig: Rig) -> Config:
    return rig.sup.config


async def test_queue_timeout_is_503_with_retry_after(rig: Rig) -> None:
    r = with_config(rig, queue_timeout=0.2)
    with pytest.raises(Unavailable) as err:
        await r.sup.acquire(r.slot("tiny-a"))  # systemd never says the unit is active
    assert err.value.status == 503 and err.value.code == "timeout"
    assert int(err.value.headers["Retry-After"]) > 0
    assert r.units.started == ["llama-server@tiny-a.service"]
    assert r.slot("tiny-a").queued == 0
    await r.sup.close()


async def test_full_queue_is_refused_at_once(rig: Rig) -> None:
    r = with_config(rig, queue_size=2, queue_timeout=5)
    slot = r.slot("tiny-a")
    waiting = [asyncio.ensure_future(r.sup.acquire(slot)) for _ in range(2)]
    await r.watch.until("two queued requests", lambda: slot.queued == 2)
    with pytest.raises(Unavailable) as err:
        await r.sup.acquire(slot)
    assert err.value.code == "queue_full" and "Retry-After" in err.value.headers
    for w in waiting:
        w.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert slot.queued == 0
    await r.sup.close()


async def test_many_waiters_one_start_all_served(rig: Rig) -> None:
    slot = rig.slot("tiny-a")
    waiters = [asyncio.ensure_future(rig.sup.acquire(slot)) for _ in range(50)]
    await rig.watch.until("fifty queued requests and a start",
                          lambda: slot.queued == 50 and rig.units.started)
    assert rig.units.started == ["llama-server@tiny-a.service"]
    assert slot.state is State.STARTING
    rig.units.active(rig.sup, slot.unit)
    assert slot.state is State.LOADING  # type: ignore[comparison-overlap]  # changed by the call above
    backends = await asyncio.gather(*waiters)  # /health answers: READY, all served
    assert all(b is slot.backend for b in backends) and slot.in_flight == 50


async def test_every_move_is_checked_against_the_table(rig: Rig) -> None:
    slot = rig.slot("tiny-a")
    changes: list[tuple[State, State, Cause]] = []
    rig.sup.events.subscribe(lambda c: changes.append((c.old, c.new, c.cause)))
    with pytest.raises(IllegalMove):
        rig.sup.move(slot, State.READY, Cause.HEALTHY)  # unloaded -> ready skips a start
    assert slot.state is State.UNLOADED and changes == []
    await rig.ready("tiny-a")
    assert changes == [(State.UNLOADED, State.STARTING, Cause.LOAD),
                       (State.STARTING, State.LOADING, Cause.ACTIVE),
                       (State.LOADING, State.READY, Cause.HEALTHY)]


async def test_a_stop_before_the_health_check_runs_is_not_undone(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """The check of /health is a task of its own: a stop may come before it first runs
    (the soak's unload did), and the answer it then gets must not make the model ready."""
    await rig.sup.load(rig.slot("tiny-a"))
    slot = await rig.started("tiny-a")
    rig.units.active(rig.sup, slot.unit)  # loading; its /health check spawned, not yet run
    checks = [t for t in asyncio.all_tasks() if t.get_name().startswith("waiting for /health")]
    await rig.sup.unload(slot)
    await asyncio.wait_for(asyncio.gather(*checks), 10)  # /health answers 200 meanwhile
    assert slot.state is State.STOPPING and checks
    assert "illegal state change" not in caplog.text
    await rig.stopped("tiny-a")


def polls_until(ready_at: float) -> tuple[float, int]:
    """When the /health schedule first looks at or after `ready_at` seconds into a load,
    and how many looks that took."""
    t, looks = 0.0, 1
    while t < ready_at:
        t += lifecycle.health_interval(t)
        looks += 1
    return t, looks


@pytest.mark.parametrize("ready_at", [0.05, 0.3, 0.9, 2.5, 30.0, 600.0])
def test_readiness_is_seen_within_two_percent_of_the_load(ready_at: float) -> None:
    """A 0.9 s load was seen ready up to 100 ms late (a back-off growing by half each
    time); router mode's children say so at once. The looks stay few: under 200 in the
    first seconds, then 10 a second."""
    seen, looks = polls_until(ready_at)
    assert seen - ready_at <= max(lifecycle.HEALTH_FIRST_INTERVAL,
                                  lifecycle.HEALTH_SHARE * ready_at) + 1e-9
    assert looks <= 200 + 10 * ready_at


async def test_an_unload_before_the_start_runs_drops_the_start(rig: Rig) -> None:
    slot = rig.slot("tiny-a")
    await rig.sup.load(slot)  # starting; the unit's start is a task, not yet run
    await rig.sup.unload(slot)
    await rig.state("tiny-a", State.UNLOADED)
    await rig.watch.until("no start left", lambda: not slot.start_pending)
    assert rig.units.started == []


def one_fits(r: Rig) -> Rig:
    """Memory for one model, not two: a load must evict and wait for the stop."""
    need = r.sup.measure.need(r.slot("tiny-a").model).ram
    return with_config(r, memory_budget_mb=need * 3 // 2 // 2**20 + 1)


async def test_a_start_waiting_for_evictions_is_dropped_when_unloaded(rig: Rig) -> None:
    r = one_fits(rig)
    a = await r.ready("tiny-a")
    b = r.slot("tiny-b")
    await r.sup.load(b)
    assert a.state is State.STOPPING and b.state is State.STARTING
    await r.sup.unload(b)  # before tiny-a has stopped
    await r.state("tiny-b", State.UNLOADED)
    r.units.gone(r.sup, a.unit)  # tiny-a's stop lands; the old decision no longer holds
    await r.state("tiny-a", State.UNLOADED)
    assert r.units.started == [a.unit]  # tiny-b was never started behind our back
    await r.sup.close()


async def test_evictions_that_never_finish_fail_the_load(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "STOP_SLACK", 0.0)
    r = one_fits(with_config(rig, drain_timeout=0.2, stop_timeout=0.0, kv_cache="no"))
    await r.ready("tiny-a")
    b = r.slot("tiny-b")
    await r.sup.load(b)  # tiny-a's stop never lands
    await r.state("tiny-b", State.FAILED)
    assert "did not stop within 0.2s (drain-timeout, then stop-timeout)" in b.reason
    assert r.units.started == ["llama-server@tiny-a.service"]
    await r.sup.close()


async def test_a_failing_background_task_fails_the_model(rig: Rig) -> None:
    slot = await rig.ready("tiny-a")
    rig.units.status_error = UnitError("Connection reset by peer")
    # The process dies; confirming that with systemd fails too.
    rig.units.gone(rig.sup, slot.unit, result="exit-code")
    await rig.state("tiny-a", State.FAILED)
    assert "Connection reset by peer" in slot.reason


async def test_ttl_left_follows_the_scheduler(rig: Rig) -> None:
    r = with_config(rig, idle_ttl=100.0)
    slot = await r.ready("tiny-a")
    async with r.sup.use(slot):
        assert report.describe(r.sup, slot)["ttl_left"] is None  # busy: no TTL runs
    assert 99 < report.describe(r.sup, slot)["ttl_left"] <= 100
    await r.sup.close()


async def test_cheapest_reload_evicts_by_learned_load_time(rig: Rig) -> None:
    r = with_config(rig, models_max=2, eviction_policy="cheapest-reload")
    for name, seconds in (("tiny-a", 1.0), ("tiny-b", 30.0)):
        r.sup.measure.learn(r.slot(name).model, 100, None, seconds)  # an earlier run's
    a, b = await r.ready("tiny-a"), await r.ready("tiny-b")
    a.load_seconds = b.load_seconds = None  # adopted: this run timed neither load
    a.last_used, b.last_used = 2.0, 1.0  # tiny-b is the least recently used
    await r.sup.load(r.slot("tiny-c"))
    assert (a.state, b.state) == (State.STOPPING, State.READY)
    await r.sup.close()


# -- reconciling with systemd's view (signals missed) ---------------------------


async def test_reconcile_finds_a_unit_active_without_its_signal(rig: Rig) -> None:
    slot = rig.slot("tiny-a")
    await rig.sup.load(slot)
    await rig.watch.until("the start", lambda: slot.unit in rig.units.running)
    rig.units.active(rig.sup, slot.unit, quiet=True)
    await rig.sup.reconcile()
    await rig.state("tiny-a", State.READY)


async def test_reconcile_unloads_a_unit_stopped_behind_llamads_back(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconcile, "GONE_GRACE", 0.0)
    slot = await rig.ready("tiny-a")
    unit = rig.units.units[slot.unit]
    rig.units.gone(rig.sup, slot.unit, quiet=True)
    await rig.sup.reconcile()
    assert slot.state is State.READY  # one round missing it is no proof: see the next test
    rig.units.units[slot.unit] = unit  # a round that sees it again starts over
    await rig.sup.reconcile()
    rig.units.gone(rig.sup, slot.unit, quiet=True)
    await rig.sup.reconcile()
    assert slot.state is State.READY
    await rig.sup.reconcile()
    assert slot.state is State.UNLOADED and slot.backend is None  # type: ignore[comparison-overlap]
    await rig.ready("tiny-a")  # and an explicit load works again
    assert rig.units.started == [slot.unit] * 2


async def test_a_unit_failed_and_collected_before_its_signals_is_not_a_stop(
        rig: Rig) -> None:
    """A unit that failed for good is collected at once, and the list may be answered before
    the failure's signals (another bus connection) arrive. Taken for a stop, the model was
    unloaded and the request waiting for it started it again (CI: six starts of a unit
    with start-limit-burst = 3)."""
    slot = rig.slot("tiny-a")
    await rig.sup.load(slot)
    await rig.watch.until("the start call to end", lambda: not slot.start_pending)
    rig.units.gone(rig.sup, slot.unit, result="exit-code", quiet=True)
    await rig.sup.reconcile()
    assert slot.state is State.STARTING
    await rig.sup.reconcile()  # within GONE_GRACE of the first: still no proof
    assert slot.state is State.STARTING
    rig.units.gone(rig.sup, slot.unit, result="exit-code")  # the signals arrive
    await rig.state("tiny-a", State.FAILED)
    assert rig.units.started == [slot.unit]


async def test_reconcile_adopts_a_ghost_and_stops_a_stray(rig: Rig) -> None:
    slot = await rig.ready("tiny-a")
    rig.units.gone(rig.sup, slot.unit)  # llamad saw the stop...
    await rig.state("tiny-a", State.UNLOADED)
    spec, _ = rig.sup.spec(slot)
    await rig.units.start(spec)  # ...but a unit of the same model runs again
    rig.units.active(rig.sup, slot.unit, quiet=True)
    stray = dataclasses.replace(spec, name="llama-server@gone.service",
                                markers=Markers("gone", "unix:/nowhere", "0"))
    await rig.units.start(stray)
    rig.units.active(rig.sup, stray.name, quiet=True)
    await rig.sup.reconcile()
    await rig.state("tiny-a", State.READY)
    await rig.watch.until("the stray unit's stop", lambda: stray.name in rig.units.stopped)
    assert slot.unit not in rig.units.stopped


async def test_a_start_that_ends_while_units_are_listed_waits_for_the_next_round(
        rig: Rig) -> None:
    """The list was asked for while the start call was in flight, and answered before the
    unit existed: no unit in it is no news of the model (it was taken for a stop behind
    llamad's back, and the model unloaded and started again and again)."""
    slot = rig.slot("tiny-a")
    start, list_ours = rig.units.start, rig.units.list_ours
    starting, start_may_end, listed, list_may_end = (asyncio.Event() for _ in range(4))

    async def slow_start(spec: UnitSpec, wanted: Any = None) -> None:
        starting.set()
        await start_may_end.wait()
        await start(spec, wanted)

    async def slow_list() -> list[UnitStatus]:
        found = await list_ours()  # systemd answers before the unit exists
        listed.set()
        await list_may_end.wait()
        return found
    rig.units.start = slow_start  # type: ignore[method-assign]
    rig.units.list_ours = slow_list  # type: ignore[method-assign]
    await rig.sup.load(slot)
    await asyncio.wait_for(starting.wait(), 5)
    one_round = asyncio.ensure_future(rig.sup.reconcile())
    await asyncio.wait_for(listed.wait(), 5)
    start_may_end.set()
    await rig.watch.until("the start call to end", lambda: not slot.start_pending)
    list_may_end.set()
    await one_round
    assert slot.state is State.STARTING and rig.units.started == [slot.unit]
    rig.units.active(rig.sup, slot.unit)
    await rig.state("tiny-a", State.READY)


async def test_reconcile_follows_a_restart_it_was_not_told_of(rig: Rig) -> None:
    slot = await rig.ready("tiny-a")
    old = slot.invocation_id
    rig.units.active(rig.sup, slot.unit, pid=4343, quiet=True)  # a new invocation
    await rig.sup.reconcile()
    assert slot.state is State.LOADING and slot.invocation_id != old
    await rig.state("tiny-a", State.READY)


async def test_unit_removed_is_checked_not_believed(rig: Rig,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from llamad.systemd.units import REMOVED
    monkeypatch.setattr(reconcile, "GONE_GRACE", 0.0)
    slot = await rig.ready("tiny-a")
    # daemon-reload sends UnitRemoved for every unit, running ones included.
    rig.sup.on_unit_change(slot.unit, {REMOVED: True})
    assert rig.sup._reconcile_now.is_set()  # the reconcile loop looks at once
    await rig.sup.reconcile()
    assert slot.state is State.READY
    rig.units.gone(rig.sup, slot.unit, quiet=True)
    rig.sup.on_unit_change(slot.unit, {REMOVED: True})
    await rig.sup.reconcile()
    await rig.sup.reconcile()
    assert slot.state is State.UNLOADED  # type: ignore[comparison-overlap]  # changed by the call above


# -- wedged backends ----------------------------------------------------------------------


async def test_a_silent_backend_is_wedged_and_restarted(rig: Rig) -> None:
    r = with_config(rig, liveness_timeout=0.3)
    slot = await r.ready("tiny-a")
    old = slot.backend
    assert old is not None
    old.session()  # its clients' connections
    r.servers.stalled.add("tiny-a")  # kill -STOP
    while slot.state is State.READY:
        await r.probe()
    assert slot.state is State.STARTING and slot.backend is not old
    await r.watch.until("the kill", lambda: r.units.killed == [(slot.unit, signal.SIGKILL)])
    # Still the stopped process (a signal before the kill lands): not the new one yet.
    r.sup.on_unit_change(slot.unit, {"ActiveState": "active", "SubState": "running"})
    assert slot.state is State.STARTING
    r.servers.stalled.clear()
    r.units.active(r.sup, slot.unit)  # systemd's Restart=: a new process, a new invocation
    await r.state("tiny-a", State.READY)
    await r.sup.close()


async def test_a_backend_that_answers_is_left_alone(rig: Rig) -> None:
    r = with_config(rig, liveness_timeout=0.3)
    slot = await r.ready("tiny-a")
    for _ in range(3):
        asked = len(r.servers.asked)
        await r.probe()
        assert len(r.servers.asked) == asked + 1
    assert slot.state is State.READY and r.units.killed == []
    await r.sup.close()


async def test_a_probe_llamad_cannot_make_is_no_wedge(rig: Rig) -> None:
    """Out of descriptors, llamad cannot ask /health (EMFILE): that says nothing of the
    backend, which must not be killed for it (issue #10, item 2)."""
    r = with_config(rig, liveness_timeout=0.3)
    slot = await r.ready("tiny-a")
    assert slot.backend is not None
    await slot.backend.close()  # no pooled connection: each probe must open one
    asked = len(r.servers.asked)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest = os.dup(0)  # the lowest free descriptor: from here on, socket() gets EMFILE
    os.close(lowest)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
    try:
        until = time.monotonic() + 1.0  # beyond the liveness-timeout, several times
        while time.monotonic() < until and slot.state is State.READY:
            await r.probe()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(r.servers.asked) == asked  # the probes never got through
    assert slot.state is State.READY and r.units.killed == []
    await r.sup.close()


async def test_a_stale_wedge_report_is_ignored(rig: Rig) -> None:
    slot = await rig.ready("tiny-a")
    old = slot.backend
    assert old is not None
    rig.sup.wedged(slot, old, "no bytes for 30s")
    assert slot.state is State.STARTING
    rig.sup.wedged(slot, old, "a second report from another request")
    await rig.watch.until("the kill", lambda: rig.units.killed)
    assert rig.units.killed == [(slot.unit, signal.SIGKILL)]


# -- files changing under load ------------------------------------------------------------


async def test_a_removed_model_is_drained_not_cut(rig: Rig, config: Config) -> None:
    slot = await rig.ready("tiny-a")
    async with rig.sup.use(slot) as backend:
        session = backend.session()  # a stream in flight
        (config.models_dirs[0] / "tiny-a.gguf").unlink()
        catalog(rig)
        assert slot.state is State.STOPPING
        assert rig.units.stopped == [] and not session.closed
    await rig.watch.until("the stop once the stream ended", lambda: rig.units.stopped)
    assert session.closed
    rig.units.gone(rig.sup, slot.unit)
    assert "tiny-a" not in rig.sup.slots


async def test_an_edited_preset_restarts_the_model_with_its_new_arguments(
        rig: Rig, config: Config, tmp_path: Path) -> None:
    slot = await rig.ready("tiny-a")
    first = rig.units.specs[slot.unit].argv
    (tmp_path / "presets.ini").write_text("[tiny-a]\nctx-size = 2048\n")
    catalog(rig, models_preset=tmp_path / "presets.ini")
    assert slot.state is State.STOPPING
    await rig.watch.until("the stop", lambda: rig.units.stopped)
    rig.units.gone(rig.sup, slot.unit)
    await rig.watch.until("a new start", lambda: len(rig.units.started) == 2)
    argv = rig.units.specs[slot.unit].argv
    assert "2048" in argv and "2048" not in first


async def test_a_request_for_a_model_being_copied_in_waits(rig: Rig, config: Config) -> None:
    fresh = config.models_dirs[0] / "fresh.gguf"
    write_model(fresh)  # just copied: still "being written"

    async def rescan() -> None:
        catalog(rig)
    rig.sup.rescan = rescan
    found = asyncio.ensure_future(rig.sup.find("fresh"))
    await rig.watch.until("the copy to be seen", lambda: "fresh" in rig.sup.snapshot.settling)
    assert not found.done()
    os.utime(fresh, (0, 0))  # the copy is done
    catalog(rig)
    assert (await found).model.id == "fresh"
    with pytest.raises(NotFound):
        await rig.sup.find("never-copied")


# -- idle TTLs while llamad is away -------------------------------------------------------


async def test_idle_ttls_go_to_systemd_and_come_back(rig: Rig) -> None:
    r = with_config(rig, idle_ttl=100.0)
    slot = await r.ready("tiny-a")
    assert r.sup.quiet()
    assert await r.sup.hand_off()
    timer = r.units.transient["llamad-ttl@tiny-a.timer"]
    ((base, usec),) = timer["TimersMonotonic"]
    assert base == "OnActiveSec" and 99e6 < usec <= 100e6
    assert r.units.transient["llamad-ttl@tiny-a.service"]["Conflicts"] == [slot.unit]
    # The next llamad adopts the model; the timer was due in 40 s.
    timer["due"] = int((time.monotonic() + 40) * 1e6)
    slot.last_used = time.monotonic()
    await r.sup.take_back()
    assert "llamad-ttl@tiny-a.timer" in r.units.stopped
    assert 39 < report.describe(r.sup, slot)["ttl_left"] <= 40
    await r.sup.close()


async def test_a_request_during_the_hand_off_keeps_llamad(rig: Rig) -> None:
    r = with_config(rig, idle_ttl=100.0)
    slot = await r.ready("tiny-a")
    make_timer = r.units.start_ttl_timer

    async def and_a_request(unit: str, seconds: float) -> None:
        await make_timer(unit, seconds)
        await r.sup.acquire(slot)  # it came in while systemd made the timer
        r.sup.release(slot)
    r.units.start_ttl_timer = and_a_request  # type: ignore[method-assign]
    assert not await r.sup.hand_off()  # llamad stays: the TTL handed over is stale
    assert "llamad-ttl@tiny-a.timer" in r.units.stopped
    assert "llamad-ttl@tiny-a.timer" not in r.units.transient


async def test_not_quiet_while_a_model_starts(rig: Rig) -> None:
    await rig.sup.load(rig.slot("tiny-a"))
    assert not rig.sup.quiet()


async def test_a_model_failed_by_a_bus_error_is_taken_back_from_systemd(rig: Rig) -> None:
    slot = await rig.ready("tiny-a")
    rig.units.status_error = UnitError("Connection reset by peer")
    rig.units.gone(rig.sup, slot.unit, result="exit-code", quiet=True)
    rig.sup.on_unit_change(slot.unit, {"ActiveState": "failed", "SubState": "failed"})
    await rig.state("tiny-a", State.FAILED)  # systemd could not say otherwise
    rig.units.status_error = None
    spec, _ = rig.sup.spec(slot)
    await rig.units.start(spec)  # while systemd, in fact, restarted it
    rig.units.active(rig.sup, slot.unit, quiet=True)
    await rig.sup.reconcile()
    await rig.state("tiny-a", State.READY)


async def test_reconcile_confirms_a_failure_before_failing_the_model(rig: Rig) -> None:
    # systemd 252 shows "failed" on the way to an automatic restart, so llamad asks again,
    # and by then systemd restarts it: not failed.
    slot = await failure_checked_as(rig, active_state="activating", sub_state="auto-restart")
    assert slot.state is not State.FAILED


async def test_a_restart_queued_behind_failed_is_not_a_failure(rig: Rig) -> None:
    """Between systemd 252's "failed" and the restart it queues, the unit is inactive with a
    start job waiting (and its Result already reset to success): a check of the failure that
    lands there is no failure. The soak saw one, the model failed ("systemd result
    'success'") and its requests refused until a reconcile adopted the restarted unit."""
    slot = await failure_checked_as(rig, active_state="inactive", sub_state="dead", job=1234)
    assert slot.state is not State.FAILED


async def failure_checked_as(rig: Rig, **status: Any) -> Slot:
    """A ready model's unit shows "failed" to a reconcile; the check of that failure then
    finds the unit with `status`. Returns once the check is done."""
    slot = await rig.ready("tiny-a")
    rig.units.units[slot.unit] = dataclasses.replace(
        rig.units.units[slot.unit], active_state="failed", sub_state="failed")
    status_calls = len(rig.units.asked)
    await rig.sup.reconcile()
    rig.units.units[slot.unit] = dataclasses.replace(rig.units.units[slot.unit], **status)
    await rig.watch.until("the check", lambda: len(rig.units.asked) > status_calls)
    await asyncio.gather(*(t for t in asyncio.all_tasks()
                           if t.get_name() == "recording the failure of tiny-a"))
    return slot


async def test_requests_wait_for_the_first_scan_then_get_503(config: Config) -> None:
    """llamad serves before its first scan is in (app.py has requests wait_open): a
    request waits for it, bounded by queue-timeout, and is then answered 503."""
    measure = Measure(config, GpuMonitor(nvml=NoNvml()), state_dir=config.state_dir)
    empty = Snapshot(MappingProxyType({}))
    sup = Supervisor(config, empty, FakeSystemd(Watch()), measure, no_journal, opened=False)
    waiting = asyncio.ensure_future(sup.wait_open())
    await asyncio.sleep(0)  # one turn of the loop: it is waiting now
    assert not waiting.done()
    sup.update_snapshot(scan(config))
    sup.opened.set()
    await waiting
    assert (await sup.find("tiny-a")).model.id == "tiny-a"
    late = Supervisor(dataclasses.replace(config, queue_timeout=0.1), empty,
                      FakeSystemd(Watch()), measure, no_journal, opened=False)
    with pytest.raises(Unavailable, match="still reading its models") as e:
        await late.wait_open()
    assert e.value.code == "catalog_scanning" and e.value.headers["Retry-After"] == "2"
    await sup.close()
    await late.close()
