"""Bounds on what clients can make llamad hold: connections, requests, request bytes, time.

- Time: a connection has `receive-timeout` seconds from the first byte of a request (or
  from accept, or from its last answer) until the request's headers and body are in; then
  it gets 408 and is closed (one that sent nothing of a new request is just closed). A
  client that trickles its header lines (slowloris) would otherwise hold a connection, and
  a file descriptor, for ever: enough of them and llamad cannot reach its own backends.
- Connections: at most `max-connections` are open; the next gets 503 with Retry-After.
- Requests: at most `max-requests` are handled at once (503 with Retry-After beyond);
  /health is not counted, so a liveness check still answers, and says 503 while they are
  all taken (a load balancer moves on). Only authenticated requests are counted: `admit`
  runs after the API key check.
- Streams: long-lived answers (routes declared @long_lived: event feeds, log streams)
  are not requests but streams, at most `max-streams` at once; with API keys, a key that
  is not an admin key holds at most a quarter of them.
- Sending: a client that leaves an answer unread for `send-timeout` seconds while llamad
  has bytes waiting for it is cut off, so neither a stream nor a request is held for ever
  by a client that stopped reading (Guard sees the transport's buffer fill and drain).
- Bytes: each body is at most `max-body-mb` (413), and all bodies held at once at most
  `max-bodies-mb`: a request that would pass it gets 503 before its body is read. A
  compressed body (Content-Encoding) gets 415 unread, as from llama-server, and its
  connection is closed: aiohttp inflates a body as it reads it, and reads what is left of
  one after the answer, so 4 MiB of gzip from a client without a key cost 4 GiB inflated
  and seconds of the event loop.

aiohttp has no header timeout (not in 3.8, Debian 12's, nor later): `Guard` wraps its
protocol object per connection and only sees bytes and the middleware, so it works with
either. llamad lifts its soft limit on open files to the hard one (LimitNOFILE=).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from llamad.config import Config
from llamad.errors import SHORTAGE, BackendError, LlamadError, Unavailable
from llamad.http import keys
from llamad.http.context import app_key
from llamad.sizes import MIB

log = logging.getLogger("llamad.limits")

RETRY_AFTER = 2
LINGER = 2.0  # seconds a timed-out connection is still read from after its 408

HELD: Any = web.RequestKey("llamad_body_bytes", int) if hasattr(web, "RequestKey") \
    else "llamad_body_bytes"
STREAM_ATTR = "llamad_long_lived"
HEALTH = ("/health", "/v1/health")
KEY_SHARE = 4  # a non-admin key may hold 1/KEY_SHARE of max-streams
H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])


def long_lived(handler: H) -> H:
    """Declare a route whose answer lasts (an event feed): counted against max-streams, not
    max-requests."""
    setattr(handler, STREAM_ATTR, True)
    return handler


class Limits:
    """The counters, shared by every connection and request of one llamad (app[LIMITS])."""

    def __init__(self, config: Config) -> None:
        self.timeout = config.receive_timeout
        self.max_connections = config.max_connections
        self.max_requests = config.max_requests
        self.max_body = config.max_body_mb * MIB
        self.max_bodies = config.max_bodies_mb * MIB
        self.max_streams = config.max_streams
        self.send_timeout = config.send_timeout
        self.connections = 0
        self.requests = 0
        self.streams = 0
        self.streams_of: dict[bytes, int] = {}  # a non-admin key's secret -> its streams
        self.body_bytes = 0
        self.guards: dict[Any, Guard] = {}  # transport -> its connection's guard
        # body.read_json: big bodies are checked here, one at a time.
        self.scanner = ThreadPoolExecutor(1, thread_name_prefix="llamad-body")

    def protocol(self, factory: Any) -> Any:
        """A protocol factory for loop.create_server that guards `factory`'s protocols."""
        return lambda: Guard(factory(), self)

    async def close(self, app: web.Application) -> None:
        self.scanner.shutdown(wait=False, cancel_futures=True)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The connection's side of a request: its receive deadline ends as the handler
        starts, and starts again for the next request once this one is answered."""
        guard = self.guards.get(request.transport)
        if guard is not None:
            guard.handling()
        try:
            if (coding := compressed(request)) is not None:
                if guard is not None:  # else aiohttp reads and inflates the rest itself
                    guard.discard()
                    request.content.feed_eof()
                raise not_decoded(coding)
            resp: web.StreamResponse = await handler(request)
            return resp
        finally:
            self.body_bytes -= request.get(HELD, 0)
            request[HELD] = 0
            if guard is not None:
                guard.answered()

    @web.middleware
    async def admit(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Count the request against max-requests, or max-streams for a long-lived one.
        After the API key check, so unauthenticated traffic never holds a place."""
        if getattr(request.match_info.handler, STREAM_ATTR, False):
            return await self._stream(request, handler)
        if request.path in HEALTH:
            resp: web.StreamResponse = await handler(request)
            return resp
        if self.requests >= self.max_requests:
            raise Unavailable(f"llamad is handling {self.requests} requests, its "
                              "max-requests; retry shortly", retry_after=RETRY_AFTER,
                              code="too_many_requests")
        self.requests += 1
        try:
            resp = await handler(request)
            return resp
        finally:
            self.requests -= 1

    async def _stream(self, request: web.Request, handler: Any) -> web.StreamResponse:
        key = keys.request_key(request)
        secret = key.secret if key is not None and not key.admin else None
        if self.streams >= self.max_streams:
            raise Unavailable(f"llamad has {self.streams} long-lived answers open, its "
                              "max-streams; retry later", retry_after=RETRY_AFTER,
                              code="too_many_streams")
        if secret is not None and self.streams_of.get(secret, 0) >= self.key_share:
            raise Unavailable(f"this API key holds {self.key_share} long-lived answers "
                              f"open, 1/{KEY_SHARE} of max-streams; retry later",
                              retry_after=RETRY_AFTER, code="too_many_streams")
        self.streams += 1
        if secret is not None:
            self.streams_of[secret] = self.streams_of.get(secret, 0) + 1
        try:
            resp: web.StreamResponse = await handler(request)
            return resp
        finally:
            self.streams -= 1
            if secret is not None:
                left = self.streams_of.pop(secret) - 1
                if left:
                    self.streams_of[secret] = left

    @property
    def key_share(self) -> int:
        return max(1, self.max_streams // KEY_SHARE)

    def saturated(self) -> LlamadError | None:
        """Why llamad takes no more requests now (for /health), or None."""
        if self.requests < self.max_requests:
            return None
        return Unavailable(f"llamad is handling {self.requests} requests, its max-requests",
                           retry_after=RETRY_AFTER, code="saturated")

    def body_deadline(self, request: web.Request) -> float:
        """When, in loop time, the request's body must be in."""
        guard = self.guards.get(request.transport)
        if guard is not None:
            return guard.deadline
        return asyncio.get_running_loop().time() + self.timeout

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


class Guard(asyncio.Protocol):
    """aiohttp's protocol for one connection, with a deadline for receiving each request.

    `phase`: idle (nothing of the next request yet), receiving (some of it), handling
    (aiohttp has its headers: the handler runs, and reads the body by `deadline`), closing
    (timed out and answered 408)."""

    def __init__(self, inner: asyncio.Protocol, limits: Limits) -> None:
        self.inner = inner
        self.limits = limits
        self.transport: asyncio.Transport | None = None
        self.phase = "idle"
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.refused = False
        self.send_timer: asyncio.TimerHandle | None = None
        self.unsent = 0  # bytes the transport held when its buffer was last looked at
        self.discarding = False  # the request's body is refused: no more of it is read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        limits = self.limits
        if limits.connections >= limits.max_connections:
            self.refused = True
            transport.write(canned(503, "Service Unavailable", Unavailable(
                f"llamad has {limits.connections} connections open, its max-connections; "
                "retry shortly", retry_after=RETRY_AFTER, code="too_many_connections")))
            transport.close()
            return
        limits.connections += 1
        limits.guards[transport] = self
        self.inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.refused or self.phase == "closing" or self.discarding:
            return  # read and dropped, so the answer already sent is not lost to a reset
        if self.phase == "idle":
            self.phase = "receiving"
            self._arm()  # a request's time starts with its first byte
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.refused or self.phase == "closing":
            return None  # the transport closes
        result: bool | None = self.inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_send_timer()
        if self.refused:
            return
        self.limits.connections -= 1
        self.limits.guards.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        """The transport's buffer is full: the client is not taking what llamad sends."""
        self.inner.pause_writing()
        if self.transport is not None and self.send_timer is None:
            self.unsent = self.transport.get_write_buffer_size()
            self.send_timer = asyncio.get_running_loop().call_later(
                self.limits.send_timeout, self._send_check)

    def resume_writing(self) -> None:
        self._stop_send_timer()
        self.inner.resume_writing()

    def _stop_send_timer(self) -> None:
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def _send_check(self) -> None:
        """send-timeout after the buffer filled: cut the client off unless it took some."""
        self.send_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        unsent = transport.get_write_buffer_size()
        if unsent < self.unsent:  # slow, but reading
            self.unsent = unsent
            self.send_timer = asyncio.get_running_loop().call_later(
                self.limits.send_timeout, self._send_check)
            return
        log.info("a client left %d bytes of its answer unread for %gs (send-timeout); "
                 "closing its connection", unsent, self.limits.send_timeout)
        transport.abort()  # the handler is cancelled, and with it the model's work

    def handling(self) -> None:
        self.phase = "handling"
        self._disarm()

    def discard(self) -> None:
        """The request is refused with its body unread: aiohttp is given no more of it
        (it would read it, inflated, after the answer: the caller also ends the body
        where it is), and the connection ends LINGER seconds after the answer."""
        self.discarding = True

    def answered(self) -> None:
        transport = self.transport
        if self.discarding:
            # Not closed at once: unread bytes would reset the connection, losing the answer.
            self.phase = "closing"
            self._disarm()
            if transport is not None:
                self.timer = asyncio.get_running_loop().call_later(LINGER, transport.close)
            return
        self.phase = "idle"
        if transport is not None and not transport.is_closing():
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.limits.timeout
        self.timer = loop.call_at(self.deadline, self._expired)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.phase != "receiving" or not transport.can_write_eof():
            transport.close()
            return
        # Answer, then stop writing but go on reading (and dropping) for a moment: closing
        # with the client's bytes unread would reset the connection and lose the answer.
        transport.write(canned(408, "Request Timeout", too_slow(self.limits.timeout)))
        transport.write_eof()
        self.phase = "closing"
        self.timer = asyncio.get_running_loop().call_later(LINGER, transport.close)


def canned(status: int, reason: str, err: LlamadError) -> bytes:
    """A whole HTTP/1.1 answer for where aiohttp has no request to answer yet."""
    body = json.dumps(err.body()).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close",
            *(f"{k}: {v}" for k, v in err.headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def too_slow(timeout: float) -> LlamadError:
    err = LlamadError(f"the request did not arrive within receive-timeout ({timeout:g}s)",
                      status=408, code="request_timeout")
    err.type = "invalid_request_error"
    return err


IDENTITY = ("", "identity")
NOT_DECODED = "unsupported_content_encoding"


def compressed(request: web.Request) -> str | None:
    """The request's Content-Encoding, unless it is none (or identity)."""
    if "Content-Encoding" not in request.headers:
        return None
    codings = [c.strip().lower() for header in request.headers.getall("Content-Encoding", [])
               for c in header.split(",")]
    return ", ".join(c for c in codings if c not in IDENTITY) or None


def not_decoded(coding: str) -> LlamadError:
    err = LlamadError(f"llamad reads request bodies as they are, not compressed "
                      f"(Content-Encoding: {coding}); send it uncompressed, as llama-server "
                      "and Ollama take it", status=415, code=NOT_DECODED,
                      # Guard.discard ends the connection; a client must not send more on it.
                      headers={"Connection": "close"})
    err.type = "invalid_request_error"
    return err


def too_large() -> LlamadError:
    err = LlamadError("the request body is larger than max-body-mb allows", status=413,
                      code="request_too_large")
    err.type = "invalid_request_error"
    return err


GONE = (errno.ECONNREFUSED, errno.ENOENT)  # nothing listens: the backend went away


def not_gone(err: OSError) -> LlamadError | None:
    """Why connecting to a backend failed when it is not because the backend is gone (only
    "connection refused" and "no such socket" mean that), or None. Running out of file
    descriptors or memory is llamad's own trouble: 503, and the model's state stays."""
    if err.errno in GONE:
        return None
    if err.errno in SHORTAGE:
        return Unavailable(f"llamad cannot open a connection to the model now ({err.strerror});"
                           " retry shortly", retry_after=RETRY_AFTER, code="llamad_overloaded")
    return BackendError(f"cannot connect to the model's backend ({err.strerror or err})")


def raise_fd_limit(limits: Limits) -> None:
    """Lift the soft limit on open files to the hard one (systemd's default soft limit is
    1024), and warn when the caps could still run into it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = limits.max_connections + limits.max_requests + 256
    if hard != resource.RLIM_INFINITY and need > hard:
        log.warning("max-connections + max-requests need about %d open files, more than "
                    "the %d allowed (LimitNOFILE=); clients may see errors before the caps "
                    "apply", need, hard)


LIMITS: Any = app_key("limits", Limits)


def of(request: web.Request) -> Limits:
    limits: Limits = request.app[LIMITS]
    return limits
