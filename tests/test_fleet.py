"""fleet.py: /health while draining, and GET /v1/models listing the peers' models with a
bounded wait. The peers here are small HTTP servers answering GET /v1/models as llamad
does (tests/integration/test_haproxy_fleet.py asks real llamads)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers.ports import refused_url
from helpers.watch import eventually

from llamad.api import fleet
from llamad.config import load_config
from llamad.errors import ConfigError
from llamad.http import keys
from llamad.http.middleware import error_middleware

LOCAL = b'{"object": "list", "data": [{"id": "a", "llamad": {"state": "ready"}}]}'


def test_config_keys(tmp_path: Path) -> None:
    path = tmp_path / "llamad.conf"
    path.write_text("peers = http://10.0.0.3:8080, HTTP://h4:8080\npeer-timeout = 0.5\n"
                    "shutdown-grace = 3\n")
    c = load_config(path)
    assert (c.peers, c.peer_timeout, c.shutdown_grace) == (
        ("http://10.0.0.3:8080", "http://h4:8080"), 0.5, 3.0)
    for line in ("peers = 10.0.0.3:8080", "peers = http://h/v1", "peer-timeout = 0",
                 "shutdown-grace = -1"):
        path.write_text(line + "\n")
        with pytest.raises(ConfigError, match=line.split(" = ")[0]):
            load_config(path)


async def test_health_says_draining_while_requests_are_still_served() -> None:
    async def health(request: web.Request) -> web.Response:
        fleet.check_health(request.app)
        return web.json_response({"status": "ok"})

    app = web.Application(middlewares=[error_middleware])
    app[fleet.DRAINING] = fleet.Draining()
    app.router.add_get("/health", health)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/health")).status == 200
        draining = asyncio.ensure_future(fleet.drain(app, 0.5))
        await eventually("the drain to begin", lambda: app[fleet.DRAINING].on)
        r = await client.get("/health")
        assert r.status == 503 and (await r.json())["error"]["code"] == "draining"
        assert not draining.done()
        await draining
    began = time.monotonic()
    app[fleet.DRAINING].on = False
    await fleet.drain(app, 0)  # the default: no grace
    assert time.monotonic() - began < 0.1 and not app[fleet.DRAINING].on


def peer_app(models: list[str], seen: list[str],
             aliases: dict[str, list[str]] | None = None) -> web.Application:
    async def listing(request: web.Request) -> web.Response:
        seen.append(f"{request.query_string} {request.headers.get('Authorization')}")
        return web.json_response({"object": "list", "data": [
            {"id": m, "aliases": (aliases or {}).get(m, []), "llamad": {"state": "unloaded"}}
            for m in models]})
    app = web.Application()
    app.router.add_get("/v1/models", listing)
    return app


@pytest.fixture
async def silent_peer() -> AsyncIterator[str]:
    """Accepts connections and never answers: a peer that hangs."""
    held: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


@pytest.fixture
def closed_peer() -> Iterator[str]:
    """A peer whose port refuses connections."""
    with refused_url() as url:
        yield url


async def test_models_of_the_fleet_in_bounded_time(silent_peer: str, closed_peer: str) -> None:
    seen: list[str] = []
    async with TestServer(peer_app(["a", "b"], seen)) as peer:
        url = str(peer.make_url("")).rstrip("/")
        peers = (url, silent_peer, closed_peer)
        app = web.Application()

        async def handle(request: web.Request) -> web.Response:
            assert fleet.wants_peers(request, peers)
            return web.Response(body=await fleet.with_peers(request, LOCAL, peers, 0.5,
                                                            "peer-key"))
        app.router.add_get("/v1/models", handle)
        async with TestClient(TestServer(app)) as client:
            began = time.monotonic()
            r = await client.get("/v1/models", headers={"Authorization": "Bearer k"})
            took = time.monotonic() - began
            body = json.loads(await r.read())
    assert took < 2, took  # the silent peer costs peer-timeout, not more
    assert [(m["id"], m["llamad"].get("host")) for m in body["data"]] == [
        ("a", None), ("b", url)]  # "a" is listed once: this host's entry
    ok, silent, closed = body["peers"]
    assert ok == {"url": url, "models": 2}
    assert silent["url"] == silent_peer and "within peer-timeout (0.5s)" in silent["error"]
    assert closed["error"].startswith("cannot be asked")
    # The peer lists only its own models, and is asked with llamad's peer key: the
    # client's key (an admin's, say) never travels on.
    assert seen == ["peers=no Bearer peer-key"]


async def test_a_scoped_key_sees_only_its_models_of_the_peers(tmp_path: Path) -> None:
    seen: list[str] = []
    key_file = tmp_path / "keys"
    key_file.write_text("narrow models=b,c-alias\nplain\n")
    keyring = keys.Keyring(key_file)
    async with TestServer(peer_app(["b", "x", "c"], seen, aliases={"c": ["c-alias"]})) as peer:
        peers = (str(peer.make_url("")).rstrip("/"),)

        async def handle(request: web.Request) -> web.Response:
            return web.Response(body=await fleet.with_peers(request, LOCAL, peers, 2))
        app = web.Application(middlewares=[error_middleware, keys.middleware(keyring)])
        app.router.add_get("/v1/models", handle)
        async with TestClient(TestServer(app)) as client:
            lists = {}
            for key in ("narrow", "plain"):
                r = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
                lists[key] = [m["id"] for m in json.loads(await r.read())["data"]]
    assert lists == {"narrow": ["a", "b", "c"], "plain": ["a", "b", "x", "c"]}
    assert seen == ["peers=no None"] * 2  # no peer-key-file: asked without a key
