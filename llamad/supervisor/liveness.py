"""Wedged backends: a ready llama-server that no longer answers (SIGSTOP, a hung GPU).

systemd restarts a process that dies, not one that hangs. So every tick llamad asks each
ready backend's /health (llama-server answers it on its HTTP threads while it generates)
and, when that takes too long, whether its process used CPU (Backend.probe); a backend
that shows neither and finishes no request for `liveness-timeout` seconds is wedged, as is
one the forwarding reports (no bytes for that long, and the same probe fails). A wedged
backend's process is killed, which ends its clients' streams with an error, and systemd
starts a new one.
"""

from __future__ import annotations

import logging
import signal
import time

from llamad.supervisor import backend as be
from llamad.supervisor.events import Cause, State
from llamad.supervisor.slot import Slot
from llamad.supervisor.unitsignals import Signals

log = logging.getLogger("llamad.supervisor")

class Liveness(Signals):
    def probe(self) -> None:
        """Once per tick: ask every ready backend's /health, each in its own task."""
        if not self.config.liveness_timeout:
            return
        for slot in self.slots.values():
            if slot.state is State.READY and slot.backend is not None and not slot.probing:
                slot.probing = True
                self.spawn(self._probe(slot, slot.backend), "probing", slot)

    async def _probe(self, slot: Slot, backend: be.Backend) -> None:
        timeout = min(be.PROBE_TIMEOUT, self.config.liveness_timeout)
        try:
            alive = await backend.probe(timeout, slot.main_pid)
        finally:
            slot.probing = False
        if slot.state is not State.READY or slot.backend is not backend:
            return
        now = time.monotonic()
        if alive:
            slot.alive_at = now
        elif alive is False and now - slot.alive_at > self.config.liveness_timeout:
            self.wedged(slot, backend, f"/health unanswered and no CPU used for "
                                     f"{now - slot.alive_at:.0f}s")

    def wedged(self, slot: Slot, backend: be.Backend, why: str = "it stopped answering") -> None:
        """Report a backend that hangs (for forward.py's idle timeout and the probe above):
        its process is killed (SIGKILL: a stopped or hung process cannot ignore it), which
        ends its clients' connections with an error, and systemd's Restart= starts a new
        one (a new InvocationID); requests meanwhile wait for it. A report about a backend
        the model no longer uses is ignored."""
        if slot.state is not State.READY or slot.backend is not backend:
            return
        log.warning("model %s is wedged (%s); restarting %s", slot.model.id, why, slot.unit)
        slot.replacing = slot.invocation_id
        slot.load_started = time.monotonic()
        slot.load_time_unknown = True
        self._drop_backend(slot)
        slot.backend = be.Backend(backend.address)
        self.move(slot, State.STARTING, Cause.WEDGED, why)
        self.spawn(self.units.kill(slot.unit, signal.SIGKILL), "killing the wedged", slot)
