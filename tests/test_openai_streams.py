"""Conversations (X-Conversation-Id) as llama.cpp's router keeps them (server-models.cpp,
proxy_post): a stop while the model loads cancels the request that waits for it, and a
client that leaves meanwhile does not (its answer goes to the stream it may resume)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers.supervised import serving
from helpers.watch import eventually

from llamad.api import forward as forwarding
from llamad.api import progress, proxy, streams
from llamad.http import limits, record
from llamad.http.context import SUPERVISOR
from llamad.http.middleware import error_middleware
from llamad.supervisor.events import State
from llamad.supervisor.supervisor import Supervisor


def app(sup: Supervisor) -> web.Application:
    """llamad's routes to a model, with its error shapes and limits."""
    lim = limits.Limits(sup.config)
    app = web.Application(middlewares=[error_middleware, lim.middleware, lim.admit,
                                       record.middleware([])])
    app[limits.LIMITS] = lim
    app[SUPERVISOR] = sup
    app.on_cleanup.append(lim.close)
    proxy.add_routes(app)
    return app


CHAT = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_stop_while_the_model_loads_cancels_the_waiting_request(
        tmp_path: Path, path: str) -> None:
    async with serving(tmp_path, ["tiny-a"]) as r, TestClient(TestServer(app(r.sup))) as client:
        pending = asyncio.ensure_future(client.post(
            path, json=CHAT, headers={"X-Conversation-Id": "c1"}))
        slot = await r.started("tiny-a")
        stop = await client.delete("/v1/stream", params={"conv_id": "c1"})
        assert stop.status == 204
        r.units.active(r.sup, slot.unit)
        await r.state("tiny-a", State.READY)
        async with await pending as resp:
            text = await resp.text()
        # The router answers 400 before any byte went out; llamad's stream may have
        # begun with load progress, so the error is its last event then.
        assert "request cancelled by a stop while the model was loading" in text, text
        # Anthropic's SDK reads only named events (llama-server names its error event there).
        named = text.endswith('\n\n') and '\nevent: error\ndata: {"type": "error", "error"' in text
        assert named == (path == "/v1/messages"), text
        # The stop ended that request only: the conversation's next one is served.
        async with client.post("/v1/chat/completions", json=CHAT,
                               headers={"X-Conversation-Id": "c1"}) as resp:
            assert "cancelled" not in await resp.text()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_conversation_outlives_a_client_that_leaves_while_the_model_loads(
        tmp_path: Path, stream: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # A streamed request gets load progress: written often, one fails once the client left.
    monkeypatch.setattr(progress, "INTERVAL", 0.01)
    sent: list[str] = []

    async def spy(request: web.Request, *args: Any) -> web.StreamResponse:
        sent.append(request.headers[streams.HEADER])
        return await forwarding.forward(request, *args)
    monkeypatch.setattr(proxy, "forward", spy)
    async with serving(tmp_path, ["tiny-a"]) as r:
        # As `llamad serve` runs: a client that hangs up cancels its handler.
        server = TestServer(app(r.sup), handler_cancellation=True)
        async with TestClient(server) as client:
            pending = asyncio.ensure_future(client.post(
                "/v1/chat/completions", json={**CHAT, "stream": stream},
                headers={"X-Conversation-Id": "c2"}))
            slot = await r.started("tiny-a")
            if stream:  # its headers came with the first progress comment
                (await pending).close()  # a page reload
            else:
                pending.cancel()
            assert server.runner is not None and server.runner.server is not None
            web_server = server.runner.server
            await eventually("the client to be gone", lambda: not web_server.connections)
            await eventually("load progress to end", lambda: not any(
                getattr(t.get_coro(), "__qualname__", "") == "Wait._tick"
                for t in asyncio.all_tasks()))
            r.units.active(r.sup, slot.unit)
            await r.state("tiny-a", State.READY)
            # The request still reached the model, whose stream keeps the answer.
            await eventually("the request to be done with", lambda: slot.served == 1)
            assert sent == ["c2"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_stream_refused_before_any_wait_keeps_its_status(tmp_path: Path,
                                                                  path: str) -> None:
    """A model that failed is refused at once (an explicit load retries it): nothing loads,
    so no progress goes out and the 503 is the client's, as the router's 500 is (SDKs pick
    the exception, and whether to retry, by it)."""
    async with serving(tmp_path, ["tiny-a"]) as r, TestClient(TestServer(app(r.sup))) as client:
        await r.sup.load(r.slot("tiny-a"))
        slot = await r.started("tiny-a")
        r.units.gone(r.sup, slot.unit, result="exit-code")
        await r.state("tiny-a", State.FAILED)
        async with client.post(path, json=CHAT) as resp:
            assert resp.status == 503, await resp.text()
            assert (await resp.json())["error"]["code"] == "model_failed"


async def test_autoload_true_in_the_query_loads_where_models_autoload_is_off(
        tmp_path: Path) -> None:
    """Router mode takes ?autoload= over --no-models-autoload, both ways: llamad checked the
    query at the door, then refused the load by the configuration alone."""
    async with serving(tmp_path, ["tiny-a"], models_autoload=False) as r, \
            TestClient(TestServer(app(r.sup))) as client:
        async with client.post("/v1/chat/completions", json={**CHAT, "stream": False}) as resp:
            assert resp.status == 400 and "autoload is off" in await resp.text()
        pending = asyncio.ensure_future(client.post(
            "/v1/chat/completions?autoload=true", json={**CHAT, "stream": False}))
        slot = await r.started("tiny-a")
        r.units.active(r.sup, slot.unit)
        resp = await pending
        # The fake llama-server answers /health and /props alone: its 404 says it was asked.
        assert (resp.status, await resp.text()) == (404, "404: Not Found")
        assert slot.state is State.READY and slot.served == 1
