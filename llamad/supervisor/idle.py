"""Zero processes when idle. Before llamad exits (idle-exit), each ready model's remaining
idle TTL goes to a systemd timer that stops the model when it runs out, so no model idles
on forever while llamad is away. The next llamad (the socket starts it on demand) takes the
timers back and carries their time left over to the models it adopts.

The timers themselves (what systemd is asked to run) are units.ttl_timer's.
"""

from __future__ import annotations

import logging
import time

from llamad.supervisor.events import State
from llamad.supervisor.scheduler import ttl_left
from llamad.supervisor.sleeping import Sleeping
from llamad.systemd.unitname import ttl_units

log = logging.getLogger("llamad.supervisor")

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
            await self.units.start_ttl_timer(slot.unit, max(left, 1.0))
            log.info("model %s: %.0fs of idle TTL left, handed to %s", slot.model.id, left,
                     ttl_units(slot.unit)[0])
        if self.quiet() and self._uses() == before:
            return True
        log.info("a request came in while the idle TTLs were handed to systemd; staying")
        await self.units.take_ttl_timers()
        return False

    def _uses(self) -> dict[str, tuple[int, float]]:
        """What a request or a state change alters: a hand-off made before it is stale."""
        return {mid: (s.epoch, s.last_used) for mid, s in self.slots.items()}

    async def take_back(self) -> None:
        """Stop the TTL timers an earlier llamad left; an adopted model keeps the time left."""
        for unit, due in (await self.units.take_ttl_timers()).items():
            slot = self.by_unit(unit)
            if slot is None or slot.state is State.UNLOADED or not due:
                continue
            left = max(0.0, due - time.monotonic())
            ttl = self.ttl(slot)
            if ttl is None or ttl < left:
                # A TTL longer than this llamad's own was a request's keep_alive, which
                # only the earlier llamad knew: kept, as what is left of it.
                slot.keep_alive = ttl = left
            slot.last_used = time.monotonic() - max(0.0, ttl - left)
            log.info("model %s: took back %s with %.0fs of idle TTL left", slot.model.id,
                     ttl_units(unit)[0], left)
