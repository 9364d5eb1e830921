"""Sleeping models: llama-server started with `--sleep-idle-seconds N` frees its weights,
KV cache and compute buffers after N idle seconds and reloads them, in the same process,
when a request comes (router mode shows such a child as SERVER_MODEL_STATUS_SLEEPING).

llama-server answers /props while asleep without waking (`is_sleeping`), so every tick
llamad asks each ready or sleeping model that may sleep, and moves it to SLEEPING or back
to READY. While it sleeps the scheduler counts what it freed as free (its measured use is
what it holds asleep); a request for it is a Wake decision, not a load (scheduler.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from llamad.catalog import argv
from llamad.catalog.catalog import Model
from llamad.supervisor import backend as be
from llamad.supervisor.events import Cause, State
from llamad.supervisor.liveness import Liveness
from llamad.supervisor.slot import Slot

log = logging.getLogger("llamad.supervisor")

SLEEP_FLAG = "--sleep-idle-seconds"


def may_sleep(model: Model) -> bool:
    """Whether the model's llama-server is told to sleep when idle (-1, its default, is
    never)."""
    option = argv.last(model.settings.args, SLEEP_FLAG)
    return option is not None and option.value.isdigit() and int(option.value) > 0


class Sleeping(Liveness):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._asking: set[str] = set()  # models whose /props is being asked

    def watch_sleep(self) -> None:
        """Once per tick: ask each ready or sleeping model that may sleep whether it does."""
        for slot in self.slots.values():
            if slot.state in (State.READY, State.SLEEPING) and slot.backend is not None \
                    and slot.model.id not in self._asking and may_sleep(slot.model):
                self._asking.add(slot.model.id)
                self.spawn(self._ask(slot, slot.epoch, slot.backend, time.monotonic()),
                           "asking whether it sleeps:", slot)

    async def _ask(self, slot: Slot, epoch: int, backend: be.Backend, began: float) -> None:
        try:
            asleep = await backend.sleeping()
        finally:
            self._asking.discard(slot.model.id)
        if asleep is None or slot.epoch != epoch or slot.backend is not backend:
            return  # no answer, or the model moved on meanwhile: the next tick asks again
        if asleep and slot.state is State.READY and not slot.in_flight and \
                not slot.queued and slot.last_used <= began:
            log.info("model %s sleeps (llama-server freed its memory while idle)",
                     slot.model.id)
            self.move(slot, State.SLEEPING, Cause.SLEEP)
        elif not asleep and slot.state is State.SLEEPING:
            self.move(slot, State.READY, Cause.WAKE, "llama-server is awake")
