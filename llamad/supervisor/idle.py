"""Zero processes when idle. Before llamad exits (idle-exit), each ready model's remaining
idle TTL goes to a systemd timer that stops the model when it runs out, so no model idles
on forever while llamad is away. The next llamad (the socket starts it on demand) takes the
timers back and carries their time left over to the models it adopts.

The timer starts a oneshot service that conflicts with the model's unit: starting it makes
systemd stop the model, with no process of llamad's needed.
"""

from __future__ import annotations

import logging
import time

from llamad.supervisor.events import State
from llamad.supervisor.scheduler import ttl_left
from llamad.supervisor.sleeping import Sleeping
from llamad.systemd.bus import Props, UnitError
from llamad.systemd.unitname import TTL_TIMER_PATTERN, ttl_units, unit_of_ttl_timer

log = logging.getLogger("llamad.supervisor")

TIMER_IFACE = b"org.freedesktop.systemd1.Timer"
USEC = 1_000_000
TRUE = "/bin/true"


def timer_props(unit: str, seconds: float) -> Props:
    return [("Description", b"s", f"Stop {unit} when its idle TTL runs out (from llamad)"),
            ("TimersMonotonic", b"a(st)", [("OnActiveSec", int(seconds * USEC))]),
            ("AccuracyUSec", b"t", USEC),  # systemd's default would allow a minute late
            ("RemainAfterElapse", b"b", False)]


def service_props(unit: str) -> Props:
    return [("Description", b"s", f"Stop {unit}: its idle TTL ran out"),
            ("Type", b"s", "oneshot"), ("Conflicts", b"as", [unit]),
            ("ExecStart", b"a(sasb)", [(TRUE, [TRUE], False)])]


class Idle(Sleeping):
    def quiet(self) -> bool:
        """Nothing in flight, queued, or half-way through a change: llamad may exit."""
        return all(s.state in (State.UNLOADED, State.READY, State.SLEEPING, State.FAILED)
                   and not s.in_flight and not s.queued for s in self.slots.values())

    async def hand_off(self) -> bool:
        """Give each ready model's remaining idle TTL to a systemd timer (raises UnitError).
        False: a request came in while the timers were made (their TTLs are stale now), so
        they are stopped again and llamad stays."""
        before = self._uses()
        now = time.monotonic()
        for slot in self.loaded():
            left = ttl_left(self.view(slot), now, self.ttl(slot))
            if left is None:  # pinned, or kept forever: it outlives llamad as it would
                continue
            timer, service = ttl_units(slot.unit)
            await self.units.start_transient(timer, timer_props(slot.unit, max(left, 1.0)),
                                             [(service, service_props(slot.unit))])
            log.info("model %s: %.0fs of idle TTL left, handed to %s", slot.model.id, left, timer)
        if self.quiet() and self._uses() == before:
            return True
        log.info("a request came in while the idle TTLs were handed to systemd; staying")
        await self._stop_timers()
        return False

    def _uses(self) -> dict[str, tuple[int, float]]:
        """What a request or a state change alters: a hand-off made before it is stale."""
        return {mid: (s.epoch, s.last_used) for mid, s in self.slots.items()}

    async def take_back(self) -> None:
        """Stop the TTL timers an earlier llamad left; an adopted model keeps the time left."""
        for unit, due in (await self._stop_timers()).items():
            slot = self.by_unit(unit)
            ttl = self.ttl(slot) if slot is not None else None
            if slot is None or slot.state is State.UNLOADED or not due or ttl is None:
                continue
            left = max(0.0, due - time.monotonic())
            slot.last_used = time.monotonic() - max(0.0, ttl - left)
            log.info("model %s: took back %s with %.0fs of idle TTL left", slot.model.id,
                     ttl_units(unit)[0], left)

    async def _stop_timers(self) -> dict[str, float]:
        """Stop the TTL timers there are: when each model unit's was due (monotonic
        seconds; 0 when systemd did not say)."""
        due: dict[str, float] = {}
        for timer in await self.units.names(TTL_TIMER_PATTERN):
            try:
                props = await self.units.properties(timer, TIMER_IFACE)
                await self.units.stop(timer)
            except UnitError as e:  # it fired meanwhile, or systemd says no: carry on
                log.warning("taking back %s: %s", timer, e)
                continue
            due[unit_of_ttl_timer(timer)] = int(props.get("NextElapseUSecMonotonic", 0)) / USEC
        return due
