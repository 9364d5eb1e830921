"""What systemd tells llamad about model units (PropertiesChanged, UnitRemoved) and the
state changes that follow; see "Unit lifecycle as llamad sees it" in docs/design.md."""

from __future__ import annotations

import logging
from typing import Any

from llamad.supervisor.events import Cause, State
from llamad.supervisor.reconcile import Reconcile
from llamad.supervisor.slot import Slot
from llamad.systemd import exits
from llamad.systemd.units import REMOVED

log = logging.getLogger("llamad.supervisor")


class Signals(Reconcile):
    def on_unit_change(self, unit: str, props: dict[str, Any]) -> None:
        slot = self.by_unit(unit)
        if slot is None:
            return
        if props.get(REMOVED):
            # Ask systemd in the next reconcile, which lists loaded units only: asking about
            # this one by its path would load it again, and its removal would signal again.
            self.reconcile_soon()
            return
        for key in ("Result", "ExecMainCode", "ExecMainStatus"):
            if key in props:
                slot.last_exit[key] = props[key]
        if "MainPID" in props:
            slot.main_pid = int(props["MainPID"])
        if "NRestarts" in props:
            slot.n_restarts = int(props["NRestarts"])
        if props.get("InvocationID"):
            slot.invocation_id = bytes(props["InvocationID"]).hex()
        active = props.get("ActiveState")
        if active is not None:
            # A queued start job means "inactive" is the state before the start.
            job = props.get("Job", (0, b"/"))
            self._on_active(slot, active, props.get("SubState", ""), int(job[0]))

    def _on_active(self, slot: Slot, active: str, sub: str, job: int) -> None:
        if active == "activating" and sub == "auto-restart" and (
                slot.last_exit.get("Result") == "oom-kill"):
            self._on_oom(slot)
        elif active == "active" and slot.state is State.STARTING:
            if slot.replacing and slot.invocation_id == slot.replacing:
                return  # still the wedged process, not yet killed
            slot.replacing = ""
            self.move(slot, State.LOADING, Cause.ACTIVE)
            self._begin_health(slot)
        elif active == "activating" and sub == "auto-restart":
            if slot.state in (State.READY, State.SLEEPING, State.LOADING):
                self._crashed(slot)
        elif active in ("inactive", "failed") and job == 0:
            self._on_gone(slot, active)

    def _on_gone(self, slot: Slot, active: str) -> None:
        clean = active == "inactive" and slot.last_exit.get("Result", "success") == "success"
        if slot.stopping_by_us or slot.state is State.STOPPING or (
                clean and slot.state is not State.FAILED):
            self._unit_gone(slot)
        elif slot.state not in (State.UNLOADED, State.FAILED):
            self._confirm_failure(slot)

    def _on_oom(self, slot: Slot) -> None:
        """An OOM kill would recur on restart: fail the model and cancel systemd's restart,
        rather than let Restart=on-failure load it into the same wall again."""
        if slot.state in (State.UNLOADED, State.FAILED, State.STOPPING):
            return
        self._fail(slot, exits.describe(slot.last_exit))
        self.spawn(self.units.stop(slot.unit), f"stopping {slot.unit}")
