"""The state the supervisor's parts share, and the one way to change a model's state.

The Supervisor is assembled from one class per concern, each a layer over this one
(supervisor.py lists them). They all hold the same Slots, and every state change goes
through `Core.move`. Slots are mutated only on the event loop thread and never across
an await: a task that awaits re-checks `slot.epoch` (bumped by every move) before it
acts on what it decided earlier.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from types import MappingProxyType
from typing import Any

from llamad.catalog.catalog import Snapshot
from llamad.config import Config
from llamad.errors import Unavailable
from llamad.memory.serverargs import parse_args
from llamad.memory.types import Memory
from llamad.supervisor import backend as be
from llamad.supervisor import unitspec
from llamad.supervisor.events import TRANSITIONS, Cause, Change, Hub, State
from llamad.supervisor.hooks import Hook
from llamad.supervisor.scheduler import ModelView, Policy, effective_ttl
from llamad.supervisor.slot import Measure, Slot, SlotView, Units
from llamad.systemd import exits
from llamad.systemd.units import UnitError, UnitSpec

log = logging.getLogger("llamad.supervisor")

Journal = Callable[[str], Awaitable[str]]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class IllegalMove(RuntimeError):
    """A state change that events.TRANSITIONS forbids: a bug in llamad, never user error."""


class Sessions:
    """Backends with responses in flight. A retired backend's HTTP session (its pooled
    connections) is closed only once its last response has ended: closing it earlier
    would cut the streams still using it."""

    def __init__(self) -> None:
        self._users: dict[int, int] = {}
        self._retired: dict[int, be.Backend] = {}

    def hold(self, backend: be.Backend) -> None:
        self._users[id(backend)] = self._users.get(id(backend), 0) + 1

    def let_go(self, backend: be.Backend) -> be.Backend | None:
        """One response ended; returns the backend if it is now to be closed."""
        left = self._users.pop(id(backend)) - 1
        if left:
            self._users[id(backend)] = left
            return None
        return self._retired.pop(id(backend), None)

    def retire(self, backend: be.Backend) -> bool:
        """The model no longer sends new requests there; True: close it now."""
        if id(backend) in self._users:
            self._retired[id(backend)] = backend
            return False
        return True


class Core:
    def __init__(self, config: Config, snapshot: Snapshot, units: Units,
                 measure: Measure, journal: Journal,
                 rescan: Callable[[], Awaitable[None]] | None = None,
                 opened: bool = True) -> None:
        self.config = config
        self.snapshot = snapshot
        self.units = units
        self.measure = measure
        self.journal = journal
        self.rescan = rescan  # a catalog scan that starts now (the watcher's)
        # Set once the first catalog scan is in and an earlier llamad's units are adopted.
        # llamad serves before that (app.py: a slow scan must not hold READY); requests
        # naming a model wait for it (Admission.wait_open).
        self.opened = asyncio.Event()
        if opened:
            self.opened.set()
        self.sessions = Sessions()
        self.policy = Policy(config.eviction_policy)
        self.slots: dict[str, Slot] = {m.id: Slot(m) for m in snapshot.models.values()}
        self._changed = asyncio.Event()
        self.changes = 0  # every notified change of any slot (listing.py caches by it)
        self.events = Hub()
        self.hooks: tuple[Hook, ...] = ()  # features called at each step (hooks.py)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing: set[asyncio.Task[Any]] = set()  # finished, not cancelled, on close()
        self._closed = False
        self.started = time.monotonic()

    # -- views ---------------------------------------------------------------

    def by_unit(self, unit: str) -> Slot | None:
        for slot in self.slots.values():
            if slot.unit == unit:
                return slot
        return None

    def view(self, slot: SlotView) -> ModelView:
        s = slot.model.settings
        learned = self.measure.learned_for(slot.model)
        # cheapest-reload ranks by the load time learned on earlier loads too.
        load = learned.load_seconds if learned and learned.load_seconds is not None \
            else slot.load_seconds
        shares = parse_args(s.args).tensor_split
        return ModelView(
            id=slot.model.id, state=slot.state, in_flight=slot.in_flight, queued=slot.queued,
            last_used=slot.last_used, pinned=slot.pinned, need=self.measure.need(slot.model),
            load_seconds=load, gpus=slot.gpus, devices=s.devices or (), used=slot.used,
            split=s.split, reason=slot.reason,
            shares=shares if sum(1 for x in shares if x > 0) > 1 else ())

    def views(self, target: Slot | None = None) -> dict[str, ModelView]:
        """Loaded models (and `target`): unloaded ones play no part in a decision,
        and skipping them keeps a decision cheap with thousands catalogued. A target
        that may load comes with its way to fit the memory there is."""
        views = {s.model.id: self.view(s) for s in self.loaded()}
        if target is not None:
            view = self.view(target)
            if target.state in (State.UNLOADED, State.FAILED):
                view = dataclasses.replace(view, fit=self.measure.fitter(target.model),
                                           floor=self.measure.floor(target.model))
            views[target.model.id] = view
        return views

    @property
    def models(self) -> Mapping[str, SlotView]:
        """Every model, read-only: what listings, feeds and metrics read."""
        return MappingProxyType(self.slots)

    def loaded_models(self) -> list[SlotView]:
        return list(self.loaded())

    def loaded(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.state is not State.UNLOADED]

    def ttl(self, slot: SlotView) -> float | None:
        """Idle seconds before unloading; None = never."""
        return effective_ttl(slot.keep_alive, slot.model.settings.ttl, self.config.idle_ttl)

    def current(self, slot: Slot) -> bool:
        """Whether the slot is still the catalog's (a removed model's slot is forgotten)."""
        return self.slots.get(slot.model.id) is slot

    # -- the one state change ------------------------------------------------

    def move(self, slot: Slot, new: State, cause: Cause, detail: str = "") -> None:
        """The one place a model's state changes: checked against the transition table,
        logged, waiters woken and listeners told. An illegal move raises IllegalMove."""
        old = slot.state
        if new is old:
            return
        if new not in TRANSITIONS[old]:
            raise IllegalMove(f"illegal state change of model {slot.model.id}: "
                              f"{old.value} -> {new.value} ({cause.value})")
        log.debug("model %s: %s -> %s (%s%s)", slot.model.id, old.value, new.value,
                  cause.value, f": {detail}" if detail else "")
        slot.state = new
        slot.epoch += 1
        self._notify()
        self.events.emit(Change(slot.model.id, old, new, cause, detail, time.time()))

    def _notify(self) -> None:
        self.changes += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Unavailable(f"timed out waiting for {what}", code="timeout")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), left)

    # -- measurements ----------------------------------------------------------

    def record_sample(self, slot: Slot, pid: int, epoch: int, now: Memory,
                      peak_ram: int) -> None:
        """A measurement of the model's process `pid`, begun at `epoch`: its memory now and
        its peak RAM. Dropped if the process stopped or restarted since it was taken, or
        the model changed state (an asleep figure must not stand for an awake model)."""
        if slot.main_pid != pid or slot.epoch != epoch or \
                slot.state in (State.UNLOADED, State.STOPPING):
            return
        if slot.sampled_pid != pid:
            slot.sampled_pid, slot.peak = pid, Memory()
        slot.peak = Memory(max(slot.peak.ram, peak_ram), max(slot.peak.vram, now.vram))
        # Only a ready model's figure stands in for its need: one taken mid-load is
        # too low, and the scheduler would fit a second model beside it. A sleeping
        # one's is what it holds asleep: what it freed counts as free.
        slot.used = now if slot.state in (State.READY, State.SLEEPING) else Memory()
        if slot.state is State.READY and self.measure.should_learn(
                slot.model, slot.peak.ram, slot.load_seconds):
            self.measure.learn(slot.model, slot.peak.ram, slot.peak.vram, slot.load_seconds)

    # -- background tasks ----------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str,
              slot: Slot | None = None) -> asyncio.Task[Any]:
        """Run `coro` as a named task whose failure is reported: it marks `slot` failed
        with the reason rather than leave it stuck in a passing state."""
        name = f"{what} {slot.model.id}" if slot is not None else what
        if self._closed:  # llamad is exiting: units outlive it, nothing new starts
            coro.close()
            coro = asyncio.sleep(0)
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        epoch = slot.epoch if slot is not None else 0
        task.add_done_callback(lambda t: self._reap(t, slot, epoch))
        return task

    def _reap(self, task: asyncio.Task[Any], slot: Slot | None, epoch: int) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None or self._closed:
            return
        err = task.exception()
        if isinstance(err, UnitError):  # systemd said no: its message is the reason
            log.warning("%s: %s", task.get_name(), err)
        else:
            log.error("%s failed: %r", task.get_name(), err, exc_info=err)
        # Only where the step it carried out is still the slot's latest: a later
        # move has already settled the state.
        if slot is not None and self.current(slot) and slot.epoch == epoch:
            self._fail(slot, f"{task.get_name()} failed: {err}")

    # -- the unit and its backend --------------------------------------------

    def spec(self, slot: SlotView, gpus: tuple[int, ...] = (),
             address: str | None = None) -> tuple[UnitSpec, str]:
        """The unit a load would start now, and the address its backend listens on:
        `address`, else the slot's own (a TCP port is allocated when the model starts)."""
        address = address or slot.address or unitspec.address(self.config, slot.model)
        limit = unitspec.memory_max(self.config, slot.model,
                                    lambda: self.measure.derived_limit(slot.model))
        spec = unitspec.build(self.config, slot.model, address,
                              self.measure.gpu_uuids(gpus), limit, slot.fit,
                              self.measure.prompt_cache(slot.model)[1])
        return spec, address

    def exit_text(self, slot: Slot) -> str:
        """The unit's last end as a sentence, naming a file its sandbox keeps from it."""
        files = [*slot.model.shards, *([slot.model.mmproj] if slot.model.mmproj else [])]
        return exits.describe(slot.last_exit, self.spec(slot, slot.gpus)[0], files)

    def _allocate(self, slot: Slot) -> str:
        """The slot's backend address, allocated once while it runs. A TCP port is the
        lowest from tcp-port-base up that no model holds and nothing else listens on,
        so adding a model never moves a running one (adoption takes the unit's own)."""
        if slot.address or self.config.backend == "unix":
            return slot.address or unitspec.address(self.config, slot.model)
        held = {unitspec.tcp_port(s.address) for s in self.slots.values()}
        for port in range(self.config.tcp_port_base, 65536):
            if port not in held and _bindable(port):
                return unitspec.address(self.config, slot.model, port)
        raise Unavailable(f"no free loopback port from tcp-port-base "
                          f"{self.config.tcp_port_base} up for model {slot.model.id}")

    def _adoptable(self, slot: Slot, address: str) -> bool:
        """Whether a running unit's recorded address can be the slot's."""
        if self.config.backend == "unix":
            return address == unitspec.address(self.config, slot.model)
        port = unitspec.tcp_port(address)
        return port is not None and all(
            unitspec.tcp_port(s.address) != port for s in self.slots.values() if s is not slot)

    def _fail(self, slot: Slot, reason: str) -> None:
        if slot.state is State.FAILED:
            return
        log.warning("model %s failed: %s", slot.model.id, reason)
        slot.reason = reason
        self._drop_backend(slot)
        self.move(slot, State.FAILED, Cause.FAILED, reason)

    def _drop_backend(self, slot: Slot) -> None:
        """No new requests go to this backend; its session closes after the last response."""
        if slot.backend is not None and self.sessions.retire(slot.backend):
            self._close(slot.backend)
        slot.backend = None

    def _close(self, backend: be.Backend) -> None:
        task = self.spawn(backend.close(), f"closing the session to {backend.address}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for hook in self.hooks:
            await hook.close()
        for task in self._tasks - self._closing:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for slot in self.slots.values():
            if slot.backend is not None:
                await slot.backend.close()
