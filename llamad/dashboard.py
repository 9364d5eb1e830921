"""llamad's dashboard: one page of plain HTML, CSS and JavaScript (llamad/static/), and
the server-sent events that keep it live.

`GET /dashboard/events` sends a `hello` with every model and the machine's figures, then
a `model` event for each model whose state changed (told by `Supervisor.events`, so
nothing polls the supervisor for state) and, every FIGURES_SECONDS, a `figures` event
with the loaded models' measurements (memory, requests, TTL left), the machine's memory
and models that joined or left the catalog. The model journal comes from
`GET /logs/stream/{model}` (logstream.py); load, unload and pin are the API's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from llamad import gpu, report
from llamad.api import supervisor
from llamad.events import Change
from llamad.keys import admin_only, public
from llamad.scheduler import State
from llamad.slot import Slot
from llamad.supervisor import Supervisor

STATIC = Path(__file__).parent / "static"
PAGES = {"/dashboard": "dashboard.html", "/dashboard/dashboard.js": "dashboard.js",
         "/dashboard/dashboard.css": "dashboard.css"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}
FIGURES_SECONDS = 2.0
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def entry(sup: Supervisor, slot: Slot) -> dict[str, Any]:
    """What the page shows of one model."""
    m = slot.model
    return {"id": m.id, "aliases": list(m.aliases), "source": m.source,
            "size": m.info.size if m.info else None, **report.describe(sup, slot)}


def machine(sup: Supervisor) -> dict[str, Any]:
    """RAM and GPUs, for the bars at the top of the page."""
    ram: dict[str, int | None] = {"total": None, "available": None}
    with contextlib.suppress(OSError, ValueError):
        ram = {"total": gpu.mem_total(), "available": gpu.mem_available()}
    return {"ram": ram, "gpus": [{"index": g.index, "name": g.name, "total": g.total,
                                  "used": g.used} for g in sup.measure.gpu_list()],
            "status": report.status_line(sup), "time": time.time()}


def sse(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


class Feed:
    """One page's event stream: which models changed since the last write, and which
    models the page knows, so it hears of models that join or leave the catalog."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.changed: set[str] = set()
        self.wake = asyncio.Event()
        self.known: set[str] = set()

    def on_change(self, change: Change) -> None:
        self.changed.add(change.model)
        self.wake.set()

    def hello(self) -> bytes:
        self.known = set(self.sup.slots)
        return sse("hello", {"models": [entry(self.sup, s) for s in self.sup.slots.values()],
                             "machine": machine(self.sup)})

    def changes(self) -> bytes:
        ids, self.changed = self.changed, set()
        slots = [self.sup.slots[i] for i in sorted(ids) if i in self.sup.slots]
        return b"".join(sse("model", entry(self.sup, s)) for s in slots)

    def figures(self) -> bytes:
        sup = self.sup
        now = set(sup.slots)
        added, removed = now - self.known, self.known - now
        self.known = now
        shown = [s for s in sup.slots.values() if s.state is not State.UNLOADED
                 or s.model.id in added]
        return sse("figures", {"models": [entry(sup, s) for s in shown],
                               "removed": sorted(removed), "machine": machine(sup)})


@admin_only  # every model, as /status shows them
async def handle_events(request: web.Request) -> web.StreamResponse:
    sup = supervisor(request)
    feed = Feed(sup)
    unsubscribe = sup.events.subscribe(feed.on_change)
    resp = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await resp.prepare(request)
        await resp.write(feed.hello())
        next_figures = time.monotonic() + FIGURES_SECONDS
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(feed.wake.wait(),
                                       max(0.0, next_figures - time.monotonic()))
            feed.wake.clear()
            if feed.changed:
                await resp.write(feed.changes())
            if time.monotonic() >= next_figures:
                await resp.write(feed.figures())
                next_figures = time.monotonic() + FIGURES_SECONDS
    except ConnectionResetError:  # the page went away
        return resp
    finally:
        unsubscribe()


def _page(name: str) -> Any:
    path = STATIC / name
    headers = {"Content-Type": TYPES[path.suffix], "Cache-Control": "no-cache"}

    async def handle(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path, headers=headers)
    return handle


def add_routes(app: web.Application) -> None:
    for route, name in PAGES.items():
        app.router.add_get(route, public(_page(name)))  # no data in them
    app.router.add_get("/dashboard/events", handle_events)
