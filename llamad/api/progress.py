"""A request's wait for its model: noted in the request's record, and shown to a client
whose streamed request has to wait for a load.

Such a client gets a 200 with SSE comment lines (`: loading gemma-a 40% (1.2s of ~3.0s)`)
once a second until the model is ready; the answer then follows in the same stream. SSE
clients ignore comments. Percentages come from the model's expected load time, as
/models/sse shows it (feed.expected_load_seconds). Non-streaming
requests see nothing of this, and `load-progress = no` turns it off.

Once the comments have begun the status line is gone: a failure after that (the load
failed, the queue timed out) becomes the stream's last event, `data: {"error": ...}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType

from aiohttp import web

from llamad.api.feed import expected_load_seconds
from llamad.api.forward import error_event
from llamad.errors import LlamadError
from llamad.http import record
from llamad.safetext import one_line
from llamad.supervisor.events import State
from llamad.supervisor.slot import Slot
from llamad.supervisor.supervisor import Supervisor

INTERVAL = 1.0  # seconds between progress comments
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def describe(slot: Slot, expected: float, now: float) -> str:
    """The comment's text: what the model is doing and how far along its load is."""
    model = one_line(slot.model.id)
    if slot.state not in (State.STARTING, State.LOADING):
        return f"waiting for {model} ({slot.state.value})"
    elapsed = max(0.0, now - slot.load_started)
    percent = min(99, int(100 * elapsed / expected))
    return f"loading {model} {percent}% ({elapsed:.1f}s of ~{expected:.1f}s)"


class Wait:
    """`async with Wait(...)` around getting the model and forwarding to it."""

    def __init__(self, request: web.Request, sup: Supervisor, slot: Slot,
                 stream: bool, detached: bool = False) -> None:
        self.request = request
        self.detached = detached  # the request is sent even if its client left meanwhile
        self.slot = slot
        self.record = record.of(request)
        self.record.model = slot.model.id
        self.record.stream = stream
        self.response = record.TapResponse(self.record)
        self._show = stream and sup.config.load_progress and slot.state is not State.READY
        self._expected = expected_load_seconds(sup, slot) if self._show else 0.0
        self._stop = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Wait:
        if self._show:
            self._ticker = asyncio.ensure_future(self._tick())
        return self

    async def done(self) -> web.StreamResponse:
        """The backend is ours: no more comments; the answer goes into `self.response`.
        A detached request whose client left during the load (a comment failed) is sent
        all the same, into a response that fails once written: the model keeps the answer
        in the conversation's stream."""
        if self.record.acquired is None:
            self.record.acquired = time.monotonic()
        try:
            await self._halt()
        except ConnectionResetError:
            if not self.detached:
                raise
            return web.StreamResponse()
        return self.response

    async def _halt(self) -> None:
        """Let the ticker finish the line it writes, so none is cut in two."""
        self._stop.set()
        if self._ticker is not None:
            await self._ticker
            self._ticker = None

    async def _tick(self) -> None:
        if self._stop.is_set():
            return  # the wait ended before the first comment: the status line is not ours
        resp = self.response
        resp.headers.update(SSE_HEADERS)
        await resp.prepare(self.request)
        while not self._stop.is_set():
            await resp.comment(describe(self.slot, self._expected, time.monotonic()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), INTERVAL)

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        if not isinstance(exc, LlamadError):
            if self._ticker is not None:  # the client left, or a bug: stop at once
                self._ticker.cancel()
            return False
        await self._halt()
        if not self.response.prepared:
            return False  # an ordinary error response
        self.record.settle(exc.status, exc.code)
        await self.response.write_own(error_event(self.request, exc.body()))
        await self.response.write_eof()
        return True
