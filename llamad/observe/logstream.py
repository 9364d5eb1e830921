"""Journal lines over HTTP as server-sent events, read with the journal API.

`GET /logs/stream` streams llamad's own unit, `GET /logs/stream/{model}` that model's
unit (systemd's own lines about the unit included: started, stopped, failed). Each
journal entry is one event (docs/operations.md):

    id: <journal cursor>
    data: {"time": 1700000000.123, "unit": "llama-server@x.service", "priority": 6,
           "message": "..."}

`?lines=N` sends the last N entries first (default 100), `?follow=0` ends after them;
a reconnecting client's `Last-Event-ID` resumes right after that entry. The journal's
own file descriptor wakes the event loop when entries arrive: no thread, no journalctl.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from typing import Any

from aiohttp import web
from systemd import journal

from llamad.errors import BadRequest, Unavailable
from llamad.http import keys, limits
from llamad.http.context import app_key, supervisor
from llamad.memory.gpu import unit_of_pid

DEFAULT_LINES = 100
MAX_LINES = 10_000
MAX_STREAMS = 32  # each holds the journal's files open
POLL_SECONDS = 1.0  # look again even without a wake-up (sd_journal_get_timeout may ask)
KEEPALIVE = 15.0  # a quiet stream sends a comment this often, so proxies keep it open
BATCH = 500  # entries written before letting other work run
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


class Streams:
    """The open log streams: how many, so their number stays bounded, and how to wake
    them all when llamad shuts down (aiohttp waits for open handlers before it exits)."""

    def __init__(self) -> None:
        self.open = 0
        self.closing = False
        self.wakers: set[asyncio.Event] = set()

    async def close(self, app: web.Application) -> None:
        self.closing = True
        for woken in self.wakers:
            woken.set()


STREAMS: Any = app_key("log_streams", Streams)


def open_reader(unit: str | None) -> Any:
    """A journal reader for one unit's entries, or this process's own without a unit."""
    reader = journal.Reader(flags=journal.LOCAL_ONLY)
    if unit:
        reader.add_match(_SYSTEMD_UNIT=unit)
        reader.add_disjunction()
        reader.add_match(UNIT=unit, _PID="1")  # systemd's lines about the unit
        reader.add_disjunction()
        reader.add_match(OBJECT_SYSTEMD_UNIT=unit, _UID="0")  # llamad's (requestlog.note)
    else:
        reader.add_match(_PID=str(os.getpid()))
    return reader


def backlog(reader: Any, lines: int, after: str | None) -> list[dict[str, Any]]:
    """Entries to send before following; leaves `reader` so get_next() returns the rest."""
    if after:
        with contextlib.suppress(OSError, ValueError):
            reader.seek_cursor(after)
            entry = reader.get_next()  # the entry at the cursor, or the next if it is gone
            return [] if not entry or reader.test_cursor(after) else [entry]
    reader.seek_tail()
    if lines == 0:
        reader.get_previous()  # onto the last entry, so get_next() returns only new ones
        return []
    first = reader.get_previous(lines)  # as far back as there are entries, at most `lines`
    return [first] if first else []


def event(entry: dict[str, Any]) -> bytes:
    """One SSE event; JSON escapes control characters, so a line break cannot leak."""
    message = entry.get("MESSAGE", "")
    if isinstance(message, list):  # a field given twice
        message = " ".join(map(str, message))
    if isinstance(message, bytes):
        message = message.decode("utf-8", errors="replace")
    stamp = entry.get("__REALTIME_TIMESTAMP")
    data = {"time": stamp.timestamp() if stamp is not None else None,
            "unit": entry.get("UNIT") or entry.get("_SYSTEMD_UNIT"),  # systemd says UNIT=
            "priority": entry.get("PRIORITY", journal.LOG_INFO), "message": str(message)}
    return f"id: {entry['__CURSOR']}\ndata: {json.dumps(data)}\n\n".encode()


async def _drain(reader: Any, resp: web.StreamResponse) -> int:
    """Write every entry the reader has now; how many."""
    sent = 0
    while entry := reader.get_next():
        await resp.write(event(entry))  # waits while the client is slow
        sent += 1
        if sent % BATCH == 0:
            await asyncio.sleep(0)
    return sent


async def _follow(reader: Any, resp: web.StreamResponse, streams: Streams) -> None:
    """Until llamad shuts down or the client leaves (a write then fails)."""
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()
    fd = reader.fileno()
    loop.add_reader(fd, woken.set)
    streams.wakers.add(woken)
    quiet_since = loop.time()
    try:
        while not streams.closing:
            if await _drain(reader, resp):
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= KEEPALIVE:
                await resp.write(b": keep-alive\n\n")
                quiet_since = loop.time()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(woken.wait(), POLL_SECONDS)
            woken.clear()
            reader.process()  # consumes the wake-up and notices new or rotated files
    finally:
        streams.wakers.discard(woken)
        loop.remove_reader(fd)


def _lines(request: web.Request) -> int:
    text = request.query.get("lines", str(DEFAULT_LINES))
    if not text.isdigit() or int(text) > MAX_LINES:
        raise BadRequest(f"lines must be a whole number from 0 to {MAX_LINES}",
                         code="invalid_lines")
    return int(text)


async def stream(request: web.Request, unit: str | None) -> web.StreamResponse:
    lines = _lines(request)
    follow = request.query.get("follow", "1").lower() not in ("0", "false", "no")
    streams: Streams = request.app[STREAMS]
    if streams.open >= MAX_STREAMS:
        raise Unavailable(f"{MAX_STREAMS} log streams are open already; retry later",
                          code="too_many_streams")
    resp = web.StreamResponse(headers=SSE_HEADERS)
    streams.open += 1
    reader = None
    try:
        try:
            reader = open_reader(unit)
        except OSError as e:  # no journal, no descriptors: counted back below
            raise Unavailable(f"the journal cannot be read now ({e.strerror or e}); retry "
                              "later", code="journal_unavailable") from e
        await resp.prepare(request)
        for entry in backlog(reader, lines, request.headers.get("Last-Event-ID")):
            await resp.write(event(entry))
        await _drain(reader, resp)
        if follow:
            await _follow(reader, resp, streams)
        await resp.write_eof()
        return resp
    except ConnectionResetError:  # the client went away
        return resp
    finally:
        if reader is not None:
            reader.close()
        streams.open -= 1


def own_unit() -> str | None:
    """llamad's unit; None outside a systemd service (then its entries match by PID)."""
    return unit_of_pid(os.getpid()) if os.environ.get("INVOCATION_ID") else None


@keys.admin_only
@limits.long_lived
async def handle_daemon(request: web.Request) -> web.StreamResponse:
    return await stream(request, own_unit())


@keys.admin_only
@limits.long_lived
async def handle_model(request: web.Request) -> web.StreamResponse:
    slot = supervisor(request).resolve(request.match_info["model"])
    return await stream(request, slot.unit)


def add_routes(app: web.Application) -> None:
    streams = app[STREAMS] = Streams()
    app.on_shutdown.append(streams.close)
    app.router.add_get("/logs/stream", handle_daemon)
    # Model ids may hold slashes (user/repo:QUANT).
    app.router.add_get("/logs/stream/{model:.+}", handle_model)
