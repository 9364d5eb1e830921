"""What of a client's request headers reaches a model's llama-server, and what of its
answer's headers reaches the client, with the model's unit as the adversary.

docs/security.md counts a model unit running a hostile GGUF's code as in scope. Browsers
send a host's cookies to every port of it: the web UI's requests to llamad on localhost
carry the cookies of the other local web apps (a notebook's login token, say), and
llamad passed them on to the model's llama-server, which has no use for any cookie.
Likewise a Set-Cookie from a unit was passed to the browser, which keeps it for every
port of the host.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llamad.api.forward import Watch, forward
from llamad.supervisor.backend import Backend

CLIENT_HEADERS = {
    "Cookie": "username-localhost-8888=2|1:0|10:secret-notebook-token",
    "Authorization": "Bearer llamad-key", "X-Api-Key": "llamad-key",
    "Proxy-Authorization": "Basic cHJveHk6cHc=", "Upgrade": "websocket",
    "Connection": "keep-alive, Upgrade", "TE": "trailers",
    "Content-Type": "application/json", "X-Conversation-Id": "c1",
}


@pytest.fixture
async def front(tmp_path: Path) -> AsyncIterator[tuple[TestClient, dict[str, Any]]]:  # type: ignore[type-arg]
    """llamad's forward() in front of a stand-in for the unit's llama-server that tells
    which headers it got, and answers with a cookie of its own."""
    seen: dict[str, Any] = {}

    async def backend_chat(request: web.Request) -> web.Response:
        seen.update(headers={k.lower(): v for k, v in request.headers.items()})
        return web.json_response({"ok": True}, headers={
            "Set-Cookie": "username-localhost-8888=fixed-by-the-unit; Path=/",
            "Set-Cookie2": "x=1"})
    back = web.Application()
    back.router.add_post("/v1/chat/completions", backend_chat)
    runner = web.AppRunner(back)
    await runner.setup()
    sock = tmp_path / "llama.sock"
    await web.UnixSite(runner, str(sock)).start()
    backend = Backend(f"unix:{sock}")

    async def handle(request: web.Request) -> web.StreamResponse:
        return await forward(request, backend, await request.read(),
                             Watch(5.0, 1.0, lambda why: None))
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, seen
    finally:
        await client.close()
        await backend.close()
        await runner.cleanup()


async def test_the_unit_gets_no_credential_of_the_client(front: Any) -> None:
    client, seen = front
    r = await client.post("/v1/chat/completions", data=b'{"model": "m"}',
                          headers=CLIENT_HEADERS)
    assert r.status == 200 and await r.json() == {"ok": True}
    got = seen["headers"]
    for name in ("cookie", "authorization", "x-api-key", "proxy-authorization", "upgrade",
                 "te"):
        assert name not in got, name
    assert got["content-type"] == "application/json" and got["x-conversation-id"] == "c1"


async def test_the_client_gets_no_cookie_of_the_unit(front: Any) -> None:
    client, _ = front
    r = await client.post("/v1/chat/completions", data=b'{"model": "m"}',
                          headers={"Content-Type": "application/json"})
    assert r.status == 200
    assert "Set-Cookie" not in r.headers and "Set-Cookie2" not in r.headers
