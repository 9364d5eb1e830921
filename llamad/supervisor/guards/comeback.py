"""`restore = yes` (a preset key; the default for pinned and load-on-startup models): a model
evicted to make room for another loads again, with its KV cache (kvcache.py), as soon as
the memory that evicted it is free again. Like llama-swap's baseline models.

- **When.** A model this hook saw evicted (READY -> STOPPING for models-max or memory) is
  wanted back. Whenever a model's unit has stopped, the wanted ones are loaded in the
  order they were evicted, each only if it fits beside what is loaded without stopping or
  waiting for anything (`Port.fits_now`). A request, or a load, of the model itself ends
  the wish.
- **A waiting request goes first.** Nothing comes back while any request waits for a model;
  and a request that has to wait for a model while a comeback is still loading stops that
  load (`Port.yield_load`), unless its own model fits beside it anyway. A comeback that
  has become ready is an ordinary idle model, evicted like any other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from llamad.supervisor.events import Cause, Change, State
from llamad.supervisor.hooks import Hook

if TYPE_CHECKING:
    from llamad.supervisor.hooks import Port
    from llamad.supervisor.slot import Slot

log = logging.getLogger("llamad.comeback")

EVICTED = (Cause.EVICT_COUNT, Cause.EVICT_MEMORY)
GONE = (State.UNLOADED, State.FAILED)


class Comeback(Hook):
    def __init__(self, port: Port) -> None:
        self.port = port
        self.wanted: dict[str, float] = {}  # model -> when it was evicted
        self.loading: set[str] = set()  # comebacks under way, not yet ready
        # ... and when each was evicted: one that gives way keeps its place among the others
        self._evicted: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        port.events.subscribe(self.on_change)

    def on_change(self, c: Change) -> None:
        slot = self.port.slots.get(c.model)
        if slot is None:
            return
        # A sleeping model evicted is wanted back as a ready one is.
        if c.old in (State.READY, State.SLEEPING) and c.new is State.STOPPING and \
                c.cause in EVICTED:
            if slot.model.settings.restore:
                self.wanted[c.model] = c.at
        elif c.new is State.STARTING and c.model not in self.loading:
            self.wanted.pop(c.model, None)  # a request or a load brought it back
        elif c.new is State.READY:
            self._done(c.model)
        elif c.new in GONE:
            self._done(c.model)
            if c.new is State.FAILED:
                self.wanted.pop(c.model, None)
            if self.wanted:
                # After the step that made this move: the scheduler's state is settled.
                asyncio.get_running_loop().call_soon(self.bring_back)

    def _done(self, model_id: str) -> None:
        self.loading.discard(model_id)
        self._evicted.pop(model_id, None)

    def bring_back(self) -> None:
        """Load the wanted models that fit now, unless a request waits for any model."""
        slots = self.port.slots
        if any(s.queued for s in slots.values()):
            return
        for model_id in sorted(self.wanted, key=lambda m: self.wanted[m]):
            slot = slots.get(model_id)
            if slot is None or slot.state is not State.UNLOADED:
                if slot is None or slot.state is not State.STOPPING:
                    del self.wanted[model_id]
                continue
            if not self.port.fits_now(slot):
                continue
            self._evicted[model_id] = self.wanted.pop(model_id)
            self.loading.add(model_id)
            log.info("loading model %s again: the memory it was evicted for is free "
                     "(restore = yes)", model_id)
            task = asyncio.get_running_loop().create_task(
                self.port.load(slot), name=f"loading {model_id} again")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def admit(self, slot: Slot) -> None:
        """A request is about to wait for its model: a comeback still loading gives way,
        unless the request's model fits beside it."""
        if slot.state is State.READY or not self.loading or slot.model.id in self.loading:
            return
        if slot.state in GONE and self.port.fits_now(slot):
            return
        for model_id in list(self.loading):
            other = self.port.slots.get(model_id)
            if other is not None and other.state in (State.STARTING, State.LOADING):
                self.port.yield_load(other, f"gives way to a request for {slot.model.id}")
                # Still wanted, once there is room; `wanted` holds wall-clock times (the
                # events'), never a slot's monotonic ones.
                self.wanted[model_id] = self._evicted.get(model_id, time.time())

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
