"""Requests: which model a name means, the queue bounds, holding a model for one request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from llamad.catalog.catalog import Snapshot, may_appear
from llamad.errors import (
    BackendError,
    BackendUnreachable,
    BadRequest,
    LlamadError,
    NotFound,
    TooManyRequests,
    Unavailable,
    unknown_model,
)
from llamad.supervisor import backend as be
from llamad.supervisor.events import Cause, State
from llamad.supervisor.lifecycle import Lifecycle
from llamad.supervisor.slot import Slot, SlotView

log = logging.getLogger("llamad.supervisor")


class Admission(Lifecycle):
    async def wait_open(self) -> None:
        """Until llamad has read its models after a start (Core.opened), bounded by
        queue-timeout; then 503 with Retry-After. app.py has every request but /health
        wait here."""
        if self.opened.is_set():
            return
        try:
            await asyncio.wait_for(self.opened.wait(), self.config.queue_timeout)
        except TimeoutError:
            raise self._not_open() from None

    @staticmethod
    def _not_open() -> Unavailable:
        return Unavailable("llamad is still reading its models after starting; retry in a "
                           "moment", retry_after=2, code="catalog_scanning")

    async def find(self, name: object) -> Slot:
        """resolve(), but a model whose file is being copied in is waited for (until it
        settles, bounded by queue-timeout) rather than answered 404."""
        try:
            return self.resolve(name)
        except NotFound:
            assert isinstance(name, str)
            if self.rescan is None or not (name in self.snapshot.settling
                                           or may_appear(self.config, name)):
                raise
        await self.rescan()  # the watcher may not have seen the file yet
        deadline = time.monotonic() + self.config.queue_timeout
        while name in self.snapshot.settling:
            await self._wait_change(deadline, f"the file of model {name} to be complete")
        return self.resolve(name)

    def resolve(self, name: object) -> Slot:
        if not isinstance(name, str) or not name:
            raise BadRequest("the request names no model; set \"model\" to one of GET /v1/models",
                             code="model_required")
        model = self.snapshot.resolve(name)
        if model is None or model.id not in self.slots:
            raise unknown_model(name, bool(self.config.peers))
        return self.slots[model.id]

    @contextlib.asynccontextmanager
    async def use(self, slot: Slot, keep_alive: float | None = None,
                  load: bool | None = None) -> AsyncIterator[be.Backend]:
        """Hold the model for one request: wait until it is ready, count it in flight.
        `load`: whether the request may load it (`?autoload=`); None: models-autoload."""
        backend = await self.acquire(slot, load=load)
        self.sessions.hold(backend)
        try:
            yield backend
        except BackendUnreachable:
            self._suspect(slot, backend)
            raise
        except BackendError as e:
            raise await self._explain(slot, e) from e
        finally:
            self.release(slot, keep_alive)
            if self.sessions.let_go(backend) is not None:
                self._close(backend)

    async def acquire(self, slot: Slot, explicit: bool = False,
                      load: bool | None = None) -> be.Backend:
        self.refuse_broken(slot)
        limit = self.concurrency(slot)
        self._refuse_full(slot, limit)
        may_load = explicit or (self.config.models_autoload if load is None else load)
        if not may_load and slot.state is State.UNLOADED:
            raise self._not_loaded(slot)
        for hook in self.hooks:  # e.g. a model whose rpc worker is down: 503, nothing started
            await hook.admit(slot)
        # Again: requests that came while a hook awaited (an rpc worker probed) are not
        # counted queued yet, and a burst of them would all pass the first look.
        self._refuse_full(slot, limit)
        deadline = time.monotonic() + self.config.queue_timeout
        await self._line_up(slot, limit, deadline)
        try:
            if may_load:
                return await self._admit(slot, explicit, deadline)
            return await self._admit_loaded(slot, deadline)
        except BaseException:
            slot.gate.leave(self.concurrency(slot))
            raise

    def _refuse_full(self, slot: Slot, limit: int) -> None:
        if slot.queued >= self.config.queue_size:
            full = (f"model {slot.model.id} has {slot.queued} requests waiting, the queue "
                    "limit; retry later")
            if limit:  # the queue of its concurrency limit: as llama-swap, 429
                raise TooManyRequests(f"{full} (concurrency-limit {limit})")
            raise Unavailable(full, code="queue_full")

    @staticmethod
    def _not_loaded(slot: Slot) -> BadRequest:
        return BadRequest(f"model {slot.model.id} is not loaded and autoload is off; "
                          "POST /models/load first", code="model_not_loaded")

    async def _admit_loaded(self, slot: Slot, deadline: float) -> be.Backend:
        """_admit for a request that may not load its model (models-autoload = no), as
        router mode refuses one: a model that stops while it waits (an unload draining)
        answers as if it had been unloaded at the door, rather than loaded again by it."""
        slot.queued += 1
        try:
            while True:
                if slot.state is State.UNLOADED:
                    raise self._not_loaded(slot)
                backend = self._step(slot, False)
                if backend is not None:
                    return backend
                await self._wait_change(deadline, f"model {slot.model.id} to become ready")
        finally:
            slot.queued -= 1

    def concurrency(self, slot: SlotView) -> int:
        """Requests forwarded to the model at once at most; 0 = no limit. Read afresh each
        time: a preset edit changes it without restarting the model."""
        limit = slot.model.settings.concurrency_limit
        return self.config.concurrency_limit if limit is None else limit

    async def _line_up(self, slot: Slot, limit: int, deadline: float) -> None:
        """Wait for a place under the concurrency limit, in arrival order."""
        slot.queued += 1
        try:
            await slot.gate.enter(limit, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise Unavailable(f"timed out waiting for one of the {limit} places of model "
                              f"{slot.model.id} (concurrency-limit)", code="timeout") from None
        finally:
            slot.queued -= 1

    def update_snapshot(self, snapshot: Snapshot) -> None:
        """A preset's concurrency-limit applies at once: raised, it lets in the requests
        already waiting, not only once one in flight ends (a long stream may hold its
        place for minutes)."""
        super().update_snapshot(snapshot)
        for slot in self.slots.values():
            slot.gate.pass_on(self.concurrency(slot))

    def refuse_broken(self, slot: Slot) -> None:
        """A model a preset error touches is not served until the file is fixed."""
        if slot.model.error:
            raise Unavailable(slot.model.error, code="configuration_error", retry_after=10)

    async def load(self, slot: Slot) -> None:
        self.refuse_broken(slot)
        await super().load(slot)

    def release(self, slot: Slot, keep_alive: float | None = None) -> None:
        slot.gate.leave(self.concurrency(slot))
        slot.in_flight -= 1
        slot.served += 1
        for hook in self.hooks:  # e.g. did a restored KV cache take? (checked once)
            hook.request_ended(slot)
        slot.last_used = slot.alive_at = time.monotonic()
        if keep_alive is not None:
            slot.keep_alive = keep_alive
        # keep_alive is a TTL, and a pin outlasts every TTL (as expired() has it): a
        # client's keep_alive 0 stops a pinned model only once it is unpinned.
        if keep_alive == 0 and slot.in_flight == 0 and slot.queued == 0 and not slot.pinned:
            self._begin_stop(slot, Cause.KEEP_ALIVE)
        self._notify()

    def _suspect(self, slot: Slot, backend: be.Backend) -> None:
        """The backend refused a connection: it likely died and systemd has not told us
        yet. Stop serving it until /health answers again (or systemd's signals move on)."""
        if slot.state is State.READY and slot.backend is backend:
            log.warning("model %s refused a connection; checking its health", slot.model.id)
            slot.load_started = time.monotonic()
            slot.load_time_unknown = True
            self.move(slot, State.LOADING, Cause.SUSPECT)
            self._begin_health(slot)

    async def _explain(self, slot: Slot, err: BackendError) -> LlamadError:
        """A backend that broke mid-request: once systemd says why (within a second), tell
        the client that, e.g. out of memory, rather than only that the connection broke."""
        deadline = time.monotonic() + 1.0
        # STARTING too: systemd restarts it, and a listener (rpcguard) may still fail it.
        while slot.state in (State.READY, State.STARTING) and time.monotonic() < deadline:
            with contextlib.suppress(Unavailable):
                await self._wait_change(deadline, "the backend's exit status")
        if slot.state is State.FAILED and slot.reason:
            return Unavailable(f"model {slot.model.id} failed during the request: "
                               f"{slot.reason}", code="model_failed")
        return err

    def set_pin(self, slot: Slot, pinned: bool) -> None:
        """Pin or unpin a model until llamad restarts; the preset's `pin` is the default."""
        slot.pin = pinned
        log.info("model %s %s", slot.model.id, "pinned" if pinned else "unpinned")
        self._notify()  # a load waiting for room decides again

    async def unload(self, slot: Slot) -> None:
        """Stop a model; returns once its requests in flight have finished (bounded by
        drain-timeout) and the stop is under way. Not the stop call itself: a KV cache
        saved first (before_stop) may take kv-cache-timeout, and the stop goes on
        whatever this answers."""
        if slot.state is State.FAILED:
            slot.reason = ""
            self.move(slot, State.UNLOADED, Cause.RESET)
            await self.units.reset_failed(slot.unit)
            return
        self._begin_stop(slot, Cause.UNLOAD)
        deadline = time.monotonic() + self.config.drain_timeout + 1
        with contextlib.suppress(Unavailable):  # past drain-timeout the stop goes on
            while slot.state is State.STOPPING and not slot.stop_sent and slot.in_flight:
                await self._wait_change(deadline, f"requests on {slot.model.id} to finish")
