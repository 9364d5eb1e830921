"""The one owner of model state: carries out the scheduler's decisions through systemd.

Every mutation of a Slot happens on the event loop thread and never across
an await, so a decision and the state change that follows it are atomic:
fifty requests for an unloaded model see one UNLOADED (and start it) and
forty-nine STARTING (and wait). Unit state comes back as D-Bus signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from llamad import backend as be
from llamad import exits, gpuload, kvcache, unitspec
from llamad.catalog import Snapshot
from llamad.config import Config
from llamad.errors import (
    BackendError,
    BackendUnreachable,
    BadRequest,
    LlamadError,
    NotFound,
    Unavailable,
)
from llamad.events import TRANSITIONS, Cause, Change, Hub
from llamad.scheduler import (
    Drain,
    Load,
    ModelView,
    Policy,
    Reject,
    Serve,
    State,
    decide,
    effective_ttl,
    expired,
)
from llamad.slot import Measure, Slot, Units
from llamad.units import UnitSpec, UnitStatus

log = logging.getLogger("llamad.supervisor")

HEALTH_INTERVAL = 0.1
STOP_WORDS = {Cause.EVICT_COUNT: "evicted", Cause.EVICT_MEMORY: "evicted", Cause.TTL: "idle TTL",
              Cause.KEEP_ALIVE: "keep_alive 0", Cause.UNLOAD: "unload requested",
              Cause.REMOVED: "removed from the catalog", Cause.GPU_OOM: "to load it again"}
HEALTH_FIRST_INTERVAL = 0.005


class Supervisor:
    def __init__(self, config: Config, snapshot: Snapshot, units: Units,
                 measure: Measure, journal: Callable[[str], Awaitable[str]]) -> None:
        self.config = config
        self.snapshot = snapshot
        self.units = units
        self.measure = measure
        self.journal = journal
        self.policy = Policy(config.eviction_policy)
        self.slots: dict[str, Slot] = {m.id: Slot(m) for m in snapshot.models.values()}
        self._changed = asyncio.Event()
        self.events = Hub()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started = time.monotonic()
        self.gpu = gpuload.GpuGuard(self)  # GPU out-of-memory retries, CPU fallback checks
        self.kv = kvcache.KvCache(config, self.events)  # KV caches kept across swaps

    # -- views ---------------------------------------------------------------

    def resolve(self, name: object) -> Slot:
        if not isinstance(name, str) or not name:
            raise BadRequest("the request names no model; set \"model\" to one of GET /v1/models",
                             code="model_required")
        model = self.snapshot.resolve(name)
        if model is None or model.id not in self.slots:
            raise NotFound(f"model {name!r} is not known to llamad; GET /v1/models lists them")
        return self.slots[model.id]

    def by_unit(self, unit: str) -> Slot | None:
        for slot in self.slots.values():
            if slot.unit == unit:
                return slot
        return None

    def _view(self, slot: Slot) -> ModelView:
        s = slot.model.settings
        return ModelView(
            id=slot.model.id, state=slot.state, in_flight=slot.in_flight, queued=slot.queued,
            last_used=slot.last_used, pinned=slot.pinned, need=self.measure.need(slot.model),
            load_seconds=slot.load_seconds, gpus=slot.gpus, devices=s.devices or (),
            used=slot.used,
            split=s.split, reason=slot.reason)

    def views(self, target: Slot | None = None) -> dict[str, ModelView]:
        """Loaded models (and `target`): unloaded ones play no part in a decision,
        and skipping them keeps a decision cheap with thousands catalogued."""
        views = {s.model.id: self._view(s) for s in self.loaded()}
        if target is not None:
            views[target.model.id] = self._view(target)
        return views

    def loaded(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.state is not State.UNLOADED]

    # -- change notification ------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def move(self, slot: Slot, new: State, cause: Cause, detail: str = "") -> None:
        """The one place a model's state changes: checked against the transition table,
        logged, waiters woken and listeners told."""
        old = slot.state
        if new is old:
            return
        if new not in TRANSITIONS[old]:
            log.error("illegal state change of model %s: %s -> %s (%s)", slot.model.id,
                      old.value, new.value, cause.value)
        log.debug("model %s: %s -> %s (%s%s)", slot.model.id, old.value, new.value,
                  cause.value, f": {detail}" if detail else "")
        slot.state = new
        self._notify()
        self.events.emit(Change(slot.model.id, old, new, cause, detail, time.time()))

    async def _wait_change(self, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Unavailable(f"timed out waiting for {what}", code="timeout")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), left)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests ------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, slot: Slot, keep_alive: float | None = None) -> AsyncIterator[be.Backend]:
        """Hold the model for one request: wait until it is ready, count it in flight."""
        backend = await self.acquire(slot)
        try:
            yield backend
        except BackendUnreachable:
            self._suspect(slot, backend)
            raise
        except BackendError as e:
            raise await self._explain(slot, e) from e
        finally:
            self.release(slot, keep_alive)

    def _suspect(self, slot: Slot, backend: be.Backend) -> None:
        """The backend refused a connection: it likely died and systemd has not told us
        yet. Stop serving it until /health answers again (or systemd's signals move on)."""
        if slot.state is State.READY and slot.backend is backend:
            log.warning("model %s refused a connection; checking its health", slot.model.id)
            slot.load_started = time.monotonic()
            slot.load_time_unknown = True
            self.move(slot, State.LOADING, Cause.SUSPECT)
            self._spawn(self._wait_healthy(slot))

    async def _explain(self, slot: Slot, err: BackendError) -> LlamadError:
        """A backend that broke mid-request: once systemd says why (within a second), tell
        the client that, e.g. out of memory, rather than only that the connection broke."""
        deadline = time.monotonic() + 1.0
        while slot.state is State.READY and time.monotonic() < deadline:
            with contextlib.suppress(Unavailable):
                await self._wait_change(deadline, "the backend's exit status")
        if slot.state is State.FAILED and slot.reason:
            return Unavailable(f"model {slot.model.id} failed during the request: "
                               f"{slot.reason}", code="model_failed")
        return err

    async def acquire(self, slot: Slot, explicit: bool = False) -> be.Backend:
        if slot.queued >= self.config.queue_size:
            raise Unavailable(f"model {slot.model.id} has {slot.queued} requests waiting, "
                              "the queue limit; retry later", code="queue_full")
        if not self.config.models_autoload and slot.state is State.UNLOADED and not explicit:
            raise BadRequest(f"model {slot.model.id} is not loaded and autoload is off; "
                             "POST /models/load first", code="model_not_loaded")
        deadline = time.monotonic() + self.config.queue_timeout
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

    def _step(self, slot: Slot, explicit: bool) -> be.Backend | None:
        """One decision and the state change it implies; no awaits in here."""
        # decide() serves a ready model whatever else holds: skip measuring memory and
        # building views on the hot path.
        ready = slot.state is State.READY and slot.backend is not None
        decision = Serve(slot.model.id) if ready else decide(
            slot.model.id, self.views(slot), self.measure.resources(self.config), self.policy,
            explicit=explicit)
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

    def release(self, slot: Slot, keep_alive: float | None = None) -> None:
        slot.in_flight -= 1
        slot.served += 1
        slot.last_used = time.monotonic()
        if keep_alive is not None:
            slot.keep_alive = keep_alive
        if keep_alive == 0 and slot.in_flight == 0 and slot.queued == 0:
            self._begin_stop(slot, Cause.KEEP_ALIVE)
        self._notify()

    # -- starting ------------------------------------------------------------

    def spec(self, slot: Slot, gpus: tuple[int, ...] = ()) -> tuple[UnitSpec, str]:
        """The unit a load would start now, and the address its backend listens on."""
        address = unitspec.address(self.config, slot.model, self._port_for)
        limit = unitspec.memory_max(self.config, slot.model,
                                    self.measure.derived_limit(slot.model))
        spec = unitspec.build(self.config, slot.model, address,
                              self.measure.gpu_uuids(gpus), limit)
        return spec, address

    def exit_text(self, slot: Slot) -> str:
        """The unit's last end as a sentence, naming a file its sandbox keeps from it."""
        files = [*slot.model.shards, *([slot.model.mmproj] if slot.model.mmproj else [])]
        return exits.describe(slot.last_exit, self.spec(slot, slot.gpus)[0], files)

    def _port_for(self, model_id: str) -> int:
        # Stable across restarts of llamad, so adopted units keep their port.
        ids = sorted(self.slots)
        return self.config.tcp_port_base + ids.index(model_id)

    def _begin_start(self, slot: Slot, decision: Load) -> None:
        spec, address = self.spec(slot, decision.gpus)
        slot.reason = ""
        slot.gpus = decision.gpus
        slot.backend = be.Backend(address)
        slot.load_started = time.monotonic()
        # A load is a use, as in router mode: an explicitly loaded model is not the
        # least recently used one, nor idle since the epoch for its TTL.
        slot.last_used = slot.load_started
        slot.stopping_by_us = False
        slot.load_time_unknown = False
        self.move(slot, State.STARTING, Cause.LOAD)
        self._spawn(self._start(slot, spec, () if decision.overlap else decision.evict))

    async def _start(self, slot: Slot, spec: UnitSpec, evicted: tuple[str, ...]) -> None:
        # Memory is only free once the evicted processes are gone.
        deadline = time.monotonic() + self.config.drain_timeout
        units = [self.slots[v].unit for v in evicted if v in self.slots]
        while any(self.slots[v].state is State.STOPPING for v in evicted if v in self.slots):
            await self._wait_change(deadline, "evicted models to stop")
        if slot.gpus and units:
            await self.gpu.wait_freed(units)  # the driver frees their VRAM a little later
        try:
            await self.units.start(spec)
        except Exception as e:
            self._fail(slot, f"systemd refused to start {spec.name}: {e}")
            return
        log.info("starting %s for model %s", spec.name, slot.model.id)

    def give_up(self, slot: Slot, reason: str) -> None:
        """Fail a model and stop its unit, cancelling any restart systemd has planned."""
        self._fail(slot, reason)
        self._spawn(self.units.stop(slot.unit))

    def reload_later(self, slot: Slot, why: str) -> None:
        """Stop a model whose load failed; once stopped it loads again through the scheduler,
        which sees its need as it is now (gpuload raises it after running out of VRAM)."""
        self._begin_stop(slot, Cause.GPU_OOM, why)

    def _fail(self, slot: Slot, reason: str) -> None:
        log.warning("model %s failed: %s", slot.model.id, reason)
        slot.reason = reason
        self._drop_backend(slot)
        self.move(slot, State.FAILED, Cause.FAILED, reason)

    def _drop_backend(self, slot: Slot) -> None:
        if slot.backend is not None:
            self._spawn(slot.backend.close())
            slot.backend = None

    async def _wait_healthy(self, slot: Slot) -> None:
        deadline = slot.load_started + self.config.load_timeout
        backend = slot.backend
        interval = HEALTH_FIRST_INTERVAL
        while slot.state is State.LOADING and slot.backend is backend and backend is not None:
            if await backend.healthy():
                if slot.state is State.LOADING and slot.backend is backend:
                    await self.kv.ready(slot.model, backend)  # its saved KV cache first
                if slot.state is State.LOADING and slot.backend is backend:
                    took = time.monotonic() - slot.load_started
                    if not slot.load_time_unknown:
                        slot.load_seconds = took
                    log.info("model %s ready after %.2fs", slot.model.id, took)
                    self.move(slot, State.READY, Cause.HEALTHY)
                return
            if time.monotonic() > deadline:
                self._fail(slot, f"not ready within load-timeout ({self.config.load_timeout:g}s)")
                self._spawn(self.units.stop(slot.unit))
                return
            # Often at first, as small models load in a second; then back off.
            await asyncio.sleep(interval)
            interval = min(HEALTH_INTERVAL, interval * 1.5)

    # -- stopping ------------------------------------------------------------

    def _begin_stop(self, slot: Slot, cause: Cause, detail: str = "") -> None:
        if slot.state in (State.UNLOADED, State.STOPPING):
            return
        log.info("stopping model %s (%s)", slot.model.id,
                 "; ".join(filter(None, (STOP_WORDS.get(cause, cause.value), detail))))
        slot.stopping_by_us = True
        slot.keep_alive = None
        self._drop_backend(slot)
        self.move(slot, State.STOPPING, cause, detail)
        self._spawn(self._stop(slot))

    async def _stop(self, slot: Slot) -> None:
        await self.kv.before_stop(slot.model)  # saves its KV cache first, if it may return
        try:
            await self.units.stop(slot.unit)
        except Exception as e:  # already gone: the signal path settles the state
            log.info("stopping %s: %s", slot.unit, e)
            status = await self.units.status(slot.unit)
            self.on_unit_change(slot.unit, {"ActiveState": status.active_state})

    async def unload(self, slot: Slot) -> None:
        """Stop a model once its requests in flight have finished (bounded)."""
        deadline = time.monotonic() + self.config.drain_timeout
        while slot.in_flight > 0:
            await self._wait_change(deadline, f"requests on {slot.model.id} to finish")
        if slot.state is State.FAILED:
            slot.reason = ""
            self.move(slot, State.UNLOADED, Cause.RESET)
            await self.units.reset_failed(slot.unit)
            return
        self._begin_stop(slot, Cause.UNLOAD)

    def set_pin(self, slot: Slot, pinned: bool) -> None:
        """Pin or unpin a model until llamad restarts; the preset's `pin` is the default."""
        slot.pin = pinned
        log.info("model %s %s", slot.model.id, "pinned" if pinned else "unpinned")
        self._notify()  # a load waiting for room decides again

    async def load(self, slot: Slot) -> None:
        """An explicit load: returns once the unit is starting (like router mode)."""
        if slot.state is State.FAILED:
            slot.reason = ""
            self.move(slot, State.UNLOADED, Cause.RESET)
        if slot.state is State.UNLOADED:
            backend = self._step(slot, explicit=True)
            assert backend is None
        if slot.state is State.UNLOADED:
            # The scheduler said drain or wait: finish the load in the background.
            self._spawn(self._load_later(slot))

    async def _load_later(self, slot: Slot) -> None:
        try:
            await self.acquire(slot, explicit=True)
        except LlamadError as e:
            log.warning("loading %s: %s", slot.model.id, e.message)
            return
        slot.in_flight -= 1
        self._notify()

    # -- unit signals --------------------------------------------------------

    def on_unit_change(self, unit: str, props: dict[str, Any]) -> None:
        slot = self.by_unit(unit)
        if slot is None:
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
            self.move(slot, State.LOADING, Cause.ACTIVE)
            self._spawn(self._wait_healthy(slot))
        elif active == "activating" and sub == "auto-restart":
            if slot.state in (State.READY, State.LOADING):
                log.warning("model %s crashed (%s); systemd restarts it", slot.model.id,
                            self.exit_text(slot))
                slot.load_started = time.monotonic()
                slot.load_time_unknown = False
                self._drop_backend(slot)
                slot.backend = be.Backend(self.spec(slot, slot.gpus)[1])
                self.move(slot, State.STARTING, Cause.CRASH, self.exit_text(slot))
        elif active in ("inactive", "failed") and job == 0:
            self._on_gone(slot, active)

    def _on_gone(self, slot: Slot, active: str) -> None:
        clean = active == "inactive" and slot.last_exit.get("Result", "success") == "success"
        if slot.stopping_by_us or slot.state is State.STOPPING or (
                clean and slot.state is not State.FAILED):
            if slot.state is not State.UNLOADED:
                slot.main_pid = 0
                slot.gpus = ()
                self._drop_backend(slot)
                self.move(slot, State.UNLOADED, Cause.STOPPED)
            if slot.model.id not in self.snapshot.models:
                # Its file went away while it was loaded: now it is stopped, forget it.
                self.slots.pop(slot.model.id, None)
        elif slot.state not in (State.UNLOADED, State.FAILED):
            self._spawn(self._record_failure(slot))

    def _on_oom(self, slot: Slot) -> None:
        """An OOM kill would recur on restart: fail the model and cancel systemd's restart,
        rather than let Restart=on-failure load it into the same wall again."""
        if slot.state in (State.UNLOADED, State.FAILED, State.STOPPING):
            return
        self._fail(slot, unitspec.describe_exit(slot.last_exit))
        self._spawn(self.units.stop(slot.unit))

    async def _record_failure(self, slot: Slot) -> None:
        if slot.state is State.FAILED or slot.checking:
            return
        slot.checking = True
        try:
            # systemd 252 passes through "failed" on its way to an automatic
            # restart; only systemd knows whether one is coming, so ask.
            status = await self.units.status(slot.unit)
        finally:
            slot.checking = False
        restarting = status.sub_state == "auto-restart" or status.active_state in (
            "activating", "active", "reloading")
        if restarting or slot.state in (State.UNLOADED, State.FAILED, State.STOPPING):
            return
        exit_text = self.exit_text(slot)
        self._fail(slot, exit_text)  # before the await, so the signal storm records once
        tail = await self.journal(slot.unit)
        if tail and slot.reason == exit_text:  # not retried or replaced meanwhile
            slot.reason = f"{exit_text}; last log lines: {tail}"
            self._notify()

    # -- background ----------------------------------------------------------

    async def adopt(self) -> None:
        """Take over units a previous llamad started; stop the ones that no longer fit."""
        for status in await self.units.list_ours():
            model_id = status.env("LLAMAD_MODEL")
            slot = self.slots.get(model_id or "")
            adoptable = status.active_state in ("active", "activating", "reloading")
            if slot is not None and adoptable and unitspec.matches(status, *self.spec(slot)):
                self._adopt(slot, status)
            elif status.active_state not in ("inactive", "failed"):
                log.info("stopping stale unit %s", status.name)
                await self.units.stop(status.name)
            else:
                await self.units.reset_failed(status.name)

    def _adopt(self, slot: Slot, status: UnitStatus) -> None:
        log.info("adopting %s (invocation %s)", status.name, status.invocation_id)
        slot.backend = be.Backend(status.env("LLAMAD_BACKEND") or "")
        slot.invocation_id = status.invocation_id
        slot.main_pid = status.main_pid
        slot.n_restarts = status.n_restarts
        slot.last_used = time.monotonic()
        slot.load_started = time.monotonic()
        slot.load_time_unknown = True
        if status.active_state == "active":
            self.move(slot, State.LOADING, Cause.ADOPTED)
            self._spawn(self._wait_healthy(slot))
        else:
            self.move(slot, State.STARTING, Cause.ADOPTED)

    async def preload(self) -> None:
        for slot in self.slots.values():
            if slot.model.settings.load_on_startup and slot.state is State.UNLOADED:
                await self.load(slot)

    def expire(self) -> None:
        """Stop models whose idle TTL ran out; called periodically."""
        now = time.monotonic()
        ttls = {s.model.id: self.ttl(s) for s in self.loaded()}
        for mid in expired(self.views().values(), now, ttls):
            self._begin_stop(self.slots[mid], Cause.TTL)

    def ttl(self, slot: Slot) -> float | None:
        """Idle seconds before unloading; None = never."""
        return effective_ttl(slot.keep_alive, slot.model.settings.ttl, self.config.idle_ttl)

    def update_snapshot(self, snapshot: Snapshot) -> None:
        """Take a new catalog; models that vanished are stopped."""
        self.snapshot = snapshot
        for mid, slot in list(self.slots.items()):
            model = snapshot.models.get(mid)
            if model is None and slot.state is State.UNLOADED:
                del self.slots[mid]
            elif model is None:
                # _on_gone forgets the slot once its unit has stopped.
                self._begin_stop(slot, Cause.REMOVED)
            else:
                slot.model = model
        for mid, model in snapshot.models.items():
            self.slots.setdefault(mid, Slot(model))
        self._notify()

    async def close(self) -> None:
        await self.gpu.close()
        for task in list(self._tasks):
            task.cancel()
        for slot in self.slots.values():
            if slot.backend is not None:
                await slot.backend.close()

