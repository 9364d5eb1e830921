"""Compressed request bodies (Content-Encoding), as a hostile client sends them.

llama-server answers 415 to any Content-Encoding (it is built without zlib), and Ollama
never decodes a request body. aiohttp decodes one on its own while reading it, and after
answering a request it reads (and so decodes) the rest of an unread body for up to 10 s:
a client without a key made llamad inflate 4 GiB from a 4 MiB upload, 9.5 s of CPU with
/health answering in 1-2 s meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import compression_utils, web
from helpers import guarded

from llamad.app import runner_kwargs
from llamad.config import Config
from llamad.http import limits
from llamad.http.body import read_json

INFLATED: list[int] = []  # bytes aiohttp decompressed, call by call


@pytest.fixture
def inflated(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """What aiohttp's own decompressor turns out, seen at its one boundary."""
    real = compression_utils.ZLibDecompressor.decompress_sync

    def counted(self: Any, data: Any, max_length: int = 0) -> bytes:
        out: bytes = real(self, data, max_length)
        INFLATED.append(len(out))
        return out
    monkeypatch.setattr(compression_utils.ZLibDecompressor, "decompress_sync", counted)
    INFLATED.clear()
    yield INFLATED


@pytest.fixture
async def port(tmp_path: Path) -> AsyncIterator[int]:
    """llamad's guard, error middleware, limits and keys in llamad's order, with /echo
    answering the JSON body's fields."""
    lim = limits.Limits(Config.default(receive_timeout=5.0))
    (tmp_path / "keys").write_text("k\n")

    async def echo(request: web.Request) -> web.Response:
        _, fields = await read_json(request)
        return web.json_response(fields.values)

    app = guarded.keyed(lim, tmp_path / "keys")
    app.router.add_post("/v1/completions", echo)
    app.router.add_post("/api/generate", echo)
    runner = web.AppRunner(app, **runner_kwargs())
    await runner.setup()
    assert runner.server is not None
    srv = await asyncio.get_running_loop().create_server(lim.protocol(runner.server),
                                                         "127.0.0.1", 0)
    yield srv.sockets[0].getsockname()[1]
    srv.close()
    await runner.cleanup()


def gzipped(data: bytes, zeros: int = 0) -> bytes:
    """`data` then about `zeros` zero bytes, gzipped. Past a few blocks, deflate writes
    the same bytes for each block of zeros, so a bomb is built by repeating them (its
    checksum is then wrong, which only a reader that gets to the end sees)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * BLOCK
    out = [c.compress(data)] + [c.compress(block) for _ in range(min(zeros // BLOCK, 3))]
    out += [out[-1]] * (zeros // BLOCK - len(out) + 1)
    return b"".join(out) + c.flush()


BLOCK = 16 << 20


async def exchange(port: int, path: str, body: bytes, auth: str = "") -> tuple[bytes, bool]:
    """Send the whole body as fast as the server takes it; (the answer, whether the
    server closed the connection within 10 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                 f"\r\nContent-Encoding: gzip\r\nContent-Length: {len(body)}\r\n{auth}"
                 "\r\n".encode() + body)
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        answer = head + await asyncio.wait_for(reader.readexactly(length), 10)
        with contextlib.suppress(ConnectionError):
            closed = await asyncio.wait_for(reader.read(), 10) == b""
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
        answer, closed = repr(e).encode(), False
    writer.transport.abort()
    return answer, closed


def status_and_error(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    error: dict[str, Any] = json.loads(body) if body else {}
    return int(head.split()[1]), error


async def test_a_compressed_body_is_refused_as_llama_server_refuses_it(port: int) -> None:
    """An authorised gzip request was decoded and sent on with its Content-Encoding, so
    llama-server answered 415 (after llamad loaded the model for it)."""
    body = gzipped(json.dumps({"model": "m"}).encode())
    for path in ("/v1/completions", "/api/generate"):
        answer, closed = await exchange(port, path, body, "Authorization: Bearer k\r\n")
        status, error = status_and_error(answer)
        assert status == 415, answer
        message = error["error"] if path.startswith("/api/") else error["error"]["message"]
        assert "Content-Encoding" in message and closed
        assert b"\r\nConnection: close\r\n" in answer.partition(b"\r\n\r\n")[0]


async def test_a_compression_bomb_without_a_key_costs_llamad_nothing(
        port: int, inflated: list[int]) -> None:
    """4 MiB of gzip (4 GiB of zeros) from a client without a key: its answer, and not
    one of those bytes inflated beyond what aiohttp read before the refusal."""
    answer, closed = await exchange(port, "/v1/completions", gzipped(b'{"m', 4 << 30))
    assert status_and_error(answer)[0] == 415, answer
    assert closed
    assert sum(inflated) < 16 << 20, f"{sum(inflated) >> 20} MiB inflated"
