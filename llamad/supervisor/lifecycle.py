"""Carrying out the scheduler's decisions: starting, health, stopping, adoption, TTLs.

A decision and the state change it implies happen in one step with no await (`_step`),
so fifty requests for an unloaded model see one UNLOADED (and start it) and forty-nine
STARTING (and wait). The D-Bus work then runs in supervised tasks; each re-checks
`slot.epoch` after every await and gives up if the model has moved on meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time

from llamad.catalog.catalog import Snapshot
from llamad.errors import LlamadError, Unavailable
from llamad.memory.fit import Choice
from llamad.memory.gpu import mem_available
from llamad.memory.types import Memory
from llamad.supervisor import backend as be
from llamad.supervisor import unitspec
from llamad.supervisor.core import Core
from llamad.supervisor.events import Cause, State
from llamad.supervisor.guards import gpuload
from llamad.supervisor.scheduler import Drain, Load, Reject, Serve, Wake, decide, expired
from llamad.supervisor.slot import Slot
from llamad.systemd.units import UnitError, UnitSpec, UnitStatus

log = logging.getLogger("llamad.supervisor")

# A loading model's /health is polled every 5 ms at first, then every HEALTH_SHARE of the
# time it has loaded so far, up to every 100 ms: its readiness is seen on average within
# 1 % of its load time (a back-off growing by half each time lost ~60 ms of a 0.9 s load;
# router mode's children report ready at once), at ~115 looks for a 0.9 s load and 10 a
# second once the interval reaches 100 ms (after 5 s).
HEALTH_FIRST_INTERVAL = 0.005
HEALTH_SHARE = 0.02
HEALTH_INTERVAL = 0.1
STOP_SLACK = 2.0  # seconds systemd may take past a unit's stop-timeout (SIGKILL, cleanup)
STOP_WORDS = {Cause.EVICT_COUNT: "evicted", Cause.EVICT_MEMORY: "evicted", Cause.TTL: "idle TTL",
              Cause.KEEP_ALIVE: "keep_alive 0", Cause.UNLOAD: "unload requested",
              Cause.REMOVED: "removed from the catalog", Cause.CHANGED: "changed",
              Cause.GPU_OOM: "to load it again"}


def health_interval(loading: float) -> float:
    """Seconds until the next look at /health of a model that has loaded for `loading`."""
    return min(HEALTH_INTERVAL, max(HEALTH_FIRST_INTERVAL, loading * HEALTH_SHARE))


class Lifecycle(Core):
    # -- decisions -----------------------------------------------------------

    def _step(self, slot: Slot, explicit: bool) -> be.Backend | None:
        """One decision and the state change it implies; no awaits in here."""
        if not self.current(slot):
            raise LlamadError(f"model {slot.model.id} was removed from the catalog",
                              status=404, code="model_not_found")
        # decide() serves a ready model whatever else holds: skip measuring memory and
        # building views on the hot path.
        ready = slot.state is State.READY and slot.backend is not None
        decision = Serve(slot.model.id) if ready else decide(
            slot.model.id, self.views(slot), self.measure.resources(self.config), self.policy,
            explicit=explicit)
        if isinstance(decision, Wake) and self._wake(slot, decision):
            decision = Serve(slot.model.id)
        if isinstance(decision, Serve) and slot.backend is not None:
            slot.in_flight += 1
            slot.last_used = time.monotonic()
            return slot.backend
        if isinstance(decision, Reject):
            raise Unavailable(decision.message, retry_after=10, code=decision.code)
        if isinstance(decision, Load):
            cause = Cause.EVICT_COUNT if decision.overlap else Cause.EVICT_MEMORY
            for victim in decision.evict:
                self._begin_stop(self.slots[victim], cause, f"to load {slot.model.id}")
            self._begin_start(slot, decision)
        if isinstance(decision, Drain):
            log.debug("%s waits for %s to finish before it can load", slot.model.id,
                      ", ".join(decision.wait_for))
        return None

    def _wake(self, slot: Slot, decision: Wake) -> bool:
        """A sleeping model is asked for: stop what must make room (then decide again), or
        count it ready now; the request itself makes llama-server reload, in place."""
        for victim in decision.evict:
            self._begin_stop(self.slots[victim], Cause.EVICT_MEMORY, f"to wake {slot.model.id}")
        if decision.evict:
            return False
        slot.used = Memory()  # the asleep figure no longer holds; the next sample tells
        slot.alive_at = slot.last_used = time.monotonic()
        self.move(slot, State.READY, Cause.WAKE)
        return True

    async def _admit(self, slot: Slot, explicit: bool, deadline: float) -> be.Backend:
        """Decide again on every state change until the model serves (counted in flight)."""
        slot.queued += 1
        try:
            while True:
                backend = self._step(slot, explicit)
                if backend is not None:
                    return backend
                explicit = False  # a retry of a failed model happens once
                await self._wait_change(deadline, f"model {slot.model.id} to become ready")
        finally:
            slot.queued -= 1

    async def load(self, slot: Slot) -> None:
        """An explicit load: returns once the unit is starting (like router mode)."""
        if slot.state is State.FAILED:
            slot.reason = ""
            self.move(slot, State.UNLOADED, Cause.RESET)
        if slot.state is State.UNLOADED:
            backend = self._step(slot, explicit=True)
            assert backend is None
        if slot.state in (State.UNLOADED, State.STOPPING):
            # The scheduler said drain or wait, or the model is on its way out (an
            # answer of success must not leave it unloaded): load it in the background.
            self.spawn(self._load_later(slot), "loading")

    async def _load_later(self, slot: Slot) -> None:
        try:
            await self._admit(slot, True, time.monotonic() + self.config.queue_timeout)
        except LlamadError as e:
            log.warning("loading %s: %s", slot.model.id, e.message)
            return
        slot.in_flight -= 1
        self._notify()

    # -- starting ------------------------------------------------------------

    def _begin_start(self, slot: Slot, decision: Load) -> None:
        slot.address = self._allocate(slot)
        self._set_fit(slot, decision.fit)
        if decision.fit is not None and decision.fit.reason:
            log.info("model %s: %s", slot.model.id, decision.fit.reason)
        spec, address = self.spec(slot, decision.gpus)
        slot.reason = ""
        slot.gpus = decision.gpus
        slot.backend = be.Backend(address)
        slot.load_started = time.monotonic()
        # A load is a use, as in router mode: an explicitly loaded model is not the
        # least recently used one, nor idle since the epoch for its TTL.
        slot.last_used = slot.load_started
        slot.stopping_by_us = False
        slot.stop_sent = False
        slot.load_time_unknown = False
        slot.start_pending = True  # until systemd has the unit: reconcile leaves it alone
        slot.identity = self._identity(slot)
        self.move(slot, State.STARTING, Cause.LOAD, slot.fit.reason if slot.fit else "")
        evicted = () if decision.overlap else tuple(self.slots[v] for v in decision.evict)
        self.spawn(self._start(slot, slot.epoch, spec, evicted), "starting", slot)

    async def _start(self, slot: Slot, epoch: int, spec: UnitSpec,
                     evicted: tuple[Slot, ...]) -> None:
        try:
            await self._start_unit(slot, epoch, spec, evicted)
        finally:
            slot.start_pending = False

    async def _start_unit(self, slot: Slot, epoch: int, spec: UnitSpec,
                          evicted: tuple[Slot, ...]) -> None:
        """`epoch` is the slot's when the start was decided: a task runs later, and a
        move meanwhile (an unload) must not be taken for the state it was decided in."""
        # Memory is only free once the evicted processes are gone.
        bound = self._stop_bound(evicted)
        deadline = time.monotonic() + bound
        while any(v.state is State.STOPPING for v in evicted) and slot.epoch == epoch:
            try:
                await self._wait_change(deadline, "evicted models to stop")
            except Unavailable:
                if slot.epoch == epoch:
                    self._fail(slot, "the models evicted to make room did not stop within "
                                     f"{bound:g}s (drain-timeout, then stop-timeout)")
                return
        for hook in self.hooks:
            if slot.epoch == epoch:
                await hook.before_start(slot, [v.unit for v in evicted])
        if slot.epoch != epoch:
            log.info("model %s is no longer starting (%s); its start is dropped",
                     slot.model.id, slot.state.value)
            return
        spec = gpuload.load_mode(slot.model, spec, mem_available())  # with the memory now
        try:
            await self.units.start(spec, wanted=lambda: slot.epoch == epoch)
        except UnitError as e:
            if slot.epoch == epoch:
                self._fail(slot, f"systemd refused to start {spec.name}: {e}")
            return
        log.info("starting %s for model %s", spec.name, slot.model.id)

    def _stop_bound(self, evicted: tuple[Slot, ...]) -> float:
        """Seconds the evicted may take to be gone: drain-timeout bounds only their
        requests (0 is no time at all); then a KV cache may be saved, llama-server has
        its stop-timeout before systemd kills it, and systemd takes a moment more."""
        stops = (v.model.settings.stop_timeout for v in evicted)
        stop = max((self.config.stop_timeout if t is None else t for t in stops), default=0.0)
        save = self.config.kv_cache_timeout if self.config.kv_cache != "no" else 0.0
        return self.config.drain_timeout + save + stop + STOP_SLACK

    def give_up(self, slot: Slot, reason: str) -> None:
        """Fail a model and stop its unit, cancelling any restart systemd has planned."""
        self._fail(slot, reason)
        self.spawn(self.units.stop(slot.unit), f"stopping {slot.unit}")

    def reload_later(self, slot: Slot, why: str) -> None:
        """Stop a model whose load failed; once stopped it loads again through the scheduler,
        which sees its need as it is now (gpuload raises it after running out of VRAM)."""
        self._begin_stop(slot, Cause.GPU_OOM, why)

    def fits_now(self, slot: Slot) -> bool:
        """Whether the model would load now without stopping or waiting for another."""
        decision = decide(slot.model.id, self.views(slot), self.measure.resources(self.config),
                          self.policy, explicit=True)
        return isinstance(decision, Load) and not decision.evict

    def yield_load(self, slot: Slot, why: str) -> None:
        """Stop a model that is loading for no request (restore = yes), as an unload."""
        if slot.state in (State.STARTING, State.LOADING) and slot.queued == 0:
            self._begin_stop(slot, Cause.UNLOAD, why)

    def reset(self, slot: Slot, why: str) -> None:
        """Clear a failed model: the next request (or load) starts it again."""
        if slot.state is State.FAILED:
            slot.reason = ""
            self.move(slot, State.UNLOADED, Cause.RESET, why)

    def degrade(self, slot: Slot, why: str) -> None:
        """A ready model that serves, but not as planned (a GPU load that fell back to the
        CPU): its reason says so in every listing, its state stays."""
        log.warning("model %s is degraded: %s", slot.model.id, why)
        slot.reason = f"degraded: {why}"

    def _crashed(self, slot: Slot) -> None:
        """The process died and systemd restarts it: a new process, maybe a new address."""
        why = self.exit_text(slot)
        log.warning("model %s crashed (%s); systemd restarts it", slot.model.id, why)
        slot.load_started = time.monotonic()
        slot.load_time_unknown = False
        self._drop_backend(slot)
        slot.backend = be.Backend(self.spec(slot, slot.gpus)[1])
        self.move(slot, State.STARTING, Cause.CRASH, why)

    def _confirm_failure(self, slot: Slot) -> None:
        """The unit looks failed: ask systemd whether it is, and if so fail the model with
        the exit and the unit's last journal lines."""
        if not slot.checking:
            slot.checking = True
            self.spawn(self._record_failure(slot, slot.epoch), "recording the failure of",
                       slot)

    async def _record_failure(self, slot: Slot, epoch: int) -> None:
        try:
            # systemd 252 passes through "failed" on its way to an automatic
            # restart; only systemd knows whether one is coming, so ask.
            status = await self.units.status(slot.unit)
        finally:
            slot.checking = False
        restarting = status.sub_state == "auto-restart" or status.coming_up
        if restarting or slot.epoch != epoch:
            return
        exit_text = self.exit_text(slot)
        self._fail(slot, exit_text)  # before the await, so the signal storm records once
        epoch = slot.epoch
        tail = await self.journal(slot.unit)
        if tail and slot.epoch == epoch:  # not retried or replaced meanwhile
            slot.reason = f"{exit_text}; last log lines: {tail}"
            self._notify()

    def _begin_health(self, slot: Slot) -> None:
        self.spawn(self._health(slot, slot.epoch, slot.backend), "waiting for /health of", slot)

    async def _health(self, slot: Slot, epoch: int, backend: be.Backend | None) -> None:
        deadline = slot.load_started + self.config.load_timeout
        while slot.epoch == epoch and backend is not None:
            if await backend.healthy():
                for hook in self.hooks:
                    if slot.epoch == epoch:
                        await hook.before_ready(slot, backend)
                if slot.epoch == epoch:
                    self._ready(slot)
                return
            if slot.epoch != epoch:
                return
            if time.monotonic() > deadline:
                self._fail(slot, f"not ready within load-timeout ({self.config.load_timeout:g}s)")
                self.spawn(self.units.stop(slot.unit), f"stopping {slot.unit}")
                return
            await asyncio.sleep(health_interval(time.monotonic() - slot.load_started))

    def _ready(self, slot: Slot) -> None:
        slot.alive_at = time.monotonic()
        took = slot.alive_at - slot.load_started
        if not slot.load_time_unknown:
            slot.load_seconds = took
            # Its idle TTL counts from now: an explicit load is a use too. Not so for a
            # process taken over (adopted: it keeps the TTL left by the earlier llamad,
            # take_back) or only checked again: no load of ours ended.
            slot.last_used = slot.alive_at
        log.info("model %s ready after %.2fs", slot.model.id, took)
        self.move(slot, State.READY, Cause.HEALTHY)

    # -- stopping ------------------------------------------------------------

    def _begin_stop(self, slot: Slot, cause: Cause, detail: str = "") -> None:
        """Stop a model like an unload: no new requests from now on, the ones in flight
        finish first (bounded by drain-timeout), then the unit is stopped."""
        if slot.state in (State.UNLOADED, State.STOPPING):
            return
        log.info("stopping model %s (%s)", slot.model.id,
                 "; ".join(filter(None, (STOP_WORDS.get(cause, cause.value), detail))))
        slot.stopping_by_us = True
        slot.keep_alive = None
        self.move(slot, State.STOPPING, cause, detail)
        self.spawn(self._stop(slot, slot.epoch), "stopping", slot)

    async def _drain(self, slot: Slot, epoch: int) -> None:
        deadline = time.monotonic() + self.config.drain_timeout
        while slot.in_flight > 0 and slot.epoch == epoch:
            try:
                await self._wait_change(deadline, f"requests on {slot.model.id} to finish")
            except Unavailable:
                log.warning("model %s still has %d requests in flight after drain-timeout "
                            "(%gs); stopping it anyway", slot.model.id, slot.in_flight,
                            self.config.drain_timeout)
                return

    async def _stop(self, slot: Slot, epoch: int) -> None:
        await self._drain(slot, epoch)
        if slot.epoch != epoch:
            return
        for hook in self.hooks:
            if slot.epoch == epoch:
                await hook.before_stop(slot)
        if slot.epoch != epoch:
            return
        self._drop_backend(slot)
        slot.stop_sent = True
        self._notify()
        try:
            await self.units.stop(slot.unit)
        except UnitError as e:
            # Already gone, so no signal will come: ask systemd what it has.
            log.info("stopping %s: %s", slot.unit, e)
            status = await self.units.status(slot.unit)
            if slot.epoch == epoch and status.active_state in ("inactive", "failed"):
                self._unit_gone(slot)

    def _set_fit(self, slot: Slot, fit: Choice | None) -> None:
        """What fitting added to the model's arguments for the unit it runs in, or None."""
        slot.fit = fit
        self.measure.fitted(slot.model, fit.args if fit is not None else None)

    def _unit_gone(self, slot: Slot) -> None:
        """The unit has stopped (as asked, or cleanly behind llamad's back)."""
        if slot.state is not State.UNLOADED:
            slot.main_pid = 0
            slot.gpus = ()
            slot.identity = None
            slot.address = ""
            self._set_fit(slot, None)
            self._drop_backend(slot)
            self.move(slot, State.UNLOADED, Cause.STOPPED)
        if slot.model.id not in self.snapshot.models and self.current(slot):
            # Its file went away while it was loaded: now it is stopped, forget it.
            del self.slots[slot.model.id]
        elif slot.reload and self.current(slot):
            slot.reload = False
            self.spawn(self.load(slot), "loading again", slot)

    # -- adoption, TTL, catalog ----------------------------------------------

    async def adopt(self) -> None:
        """Take over units a previous llamad started; stop the ones that no longer fit."""
        for status in await self.units.list_ours():
            markers = status.markers
            slot = self.slots.get(markers.model) if markers else None
            adoptable = status.active_state in ("active", "activating", "reloading")
            if slot is not None and adoptable and self._fits(slot, status):
                self._adopt(slot, status)
            elif status.active_state not in ("inactive", "failed"):
                log.info("stopping stale unit %s", status.name)
                await self.units.stop(status.name)
            else:
                await self.units.reset_failed(status.name)

    def _fits(self, slot: Slot, status: UnitStatus) -> bool:
        """Whether a running unit is the one llamad would start for this unloaded model,
        at the address the unit recorded, with what fitting chose for it then."""
        address = status.markers.backend if status.markers else ""
        if slot.state not in (State.UNLOADED, State.FAILED) or status.name != slot.unit or \
                not self._adoptable(slot, address):
            return False
        self._set_fit(slot, self._adopted_fit(slot, status))
        if unitspec.matches(status, *self.spec(slot, address=address)):
            return True
        self._set_fit(slot, None)
        return False

    def _adopted_fit(self, slot: Slot, status: UnitStatus) -> Choice | None:
        args = unitspec.fitted_args(status)
        fitter = self.measure.fitter(slot.model) if args is not None else None
        if args is None or fitter is None or status.markers is None:
            return None
        return fitter.restore(args, status.markers.fit_reason)

    def _adopt(self, slot: Slot, status: UnitStatus) -> None:
        log.info("adopting %s (invocation %s)", status.name, status.invocation_id)
        slot.identity = self._identity(slot)
        slot.address = status.markers.backend if status.markers else ""
        slot.backend = be.Backend(slot.address)
        slot.invocation_id = status.invocation_id
        slot.main_pid = status.main_pid
        slot.n_restarts = status.n_restarts
        slot.last_used = time.monotonic()
        slot.load_started = time.monotonic()
        slot.load_time_unknown = True
        if status.active_state == "active":
            self.move(slot, State.LOADING, Cause.ADOPTED)
            self._begin_health(slot)
        else:
            self.move(slot, State.STARTING, Cause.ADOPTED)

    async def preload(self) -> None:
        for slot in self.slots.values():
            if slot.model.settings.load_on_startup and slot.state is State.UNLOADED and \
                    not slot.model.error:  # a preset error refuses it until fixed
                await self.load(slot)

    def expire(self) -> None:
        """Stop models whose idle TTL ran out; called periodically."""
        now = time.monotonic()
        ttls = {s.model.id: self.ttl(s) for s in self.loaded()}
        for mid in expired(self.views().values(), now, ttls):
            self._begin_stop(self.slots[mid], Cause.TTL)

    def update_snapshot(self, snapshot: Snapshot) -> None:
        """Take a new catalog. A loaded model whose file vanished is drained and stopped;
        one whose file or arguments changed is drained and started again."""
        self.snapshot = snapshot
        for mid, slot in list(self.slots.items()):
            model = snapshot.models.get(mid)
            if model is None and slot.state is State.UNLOADED:
                del self.slots[mid]
            elif model is None:
                # _unit_gone forgets the slot once its unit has stopped.
                self._begin_stop(slot, Cause.REMOVED)
            else:
                slot.model = model
                self._follow_change(slot)
        for mid, model in snapshot.models.items():
            self.slots.setdefault(mid, Slot(model))
        self._notify()

    def _follow_change(self, slot: Slot) -> None:
        if slot.identity is None or slot.identity == self._identity(slot):
            return
        if slot.state in (State.STARTING, State.LOADING, State.READY, State.SLEEPING):
            slot.reload = True
            self._begin_stop(slot, Cause.CHANGED, "its file or arguments changed")
        elif slot.state is State.FAILED:
            # Its failure was the old file's or arguments' (a preset fixed after a crash
            # loop): the next request tries the new ones, as router mode's reload allows.
            slot.identity = None
            self.reset(slot, "its file or arguments changed")

    def _identity(self, slot: Slot) -> tuple[object, ...]:
        """What a running unit was made from: its command line and its files' identity.
        A model whose identity changed must be restarted to serve what the catalog says."""
        m = slot.model
        return m.settings.args, m.settings.env, m.settings.server, m.created, m.info
