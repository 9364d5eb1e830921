"""Sending one request to a model's llama-server and streaming its answer back.

What a client gets when the backend fails depends on how far the answer got:
- nothing came back (connection refused or reset, the backend hung up before the status
  line, or it answered 503 while loading again): `BackendUnreachable`, and the caller may
  send the request once more when the backend is back; the backend's pooled connections
  are dropped, as they may lead to a dead process;
- the backend went silent: after `idle_timeout` seconds without a byte it is probed
  (`Backend.probe`); one that is alive is busy (a long prompt) and is waited for, one that
  is not is wedged: 504 before the answer started, an SSE error event after, and
  `on_wedged` is told (`Supervisor.wedged`, which has it killed and restarted);
- the answer broke after it started: an SSE error event in a stream, 502 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from aiohttp import web

from llamad.errors import BackendError, BackendTimeout, BackendUnreachable, LlamadError
from llamad.http import limits, record
from llamad.supervisor.backend import PROBE_TIMEOUT, Backend, read_capped

if TYPE_CHECKING:
    from llamad.supervisor.slot import Slot
    from llamad.supervisor.supervisor import Supervisor

T = TypeVar("T")

HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "authorization", "x-api-key",
    # llamad's own say on how browsers treat its answers (browsers.py), never a backend's.
    "content-security-policy", "x-content-type-options", "x-frame-options",
    # A browser sends a host's cookies to every port of it (another local web app's login
    # token), and keeps one set by any port for all: none passes between a browser and a
    # model's unit, which llama-server never reads or sets anyway.
    "cookie", "set-cookie", "set-cookie2",
))
FAILURES = (TimeoutError, aiohttp.ClientError, OSError)
SMALL = 1 << 20  # bytes of a plain answer that ends a stream which has begun


@dataclass(frozen=True)
class Watch:
    """How one request watches its backend for silence."""

    idle_timeout: float  # seconds without a byte before the backend is probed; 0: forever
    health_timeout: float  # how long /health may take before the backend counts as wedged
    on_wedged: Callable[[str], None]  # told why, once the client has its error
    pid: Callable[[], int] = lambda: 0  # the backend's process, if known


def watch(sup: Supervisor, slot: Slot, backend: Backend) -> Watch:
    """The configured watch (`liveness-timeout`, as the per-tick probe uses); a wedged
    backend is reported to `Supervisor.wedged`."""
    idle = sup.config.liveness_timeout
    return Watch(idle, min(PROBE_TIMEOUT, idle or PROBE_TIMEOUT),
                 functools.partial(sup.wedged, slot, backend), lambda: slot.main_pid)


class _Wedged(Exception):
    """The backend sent nothing for idle_timeout and the probe found it dead too."""


def _forward_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


async def forward(request: web.Request, backend: Backend, body: bytes | bytearray,
                  watch: Watch, out: web.StreamResponse | None = None) -> web.StreamResponse:
    """`out`: the response the answer goes into; it may have begun already (load
    progress, see progress.py). Every answer passes through piece by piece, never held
    whole: an embeddings or /tokenize answer may be larger than llamad's MemoryMax."""
    async with backend.client() as session:
        up = await _open(request, backend, session, body, watch)
        try:
            resp = out or web.StreamResponse()
            if _streamed(up):
                return await _stream(request, backend, up, watch, resp)
            if resp.prepared:
                data = await _small(backend, up, watch)
                record.of(request).settle(up.status)  # the 200 that went out was llamad's
                return await _last_event(request, resp, data)
            return await _plain(request, backend, up, watch, resp)
        finally:
            up.release()  # back to the pool only if the answer was read to its end


def _streamed(up: aiohttp.ClientResponse) -> bool:
    return up.headers.get("Content-Type", "").startswith("text/event-stream")


async def _next(backend: Backend, up: aiohttp.ClientResponse, watch: Watch) -> bytes:
    """The answer's next piece (b"" at its end); a failure is the backend's error."""
    try:
        return await _piece(backend, up.content, watch)
    except _Wedged as e:
        raise _timeout(watch, str(e)) from e
    except FAILURES as e:
        raise BackendError(f"the model's backend failed while answering ({_why(e)})") from e


async def _plain(request: web.Request, backend: Backend, up: aiohttp.ClientResponse,
                 watch: Watch, resp: web.StreamResponse) -> web.StreamResponse:
    """A plain answer, passed on as it comes. Its status line goes out with its first
    piece, so a backend that fails before that still gets the client an error status; one
    that fails after it cuts the connection (the client sees the answer is short)."""
    chunk = await _next(backend, up, watch)
    resp.set_status(up.status)
    resp.headers.update(_forward_headers(up.headers))
    if up.content_length is not None:
        resp.content_length = up.content_length
    # The headers go out with the first piece, in one write (aiohttp >= 3.10 sends them
    # at once otherwise: a second send() per answer, a tenth of a small request's time).
    resp._send_headers_immediately = False
    await resp.prepare(request)
    while chunk:
        await resp.write(chunk)
        try:
            chunk = await _next(backend, up, watch)
        except LlamadError as e:
            record.of(request).settle(e.status, e.code)
            if request.transport is not None:
                request.transport.abort()  # never end a cut answer as if it were whole
            return resp
    await resp.write_eof()
    return resp


async def _small(backend: Backend, up: aiohttp.ClientResponse, watch: Watch) -> bytes:
    """A plain answer to a stream that has begun (an error), at most SMALL bytes."""
    data = bytearray()
    while chunk := await _next(backend, up, watch):
        data += chunk
        if len(data) > SMALL:
            raise BackendError(f"the model's backend answered the stream with more than "
                               f"{SMALL} bytes of something else")
    return bytes(data)


async def _open(request: web.Request, backend: Backend, session: aiohttp.ClientSession,
                body: bytes | bytearray, watch: Watch,
                to: tuple[str, dict[str, str]] | None = None) -> aiohttp.ClientResponse:
    """Send the request (or, with `to`, `body` as a POST to that path with those headers);
    the response once its status line and headers are in."""
    method, path, headers = (request.method, request.path_qs,
                             _forward_headers(request.headers)) if to is None else ("POST", *to)

    async def send() -> aiohttp.ClientResponse:
        return await session.request(method, backend.base_url + path, data=body or None,
                                     headers=headers)
    try:
        up = await _patiently(backend, send(), watch)
    except _Wedged as e:
        raise _timeout(watch, str(e)) from e
    except aiohttp.ClientConnectorError as e:
        if (not_gone := limits.not_gone(e.os_error)) is not None:
            raise not_gone from e  # llamad's own trouble: the model stays as it is
        await backend.renew()
        raise BackendUnreachable(f"the model's backend refused the connection ({_why(e)}); "
                                 "systemd restarts it, retry shortly") from e
    except FAILURES as e:
        await backend.renew()
        raise BackendUnreachable(f"the model's backend failed before answering ({_why(e)}); "
                                 "systemd restarts it, retry shortly") from e
    if up.status == 503 and not await backend.healthy(watch.health_timeout):
        # llama-server refuses everything with 503 while it loads: the model never saw it.
        up.close()
        raise BackendUnreachable("the model's backend is loading again; retry shortly")
    if _streamed(up) and (conn := up.connection) is not None and conn.protocol is not None:
        # llama-server hangs up once a stream ends, though it says keep-alive: a request
        # sent on the connection before that is seen failed as if the backend were gone.
        conn.protocol.force_close()
    return up


async def _piece(backend: Backend, content: aiohttp.StreamReader, watch: Watch) -> bytes:
    """The answer's next piece, watched as _patiently watches but without its task and
    wait, which were most of what llamad spent on a streamed token. What has arrived
    already is taken as is (most plain answers come whole with their headers); otherwise
    readany may be cancelled and asked again (what arrives stays buffered), so a plain
    timeout serves until the backend has been quiet for idle_timeout."""
    if (ready := content.read_nowait()) or content.at_eof():
        if ready:
            backend.heard()
        return ready
    started = time.monotonic()
    timeout = asyncio.timeout(watch.idle_timeout or None)
    try:
        async with timeout:
            data = await content.readany()
    except TimeoutError:
        if not timeout.expired():
            raise  # the connection's own
        return await _patiently(backend, content.readany(), watch, started)
    backend.heard()
    return data


async def _patiently(backend: Backend, step: Awaitable[T], watch: Watch,
                     started: float | None = None) -> T:
    """Await the backend's next bytes (waited for since `started`). A backend that sent
    nothing, on this request or any other, for idle_timeout is probed (Backend.probe); one
    busy with a long prompt is alive and is waited for again."""
    task = asyncio.ensure_future(step)
    started = time.monotonic() if started is None else started

    def quiet() -> float:
        return time.monotonic() - max(started, backend.last_heard)
    try:
        while True:
            left = watch.idle_timeout - quiet() if watch.idle_timeout else None
            done, _ = await asyncio.wait({task}, timeout=None if left is None else max(left, 0))
            if done:
                backend.heard()
                return task.result()
            # Not wedged when the probe cannot tell (None: llamad out of descriptors).
            if quiet() < watch.idle_timeout or await backend.probe(
                    watch.health_timeout, watch.pid()) is not False:
                continue
            if not task.done() and quiet() >= watch.idle_timeout:
                raise _Wedged(f"nothing for {watch.idle_timeout:g}s, /health did not answer "
                              f"within {watch.health_timeout:g}s and it used no CPU")
    finally:
        task.cancel()  # a no-op once done; otherwise the client left or the backend is wedged


def _timeout(watch: Watch, why: str) -> LlamadError:
    watch.on_wedged(why)
    return BackendTimeout(f"the model's backend stopped answering ({why}); "
                          "it is being restarted, retry shortly")


async def _stream(request: web.Request, backend: Backend, up: aiohttp.ClientResponse,
                  watch: Watch, resp: web.StreamResponse) -> web.StreamResponse:
    if not resp.prepared:
        resp.set_status(up.status)
        resp.headers.update(_forward_headers(up.headers))
        resp.headers["X-Accel-Buffering"] = "no"
        resp.headers["Cache-Control"] = "no-cache"
        await resp.prepare(request)
    while True:
        try:
            chunk = await _piece(backend, up.content, watch)
        except _Wedged as e:
            await _broken(request, resp, BackendTimeout(
                f"the model's backend stopped answering mid-stream ({e}); it is being "
                "restarted"))
            await resp.write_eof()
            watch.on_wedged(str(e))
            return resp
        except FAILURES as e:
            # Headers are gone already: tell the client in the stream, never truncate silently.
            await _broken(request, resp, BackendError(f"the model's backend failed mid-stream "
                                                      f"({_why(e)})"))
            break
        if not chunk:
            break
        await resp.write(chunk)
    # Clients such as openai's close as soon as they read `data: [DONE]`: the answer was
    # delivered, and aiohttp 3.8 would raise here.
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


async def _last_event(request: web.Request, resp: web.StreamResponse,
                      data: bytes) -> web.StreamResponse:
    """A plain answer (an error) to a stream that has begun: its last event."""
    try:
        body = json.loads(data)  # written again on one line, whatever the backend's layout
    except ValueError:
        body = BackendError("the model's backend answered the stream with something other "
                            "than JSON").body()
    await resp.write(error_event(request, body))
    await resp.write_eof()
    return resp


# Anthropic's streams name their events, and its SDK reads only named ones: an error
# event without `event: error` (llama-server writes one there) would be a silent cut.
NAMED_EVENTS = frozenset(("/v1/messages",))


def error_event(request: web.Request, body: Any) -> bytes:
    """An error as a stream's last event, as the request's route writes events."""
    if request.path not in NAMED_EVENTS:
        return b"data: " + json.dumps(body).encode() + b"\n\n"
    if isinstance(body, dict):
        body = {"type": "error", **body}  # Anthropic's error event: {"type": "error", ...}
    return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"


async def _broken(request: web.Request, resp: web.StreamResponse, err: LlamadError) -> None:
    """A stream the backend broke: its last event says why, and the request log and the
    metrics count it as failed, as a plain answer cut halfway (its 200 went out already)."""
    record.of(request).settle(err.status, err.code)
    await resp.write(error_event(request, err.body()))


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__


JSON_HEADERS = {"Content-Type": "application/json"}
TRANSLATED = 64 << 20  # bytes of an answer llamad reads whole to translate it


@dataclass
class Upstream:
    """The backend's answer to a request llamad wrote itself (a translation, such as
    Ollama's routes): read whole or chunk by chunk, under the same watch and with the same
    failures as forward()."""

    response: aiohttp.ClientResponse
    backend: Backend
    watch: Watch

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def streamed(self) -> bool:
        return _streamed(self.response)

    async def read(self) -> bytes:
        """The whole answer, to be translated: at most TRANSLATED bytes of it (llamad holds
        it, and its translation, at once)."""
        try:
            return bytes(await _patiently(self.backend, read_capped(self.response, TRANSLATED),
                                          self.watch))
        except _Wedged as e:
            raise _timeout(self.watch, str(e)) from e
        except ValueError as e:
            raise BackendError(f"the model's backend answered more than llamad translates "
                               f"({TRANSLATED >> 20} MiB)") from e
        except FAILURES as e:
            raise BackendError(f"the model's backend failed while answering ({_why(e)})") from e

    async def chunks(self) -> AsyncIterator[bytes]:
        """The answer as it comes; a failure midway raises BackendError (the caller tells
        its client in its own stream)."""
        while True:
            try:
                chunk = await _piece(self.backend, self.response.content, self.watch)
            except _Wedged as e:
                raise _timeout(self.watch, f"mid-stream: {e}") from e
            except FAILURES as e:
                raise BackendError(f"the model's backend failed mid-stream ({_why(e)})") from e
            if not chunk:
                return
            yield chunk


@contextlib.asynccontextmanager
async def exchange(request: web.Request, backend: Backend, path: str, body: bytes,
                   watch: Watch) -> AsyncIterator[Upstream]:
    """POST the JSON `body` to `path` on the backend and hold its answer open. Nothing back
    raises BackendUnreachable, as in forward(), so the caller may send it once more."""
    async with backend.client() as session:
        up = await _open(request, backend, session, body, watch, (path, JSON_HEADERS))
        try:
            yield Upstream(up, backend, watch)
        finally:
            up.release()
