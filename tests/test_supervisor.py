"""The supervisor's queueing rules, with systemd faked at the Units boundary.

The real thing is covered on the box (tests/integration); these pin the bounds that
are slow or racy to hit there: the queue timeout, a full queue, one start for many.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from test_measure import FakeUnits, config, supervisor

from llamad.config import Config
from llamad.errors import Unavailable
from llamad.scheduler import State

__all__ = ["config"]  # the fixture, shared with test_measure


async def test_queue_timeout_is_503_with_retry_after(config: Config) -> None:
    cfg = dataclasses.replace(config, queue_timeout=0.2)
    units = FakeUnits()
    sup = supervisor(cfg, units)
    with pytest.raises(Unavailable) as err:
        await sup.acquire(sup.slots["tiny"])  # systemd never says the unit is active
    assert err.value.status == 503 and err.value.code == "timeout"
    assert int(err.value.headers["Retry-After"]) > 0
    assert units.started == ["llama-server@tiny.service"]
    assert sup.slots["tiny"].queued == 0


async def test_full_queue_is_refused_at_once(config: Config) -> None:
    cfg = dataclasses.replace(config, queue_size=2, queue_timeout=5)
    sup = supervisor(cfg, FakeUnits())
    slot = sup.slots["tiny"]
    waiting = [asyncio.ensure_future(sup.acquire(slot)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Unavailable) as err:
        await sup.acquire(slot)
    assert err.value.code == "queue_full" and "Retry-After" in err.value.headers
    for w in waiting:
        w.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert slot.queued == 0


async def test_many_waiters_one_start_all_served(config: Config) -> None:
    units = FakeUnits()
    sup = supervisor(config, units)
    slot = sup.slots["tiny"]
    waiters = [asyncio.ensure_future(sup.acquire(slot)) for _ in range(50)]
    await asyncio.sleep(0.05)
    assert units.started == ["llama-server@tiny.service"]
    assert slot.state is State.STARTING and slot.queued == 50
    sup.on_unit_change(slot.unit, {"ActiveState": "active", "SubState": "running"})
    assert slot.state is State.LOADING
    # What _wait_healthy does on the first 200 from /health.
    slot.state = State.READY
    sup._notify()
    backends = await asyncio.gather(*waiters)
    assert all(b is slot.backend for b in backends) and slot.in_flight == 50
