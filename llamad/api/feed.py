"""GET /models/sse: router mode's model events, from the supervisor's state changes.

Each record is one `data: {"model", "event", "data"}` line, as llama.cpp's router sends:
`model_status` when a load starts, `status_change` on every change after (with
`progress` while loading and `info` once loaded), `models_reload` when the catalog
changes. Load progress is an estimate: the time since the load began over the model's
learned load time (or a guess from its size before it was ever loaded). Every state
record also carries `llamad`: the state, the cause and its detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from aiohttp import web

from llamad.api import listing
from llamad.catalog.catalog import Snapshot
from llamad.http import keys
from llamad.memory.measure import Measure
from llamad.supervisor.events import Cause, Change, State
from llamad.supervisor.slot import SlotView
from llamad.supervisor.supervisor import Supervisor

log = logging.getLogger("llamad.feed")

PROGRESS_INTERVAL = 0.25  # seconds between progress records, as often as the router's
KEEPALIVE = 15.0  # an SSE comment this often keeps proxies from closing an idle feed
QUEUE_LIMIT = 1000  # records a slow client may lag behind before it is dropped
GUESS_BASE, GUESS_BYTES_PER_S = 1.0, 512 * 1024**2  # load time of a never-loaded model
_LOADING = (State.STARTING, State.LOADING)


class ModelFeed:
    """Fans model events out to every connected /models/sse client."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        # Each client's queue of (model, encoded record); None ends the feed.
        self.clients: set[asyncio.Queue[tuple[str, bytes] | None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        sup.events.subscribe(self.on_change)

    # -- producing -----------------------------------------------------------

    def on_change(self, change: Change) -> None:
        slot = self.sup.models.get(change.model)
        status = listing.ROUTER_STATUS[change.new]
        data: dict[str, Any] = {"status": status}
        if change.new is State.READY and slot is not None:
            data["info"] = listing.info(slot.model)
        elif change.new is State.SLEEPING:
            pass  # router mode's SERVER_MODEL_STATUS_SLEEPING carries nothing more
        elif status == "unloaded":
            data["exit_code"] = listing.exit_code(slot) if slot is not None else 0
        elif slot is not None:
            data["progress"] = self.progress(slot)
        data["llamad"] = {"state": change.new.value, "cause": change.cause.value,
                          "detail": change.detail}
        starting = change.new is State.STARTING and change.cause is Cause.LOAD
        self.send(change.model, "model_status" if starting else "status_change", data)
        if change.new in _LOADING:
            self._tick_while_loading()

    def on_catalog(self, old: Snapshot, new: Snapshot) -> None:
        self.send("*", "models_reload", None)

    def send(self, model: str, event: str, data: dict[str, Any] | None) -> None:
        record: dict[str, Any] = {"model": model, "event": event}
        if data is not None:
            record["data"] = data
        line = b"data: " + json.dumps(record).encode() + b"\n\n"
        for queue in list(self.clients):
            if queue.qsize() >= QUEUE_LIMIT:
                log.warning("dropping a /models/sse client %d records behind", QUEUE_LIMIT)
                self.clients.discard(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait((model, line))

    def progress(self, slot: SlotView) -> dict[str, Any]:
        stages = list(listing.LOAD_STAGES[:2] if slot.model.mmproj else listing.LOAD_STAGES[:1])
        elapsed = time.monotonic() - slot.load_started if slot.load_started else 0.0
        value = min(0.99, elapsed / expected_load_seconds(self.sup, slot))
        return {"stages": stages, "current": "text_model", "value": round(value, 3)}

    def _tick_while_loading(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.ensure_future(self._tick())
            self._ticker.add_done_callback(_report)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            loading = [s for s in self.sup.models.values() if s.state in _LOADING]
            if not loading:
                return
            for slot in loading:
                if self.clients:
                    self.send(slot.model.id, "status_change",
                              {"status": "loading", "progress": self.progress(slot)})

    # -- serving -------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self.clients.add(queue)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except TimeoutError:
                    item = ("*", b": keep-alive\n\n")
                if item is None:
                    break
                if self._visible(request, item[0]):
                    await resp.write(item[1])
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        finally:
            self.clients.discard(queue)
        return resp

    def _visible(self, request: web.Request, model: str) -> bool:
        """A client with a scoped API key hears only of its own models: not of one that
        has left the catalog since, whose aliases are no longer known."""
        if model == "*":
            return True
        slot = self.sup.models.get(model)
        return keys.may_use(request, model, slot.model.aliases if slot is not None else ())

    async def close(self) -> None:
        """End every feed, so a shutdown need not wait for the clients to leave."""
        for queue in list(self.clients):
            queue.put_nowait(None)
        self.clients.clear()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker


def expected_load_seconds(sup: Supervisor, slot: SlotView) -> float:
    """The model's last load time, learned or from this run; else a guess by size."""
    if slot.load_seconds:
        return slot.load_seconds
    if isinstance(sup.measure, Measure):
        learned = sup.measure.learned_for(slot.model)
        if learned is not None and learned.load_seconds:
            return learned.load_seconds
    size = slot.model.info.size if slot.model.info else 0
    return GUESS_BASE + size / GUESS_BYTES_PER_S


def _report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the load progress ticker failed", exc_info=task.exception())
