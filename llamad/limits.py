"""Bounds on what clients can make llamad hold: request bytes at once.

Each body is at most `max-body-mb` (413 beyond), and all bodies held at once (read, parsed
and sent on to a backend) at most `max-bodies-mb`: a request that would pass it gets 503
with Retry-After before its body is read.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from llamad.config import Config
from llamad.errors import LlamadError, Unavailable

MIB = 1024 * 1024
RETRY_AFTER = 2

HELD: Any = web.RequestKey("llamad_body_bytes", int) if hasattr(web, "RequestKey") \
    else "llamad_body_bytes"


class Limits:
    """The counters, shared by every request of one llamad (app[LIMITS])."""

    def __init__(self, config: Config) -> None:
        self.max_body = config.max_body_mb * MIB
        self.max_bodies = config.max_bodies_mb * MIB
        self.body_bytes = 0
        # body.read_json: big bodies are checked here, one at a time.
        self.scanner = ThreadPoolExecutor(1, thread_name_prefix="llamad-body")

    async def close(self, app: web.Application) -> None:
        self.scanner.shutdown(wait=False, cancel_futures=True)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            resp: web.StreamResponse = await handler(request)
            return resp
        finally:
            self.body_bytes -= request.get(HELD, 0)
            request[HELD] = 0

    def hold_body(self, request: web.Request, size: int) -> None:
        """Count `size` more bytes of this request's body as held until it is answered."""
        if size > self.max_body or request.get(HELD, 0) + size > self.max_body:
            raise too_large()
        if self.body_bytes + size > self.max_bodies:
            raise Unavailable(f"llamad holds {self.body_bytes // MIB} MiB of request bodies, "
                              "near its max-bodies-mb; retry shortly",
                              retry_after=RETRY_AFTER, code="too_much_body")
        self.body_bytes += size
        request[HELD] = request.get(HELD, 0) + size


def too_large() -> LlamadError:
    err = LlamadError("the request body is larger than max-body-mb allows", status=413,
                      code="request_too_large")
    err.type = "invalid_request_error"
    return err


LIMITS: Any = web.AppKey("limits", Limits) if hasattr(web, "AppKey") else "limits"


def of(request: web.Request) -> Limits:
    limits: Limits = request.app[LIMITS]
    return limits
