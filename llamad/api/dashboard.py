"""llamad's dashboard: one page of plain HTML, CSS and JavaScript (llamad/static/), and
the server-sent events that keep it live.

`GET /dashboard/events` sends a `hello` with every model's id and the machine's figures,
the models in full in `models` events of BATCH each, then a `model` event for each model
whose state changed (told by `Supervisor.events`, so nothing polls the supervisor for
state) and, every FIGURES_SECONDS, a `figures` event with the loaded models' measurements
(memory, requests, TTL left), the machine's memory and models that left the catalog
(models that joined come in `models` events). The model journal comes from
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

from llamad.api import report
from llamad.api.webui import content_type
from llamad.http import limits
from llamad.http.context import app_key, supervisor
from llamad.http.keys import admin_only, public
from llamad.memory import gpu
from llamad.supervisor.events import Change, State
from llamad.supervisor.slot import SlotView
from llamad.supervisor.supervisor import Supervisor

STATIC = Path(__file__).parent / "static"
PAGES = {"/dashboard": "dashboard.html", "/dashboard/dashboard.js": "dashboard.js",
         "/dashboard/dashboard.css": "dashboard.css"}
# The page's own files and llamad's API, nothing else; no inline script or style, so no
# model-derived text can run; no page may frame it (clickjacking Load, Unload, Pin).
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
          "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
FIGURES_SECONDS = 2.0
BATCH = 100  # models per `models` event
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
PAGES_OPEN: Any = app_key("dashboard_pages", set)


def entry(sup: Supervisor, slot: SlotView) -> dict[str, Any]:
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
        self.closing = False

    def close(self) -> None:
        """End the stream: llamad is shutting down (aiohttp waits for open handlers)."""
        self.closing = True
        self.wake.set()

    def on_change(self, change: Change) -> None:
        self.changed.add(change.model)
        self.wake.set()

    def hello(self) -> tuple[bytes, list[str]]:
        """The first event (every model's id, the machine) and the ids to send in full."""
        self.known = set(self.sup.models)
        ids = list(self.sup.models)
        return sse("hello", {"ids": ids, "machine": machine(self.sup)}), ids

    def batch(self, ids: list[str]) -> bytes:
        """A `models` event: these models in full."""
        slots = [self.sup.models[i] for i in ids if i in self.sup.models]
        return sse("models", [entry(self.sup, s) for s in slots])

    def changes(self) -> bytes:
        ids, self.changed = self.changed, set()
        slots = [self.sup.models[i] for i in sorted(ids) if i in self.sup.models]
        return b"".join(sse("model", entry(self.sup, s)) for s in slots)

    def figures(self) -> tuple[bytes, list[str]]:
        """The periodic event (loaded models, models that left, the machine) and the ids
        of models that joined the catalog, to send in full."""
        sup = self.sup
        now = set(sup.models)
        added, removed = sorted(now - self.known), sorted(self.known - now)
        self.known = now
        loaded = [entry(sup, s) for s in sup.models.values() if s.state is not State.UNLOADED]
        return sse("figures", {"models": loaded, "removed": removed,
                               "machine": machine(sup)}), added


async def send_models(resp: web.StreamResponse, feed: Feed, ids: list[str]) -> None:
    """Models in full, BATCH at a time, letting other work run in between: an entry costs
    a memory estimate (~0.3 ms), and thousands of models may be catalogued."""
    for start in range(0, len(ids), BATCH):
        await resp.write(feed.batch(ids[start:start + BATCH]))
        await asyncio.sleep(0)


@admin_only  # every model, as /status shows them
@limits.long_lived
async def handle_events(request: web.Request) -> web.StreamResponse:
    sup = supervisor(request)
    feed = Feed(sup)
    unsubscribe = sup.events.subscribe(feed.on_change)
    pages: set[Feed] = request.app[PAGES_OPEN]
    pages.add(feed)
    resp = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await resp.prepare(request)
        hello, ids = feed.hello()
        await resp.write(hello)
        await send_models(resp, feed, ids)
        next_figures = time.monotonic() + FIGURES_SECONDS
        while not feed.closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(feed.wake.wait(),
                                       max(0.0, next_figures - time.monotonic()))
            feed.wake.clear()
            if feed.changed:
                await resp.write(feed.changes())
            if time.monotonic() >= next_figures:
                figures, added = feed.figures()
                await resp.write(figures)
                await send_models(resp, feed, added)
                next_figures = time.monotonic() + FIGURES_SECONDS
        return resp
    except ConnectionResetError:  # the page went away
        return resp
    finally:
        pages.discard(feed)
        unsubscribe()


async def close_pages(app: web.Application) -> None:
    for feed in app[PAGES_OPEN]:
        feed.close()


def _page(name: str) -> Any:
    path = STATIC / name
    headers = {"Content-Type": content_type(name), "Cache-Control": "no-cache",
               "Content-Security-Policy": POLICY}

    async def handle(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path, headers=headers)
    return handle


def add_routes(app: web.Application) -> None:
    app[PAGES_OPEN] = set()
    app.on_shutdown.append(close_pages)
    for route, name in PAGES.items():
        app.router.add_get(route, public(_page(name)))  # no data in them
    app.router.add_get("/dashboard/events", handle_events)
