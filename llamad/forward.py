"""Sending one request to a model's llama-server and streaming its answer back."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from aiohttp import web

from llamad import limits
from llamad.backend import Backend
from llamad.errors import BackendError, BackendUnreachable

HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "authorization", "x-api-key",
))


def _forward_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


async def forward(request: web.Request, backend: Backend, body: bytes | bytearray,
                  out: web.StreamResponse | None = None) -> web.StreamResponse:
    """`out`: the response a streamed answer goes into; it may have begun already (load
    progress, see progress.py)."""
    url = backend.base_url + request.path_qs
    try:
        async with backend.session().request(
                request.method, url, data=body or None,
                headers=_forward_headers(request.headers)) as up:
            if up.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await _stream(request, up, out or web.StreamResponse())
            data = await up.read()
            if out is not None and out.prepared:
                return await _last_event(out, data)
            return web.Response(status=up.status, body=data, headers=_forward_headers(up.headers))
    except aiohttp.ClientConnectorError as e:
        if (not_gone := limits.not_gone(e.os_error)) is not None:
            raise not_gone from e  # llamad's own trouble: the model stays as it is
        raise BackendUnreachable(f"the model's backend refused the connection ({_why(e)}); "
                                 "systemd restarts it, retry shortly") from e
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        raise BackendError(f"the model's backend failed before answering ({_why(e)}); "
                           "systemd restarts it, retry shortly") from e


async def _stream(request: web.Request, up: aiohttp.ClientResponse,
                  resp: web.StreamResponse) -> web.StreamResponse:
    if not resp.prepared:
        resp.set_status(up.status)
        resp.headers.update(_forward_headers(up.headers))
        resp.headers["X-Accel-Buffering"] = "no"
        resp.headers["Cache-Control"] = "no-cache"
        await resp.prepare(request)
    try:
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
    except (TimeoutError, aiohttp.ClientError) as e:
        # Headers are gone already: tell the client in the stream, never truncate silently.
        err = BackendError(f"the model's backend failed mid-stream ({_why(e)})")
        await resp.write(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
    await resp.write_eof()
    return resp


async def _last_event(resp: web.StreamResponse, data: bytes) -> web.StreamResponse:
    """A plain answer (an error) to a stream that has begun: its last event."""
    try:
        event = json.dumps(json.loads(data))  # one line, whatever the backend's layout
    except ValueError:
        event = json.dumps(BackendError("the model's backend answered the stream with "
                                        "something other than JSON").body())
    await resp.write(b"data: " + event.encode() + b"\n\n")
    await resp.write_eof()
    return resp


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__
