"""Reconciling with systemd: what llamad believes of each model against systemd's own view.

Signals can be missed (a lost bus connection, `systemctl daemon-reexec`) and a D-Bus call
can fail half-way; then a slot would sit in `starting` or `stopping` forever, or llamad
would believe a model unloaded while its unit runs. So every few seconds llamad lists
systemd's `llama-server@*` units (states, InvocationIDs) and repairs what differs, logging
each repair. Slots that changed while the list was read are left to the next round.

A unit missing from the list is the one view that can be behind the signals rather than
ahead: a unit that failed for good is collected at once (CollectMode=), and the signals
that say it failed travel on another bus connection than the list's answer, so they can
arrive after it. Taken for a stop, the failure would be lost and a waiting request would
start the model again. So a model llamad believes loaded is unloaded for a missing unit
only when the rounds keep missing it for GONE_GRACE with nothing changed between.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from typing import Any

from llamad.supervisor import backend as be
from llamad.supervisor.admission import Admission
from llamad.supervisor.events import Cause, State
from llamad.supervisor.slot import Slot
from llamad.systemd.units import UnitError, UnitStatus

log = logging.getLogger("llamad.reconcile")

RECONCILE_SECONDS = 2.0
GONE_GRACE = 1.0  # seconds a unit stays missing before llamad believes it stopped


class Seen(enum.Enum):
    """A unit as systemd shows it, in the terms llamad needs."""

    GONE = "no unit"
    FAILED = "failed"
    STARTING = "starting"  # activating, or waiting to restart
    RUNNING = "running"
    STOPPING = "stopping"


def seen(status: UnitStatus | None) -> Seen:
    if status is None:
        return Seen.GONE
    active = status.active_state
    if active in ("active", "reloading"):
        return Seen.RUNNING
    if active == "activating":
        return Seen.STARTING
    if active == "deactivating":
        return Seen.STOPPING
    return Seen.FAILED if active == "failed" else Seen.GONE


class Reconcile(Admission):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reconcile_now = asyncio.Event()
        self._missing: dict[str, tuple[int, float]] = {}  # model -> (epoch, first seen)

    async def keep_reconciling(self, every: float = RECONCILE_SECONDS) -> None:
        """Reconcile every few seconds, and at once when asked (reconcile_soon)."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._reconcile_now.wait(), every)
            self._reconcile_now.clear()
            try:
                await self.reconcile()
            except UnitError as e:
                log.warning("reconcile: cannot read systemd's units: %s", e)
            except Exception:  # a bug: say so, and try again next round
                log.exception("reconcile failed")

    def reconcile_soon(self) -> None:
        """Signals may have been missed (the bus connection was lost): look now."""
        self._reconcile_now.set()

    async def reconcile(self) -> None:
        """One round: read systemd's view, repair each slot that still matches what was read."""
        # A start call in flight when the list was asked for may have made its unit after
        # systemd answered: such a slot is judged next round, even if its call is done now.
        before = {mid: (slot.epoch, slot.start_pending or slot.checking)
                  for mid, slot in self.slots.items()}
        units = {status.name: status for status in await self.units.list_ours()}
        for mid, slot in list(self.slots.items()):
            status = units.get(slot.unit)
            if before.get(mid) == (slot.epoch, False) and self._settled(slot, status):
                self._repair(slot, status)
        claimed = {slot.unit for slot in self.slots.values()}
        for status in units.values():
            if status.name not in claimed and not status.job and \
                    seen(status) in (Seen.RUNNING, Seen.STARTING):
                log.warning("reconcile: %s belongs to no catalogued model; stopping it",
                            status.name)
                self.spawn(self.units.stop(status.name), f"stopping {status.name}")

    def _settled(self, slot: Slot, status: UnitStatus | None) -> bool:
        """Neither llamad nor systemd is half-way through a change of this unit: no start
        call in flight, no job queued. The signals that follow will tell; if not, the next
        round will."""
        return self.current(slot) and not slot.start_pending and not slot.checking and \
            not (status and status.job)

    def _repair(self, slot: Slot, status: UnitStatus | None) -> None:
        now = seen(status)
        if now is not Seen.GONE:  # missed in a row only: a round that sees it starts over
            self._missing.pop(slot.model.id, None)
        state = slot.state
        if state is State.UNLOADED or state is State.FAILED:
            if now in (Seen.RUNNING, Seen.STARTING):
                assert status is not None
                self._take_over(slot, status)
        elif state is State.STOPPING:
            if now in (Seen.GONE, Seen.FAILED):
                self._differs(slot, now, "unloaded")
                self._unit_gone(slot)
            elif now in (Seen.RUNNING, Seen.STARTING) and slot.stop_sent:
                self._differs(slot, now, "stopping it again")
                self.spawn(self._stop(slot, slot.epoch), "stopping", slot)
        elif status is None or now is Seen.GONE:
            if self._missing_long_enough(slot):
                self._differs(slot, now, "unloaded (stopped behind llamad's back)")
                self._unit_gone(slot)
        else:
            self._repair_loaded(slot, status, now)

    def _missing_long_enough(self, slot: Slot) -> bool:
        """Whether the rounds have missed this unit since GONE_GRACE ago or more, and the
        model has not moved since (its failure's signals would have moved it)."""
        now = time.monotonic()
        epoch, since = self._missing.get(slot.model.id, (-1, now))
        if epoch != slot.epoch:
            self._missing[slot.model.id] = (slot.epoch, now)
            return False
        if now - since < GONE_GRACE:
            return False
        del self._missing[slot.model.id]
        return True

    def _repair_loaded(self, slot: Slot, status: UnitStatus, now: Seen) -> None:
        """A model llamad believes starting, loading or ready, whose unit systemd has."""
        state = slot.state
        if now is Seen.FAILED:
            # systemd 252 shows "failed" on its way to an automatic restart too: confirm.
            self._differs(slot, now, "checking whether it failed")
            self._confirm_failure(slot)
        elif now is Seen.STOPPING:
            self._differs(slot, now, "stopping (stopped behind llamad's back)")
            self._drop_backend(slot)
            self.move(slot, State.STOPPING, Cause.RECONCILE, "systemd is stopping the unit")
        elif now is Seen.STARTING and state is not State.STARTING:
            self._differs(slot, now, "starting (restarted behind llamad's back)")
            self._crashed(slot)
        elif now is Seen.RUNNING and state is State.STARTING:
            if slot.replacing == status.invocation_id:
                return  # a wedged process not dead yet: its kill is under way
            self._differs(slot, now, "loading")
            self._sync(slot, status)
            self.move(slot, State.LOADING, Cause.RECONCILE, "systemd shows the unit active")
            self._begin_health(slot)
        elif now is Seen.RUNNING and status.invocation_id != slot.invocation_id:
            self._differs(slot, now, f"loading (new invocation {status.invocation_id})")
            self._sync(slot, status)
            self._drop_backend(slot)
            slot.backend = be.Backend(self.spec(slot, slot.gpus)[1])
            if state in (State.READY, State.SLEEPING):
                self.move(slot, State.LOADING, Cause.RECONCILE, "the unit was restarted")
                self._begin_health(slot)

    def _take_over(self, slot: Slot, status: UnitStatus) -> None:
        """A unit runs for a model llamad believes unloaded or failed: adopted if it is the
        one llamad would start, else stopped (and the model stays as it is)."""
        if self._fits(slot, status):
            self._differs(slot, seen(status), "adopting it")
            if slot.state is State.FAILED:  # the failure was llamad's view, not systemd's
                slot.reason = ""
                self.move(slot, State.UNLOADED, Cause.RECONCILE, "its unit runs")
            self._adopt(slot, status)
        else:
            self._differs(slot, seen(status), "stopping it")
            self.spawn(self.units.stop(status.name), f"stopping {status.name}")

    def _sync(self, slot: Slot, status: UnitStatus) -> None:
        slot.invocation_id = status.invocation_id
        slot.main_pid = status.main_pid
        slot.n_restarts = status.n_restarts

    def _differs(self, slot: Slot, now: Seen, repair: str) -> None:
        log.warning("reconcile: model %s is %s in llamad but %s in systemd; now %s",
                    slot.model.id, slot.state.value, now.value, repair)

