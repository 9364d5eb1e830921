"""A request for a model only a peer serves (`peers`), forwarded to that peer, as
llama-swap's peers are: GET /v1/models lists the peers' models, so a client (Open WebUI)
picks one and sends its request here.

- Which peer: the one that listed the name in the last listing of the peers
  (fleet.PeerMap); a name not in it is looked for in a new listing, within `peer-timeout`.
- Who may: the client's key is checked here, as for the listing: a scoped key's other
  models, the peers' ones too, are 404 as unknown ones. The peer is asked with llamad's own
  key (`peer-key-file`), never the client's key or cookies.
- No loops: the request carries HOP; a request that has it is never forwarded again (A
  peers B peers A), so a name no one serves ends as a 404 on the first peer.
- The answer passes through as it comes (SSE chunk by chunk), the peer's status and body
  too; only the hop-by-hop headers are dropped. A peer that cannot be reached, or goes
  silent for `liveness-timeout` and does not answer /health within `peer-timeout`, is a
  502 naming it (or an error event, once a stream has begun).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable
from typing import TypeVar

import aiohttp
from aiohttp import web

from llamad.api import fleet
from llamad.api.forward import FAILURES, HOP_BY_HOP, error_event
from llamad.config import Config
from llamad.errors import LlamadError, NotFound
from llamad.http import keys, record
from llamad.http.context import app_key, supervisor

log = logging.getLogger("llamad.peerforward")

T = TypeVar("T")
HOP = "X-Llamad-Forwarded-By"


class PeerError(LlamadError):
    status = 502
    code = "peer_unreachable"


class _Silent(Exception):
    """The peer sent nothing for liveness-timeout and did not answer /health either."""


class PeerClient:
    """The HTTP session requests to peers share (opened on first use)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self, connect_timeout: float) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No overall timeout: a peer's answer may stream for minutes (_watched
            # watches silence), and a peer's own answer is never decompressed here.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout))
        return self._session

    async def close(self, app: web.Application | None = None) -> None:
        if self._session is not None:
            await self._session.close()


PEER_CLIENT = app_key("peer_client", PeerClient)


def install(app: web.Application) -> None:
    """Forward requests for the peers' models in `app` (app.py)."""
    app[fleet.PEER_MAP] = fleet.PeerMap()
    app[PEER_CLIENT] = client = PeerClient()
    app.on_cleanup.append(client.close)


def peer_key(request: web.Request) -> str | None:
    return request.app[keys.KEYRING].peer_key if keys.KEYRING in request.app else None


async def elsewhere(request: web.Request, err: NotFound, body: bytes | bytearray,
                    name: object) -> web.StreamResponse:
    """The answer of the peer that serves `name`, or `err` (this host's 404) raised where
    no peer does, the request's key may not use it, or the request was forwarded already."""
    config = supervisor(request).config
    if not config.peers or not isinstance(name, str) or HOP in request.headers \
            or fleet.PEER_MAP not in request.app or err.code != NotFound.code:
        raise err
    found = await request.app[fleet.PEER_MAP].find(name, config.peers, config.peer_timeout,
                                                   peer_key(request))
    if found is None or not keys.may_use(request, found.model, found.aliases):
        raise err
    record.of(request).model = found.model
    log.info("%s %s: model %s is served by peer %s; forwarded there",
             request.method, request.path, found.model, found.url)
    return await _relay(request, found.url, body, config)


def _headers(request: web.Request) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    headers[HOP] = socket.gethostname()
    if key := peer_key(request):
        headers["Authorization"] = f"Bearer {key}"
    return headers


async def _relay(request: web.Request, url: str, body: bytes | bytearray,
                 config: Config) -> web.StreamResponse:
    session = request.app[PEER_CLIENT].session(config.peer_timeout)
    tls = fleet.verified() if url.startswith("https:") else True
    try:
        up = await _watched(session.request(
            request.method, url + request.path_qs, data=bytes(body) or None,
            headers=_headers(request), allow_redirects=False, ssl=tls), session, url, config)
    except (_Silent, *FAILURES) as e:
        raise PeerError(f"peer {url}, which serves this model, did not answer "
                        f"({_why(e)}); retry shortly") from e
    try:
        return await _pass_on(request, up, session, url, config)
    except BaseException:
        up.close()  # the client left, or the peer failed: never reuse the connection
        raise
    finally:
        up.release()


async def _pass_on(request: web.Request, up: aiohttp.ClientResponse,
                   session: aiohttp.ClientSession, url: str,
                   config: Config) -> web.StreamResponse:
    streamed = up.headers.get("Content-Type", "").startswith("text/event-stream")
    resp = record.TapResponse(record.of(request))
    resp.set_status(up.status)
    resp.headers.update({k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP})
    if streamed:
        resp.headers["X-Accel-Buffering"] = "no"
        resp.headers["Cache-Control"] = "no-cache"
    elif up.content_length is not None:
        resp.content_length = up.content_length
    await resp.prepare(request)
    while True:
        try:
            chunk = await _watched(up.content.readany(), session, url, config)
        except (_Silent, *FAILURES) as e:
            err = PeerError(f"peer {url} failed while answering ({_why(e)})")
            record.of(request).settle(err.status, err.code)
            if not streamed:
                if request.transport is not None:
                    request.transport.abort()  # never end a cut answer as if it were whole
                return resp
            await resp.write_own(error_event(request, err.body()))
            break
        if not chunk:
            break
        await resp.write(chunk)
    with contextlib.suppress(ConnectionResetError):  # a client gone after the last event
        await resp.write_eof()
    return resp


async def _watched(step: Awaitable[T], session: aiohttp.ClientSession, url: str,
                   config: Config) -> T:
    """Await the peer's next bytes; while it is silent for liveness-timeout, it must
    answer /health (any status) within peer-timeout to be waited for again."""
    task = asyncio.ensure_future(step)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=config.liveness_timeout or None)
            if done:
                return task.result()
            if not await _alive(session, url, config.peer_timeout):
                raise _Silent(f"nothing for {config.liveness_timeout:g}s and /health did "
                              f"not answer within {config.peer_timeout:g}s")
    finally:
        task.cancel()  # a no-op once done; otherwise the client left or the peer is silent


async def _alive(session: aiohttp.ClientSession, url: str, timeout: float) -> bool:
    try:
        async with session.get(f"{url}/health", allow_redirects=False,
                               timeout=aiohttp.ClientTimeout(total=timeout),
                               ssl=fleet.verified() if url.startswith("https:") else True):
            return True
    except (*FAILURES, ValueError):
        return False


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__
