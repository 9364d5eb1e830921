"""Connections, requests and time, on a real aiohttp server behind limits.Guard."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import guarded
from helpers.watch import eventually

from llamad.api import fleet
from llamad.app import runner_kwargs
from llamad.config import Config
from llamad.http import limits
from llamad.http.body import read_json

KEYS = "boss admin\nnarrow models=m\nother models=m\n"
FLOODS_ENDED: list[str] = []


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[int, limits.Limits, asyncio.Event]]:
    """llamad's own guard, limits, keys and error middleware in llamad's order around a few
    handlers: /slow waits until told, /echo reads a JSON body, /feed is a long-lived
    stream until told, /flood writes without end, /health is llamad's."""
    lim = limits.Limits(Config.default(receive_timeout=1.0, max_connections=20,
                                       max_requests=2, max_streams=8, send_timeout=1.0))
    release = asyncio.Event()
    (tmp_path / "keys").write_text(KEYS)

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    async def echo(request: web.Request) -> web.Response:
        _, fields = await read_json(request)
        return web.json_response(fields.values)

    @limits.long_lived
    async def feed(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await release.wait()
        return resp

    async def flood(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b"x" * 65536)
        finally:
            FLOODS_ENDED.append(request.path)  # cancelled when the client is cut off

    async def health(request: web.Request) -> web.Response:
        fleet.check_health(request.app)
        return web.json_response({})

    app = guarded.keyed(lim, tmp_path / "keys")
    app.router.add_get("/slow", slow)
    app.router.add_post("/echo", echo)
    app.router.add_get("/feed", feed)
    app.router.add_get("/flood", flood)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, **runner_kwargs())  # as llamad's own (handler cancellation)
    await runner.setup()
    assert runner.server is not None
    srv = await asyncio.get_running_loop().create_server(lim.protocol(runner.server),
                                                         "127.0.0.1", 0)
    yield srv.sockets[0].getsockname()[1], lim, release
    release.set()
    srv.close()
    await runner.cleanup()
    await lim.close(app)


async def _answer(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    """Everything until the server closes the connection."""
    return await asyncio.wait_for(reader.read(), timeout)


async def test_trickled_headers_get_408_and_close(server: Any) -> None:
    port, lim, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer boss\r\n")
    await writer.drain()
    for _ in range(4):  # a header line every 0.4 s: each one is fine, the whole is not
        await asyncio.sleep(0.4)
        with contextlib.suppress(ConnectionError):  # closed by now: that is the point
            writer.write(b"X-Slow: 1\r\n")
            await writer.drain()
    answer = await _answer(reader)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b'"code": "request_timeout"' in answer
    writer.close()
    await eventually("the connections to close", lambda: lim.connections == 0)


async def test_silent_and_idle_connections_are_closed_without_a_word(server: Any) -> None:
    port, _, release = server
    release.set()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await _answer(reader) == b""  # connected, said nothing: closed after 1 s
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer boss\r\n\r\n")
    answer = await _answer(reader)  # answered, then kept alive, then closed when idle
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1
    writer.close()


async def test_a_body_that_comes_too_slowly_gets_408(server: Any) -> None:
    port, _, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer boss\r\nContent-Length: 100\r\n\r\n{\"model\": ")
    answer = await _answer(reader)
    assert answer.startswith(b"HTTP/1.1 408") and b"receive-timeout (1s)" in answer
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                 b'Authorization: Bearer boss\r\n'
                 b'Content-Length: 14\r\nConnection: close\r\n\r\n{"model": "m"}')
    assert b'{"model": "m"}' in await _answer(reader)
    writer.close()


async def test_caps_on_connections_and_requests(server: Any) -> None:
    port, lim, release = server
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
    await eventually("twenty connections", lambda: lim.connections == 20)
    reader, refused = await asyncio.open_connection("127.0.0.1", port)
    over = await _answer(reader)
    refused.close()
    assert over.startswith(b"HTTP/1.1 503") and b"Retry-After: 2\r\n" in over
    assert b"max-connections" in over
    for _, w in held:
        w.close()
    await eventually("the connections to close", lambda: lim.connections == 0)

    busy = [asyncio.ensure_future(get(port, "/slow")) for _ in range(2)]
    await eventually("two requests in flight", lambda: lim.requests == 2)
    third = await get(port, "/slow")
    assert third.startswith(b"HTTP/1.1 503") and b"max-requests" in third
    assert b"Retry-After: 2" in third
    # /health is not counted, and says llamad is saturated: a balancer sends elsewhere.
    health = await get(port, "/health")
    assert health.startswith(b"HTTP/1.1 503") and b'"code": "saturated"' in health
    # Unauthenticated traffic is refused before any limit: 401, not 503.
    assert (await get(port, "/slow", key=None)).startswith(b"HTTP/1.1 401")
    release.set()
    assert all(r.startswith(b"HTTP/1.1 200") for r in await asyncio.gather(*busy))
    assert (await get(port, "/health")).startswith(b"HTTP/1.1 200")


async def get(port: int, path: str, key: str | None = "boss") -> bytes:
    """One request on its own connection; everything until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
                 .encode())
    try:
        return await _answer(reader)
    finally:
        writer.close()


async def open_stream(port: int, key: str) -> tuple[bytes, asyncio.StreamWriter]:
    """A GET /feed: its status line and the connection, held open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /feed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n"
                 .encode())
    return await asyncio.wait_for(reader.readline(), 10), writer


async def test_long_lived_answers_have_their_own_cap(server: Any) -> None:
    """security-review-3 M6: streams held every max-requests place, so a few event feeds
    of any key starved every other request. Now they are counted against max-streams,
    and a non-admin key may hold a quarter of those (2 of 8 here)."""
    port, lim, release = server
    narrow = [await open_stream(port, "narrow") for _ in range(3)]
    assert [line.split()[1] for line, _ in narrow] == [b"200", b"200", b"503"]
    assert lim.streams == 2 and lim.requests == 0
    others = [await open_stream(port, k) for k in ("other", "other", "boss", "boss", "boss")]
    assert [line.split()[1] for line, _ in others] == [b"200"] * 5
    over, last = await open_stream(port, "boss")
    assert over.split()[1] == b"200" and lim.streams == 8
    refused, extra = await open_stream(port, "boss")
    assert refused.split()[1] == b"503" and lim.streams == 8
    writers = [w for _, w in narrow + others] + [last, extra]
    # Requests are not held up by any of it, nor is /health.
    assert (await get(port, "/health")).startswith(b"HTTP/1.1 200")
    slow = asyncio.ensure_future(get(port, "/slow"))
    release.set()
    assert (await slow).startswith(b"HTTP/1.1 200")
    await eventually("the streams to end", lambda: lim.streams == 0 and not lim.streams_of)
    for writer in writers:
        writer.close()
        await writer.wait_closed()


async def test_a_client_that_stops_reading_is_cut_off(server: Any) -> None:
    """A client that takes nothing more of its answer for send-timeout (1 s here) is cut
    off, and its handler (the model's work) ends: it held its request place for ever."""
    port, lim, _ = server
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /flood HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer boss\r\n\r\n")
    await eventually("the request in flight", lambda: lim.requests == 1)
    # It reads a little, then nothing more.
    await reader.read(1000)
    FLOODS_ENDED.clear()
    await eventually("no request in flight", lambda: lim.requests == 0, timeout=20)
    await eventually("the flood's handler to end", lambda: FLOODS_ENDED == ["/flood"])
    assert lim.connections == 0
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
