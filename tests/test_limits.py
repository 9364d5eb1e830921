"""Connections, requests and time, on a real aiohttp server behind limits.Guard."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from llamad.app import runner_kwargs
from llamad.config import Config
from llamad.http import limits, middleware
from llamad.http.body import read_json


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, limits.Limits, asyncio.Event]]:
    """llamad's own guard, limits and error middleware around two handlers: /slow waits
    until told, /echo reads a JSON body."""
    lim = limits.Limits(Config.default(receive_timeout=1.0, max_connections=20,
                                       max_requests=2))
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({})

    async def echo(request: web.Request) -> web.Response:
        _, fields = await read_json(request)
        return web.json_response(fields.values)

    app = web.Application(middlewares=[middleware.error_middleware, lim.middleware])
    app[limits.LIMITS] = lim
    app.router.add_get("/slow", slow)
    app.router.add_post("/echo", echo)
    app.router.add_get("/health", ok)
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


async def _until(ok: Any, timeout: float = 5) -> None:
    for _ in range(int(timeout / 0.02)):
        if ok():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def _answer(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    """Everything until the server closes the connection."""
    return await asyncio.wait_for(reader.read(), timeout)


async def test_trickled_headers_get_408_and_close(server: Any) -> None:
    port, lim, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
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
    await _until(lambda: lim.connections == 0)


async def test_silent_and_idle_connections_are_closed_without_a_word(server: Any) -> None:
    port, _, release = server
    release.set()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await _answer(reader) == b""  # connected, said nothing: closed after 1 s
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await _answer(reader)  # answered, then kept alive, then closed when idle
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1
    writer.close()


async def test_a_body_that_comes_too_slowly_gets_408(server: Any) -> None:
    port, _, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"model\": ")
    answer = await _answer(reader)
    assert answer.startswith(b"HTTP/1.1 408") and b"receive-timeout (1s)" in answer
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                 b'Content-Length: 14\r\nConnection: close\r\n\r\n{"model": "m"}')
    assert b'{"model": "m"}' in await _answer(reader)
    writer.close()


async def test_caps_on_connections_and_requests(server: Any) -> None:
    port, lim, release = server
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
    await _until(lambda: lim.connections == 20)
    reader, refused = await asyncio.open_connection("127.0.0.1", port)
    over = await _answer(reader)
    refused.close()
    assert over.startswith(b"HTTP/1.1 503") and b"Retry-After: 2\r\n" in over
    assert b"max-connections" in over
    for _, w in held:
        w.close()
    await _until(lambda: lim.connections == 0)

    async def get(path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        try:
            return await _answer(reader)
        finally:
            writer.close()
    busy = [asyncio.ensure_future(get("/slow")) for _ in range(2)]
    while lim.requests < 2:
        await asyncio.sleep(0.01)
    third = await get("/slow")
    assert third.startswith(b"HTTP/1.1 503") and b"max-requests" in third
    assert b"Retry-After: 2" in third
    assert (await get("/health")).startswith(b"HTTP/1.1 200")  # not counted
    release.set()
    assert all(r.startswith(b"HTTP/1.1 200") for r in await asyncio.gather(*busy))
