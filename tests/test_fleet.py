"""fleet.py: /health while draining, and GET /v1/models listing the peers' models with a
bounded wait. The peers here are small HTTP servers answering GET /v1/models as llamad
does (tests/integration/test_haproxy_fleet.py asks real llamads)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers.ports import refused_url
from helpers.supervised import serving
from helpers.watch import eventually

from llamad.api import fleet, proxy
from llamad.config import load_config
from llamad.errors import ConfigError
from llamad.http import keys, limits, record
from llamad.http.context import SUPERVISOR
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


# What peers that misbehave answer; each one only costs its own entries, never the listing.
GARBAGE = {
    "html": (200, b"<html><body>Bad gateway</body></html>", "cannot be asked"),
    "deeply nested": (200, b"[" * 100_000, "something other than a model list"),
    "nested in an entry": (200, b'{"data": [{"id": "z", "x": ' + b"[" * 100_000 + b"]}]}",
                           "something other than a model list"),
    "a redirect": (302, b"", "answered HTTP 302"),
}


def garbage_app(status: int, body: bytes) -> web.Application:
    async def listing(request: web.Request) -> web.Response:
        headers = {"Location": "http://127.0.0.1:9/v1/models"} if status == 302 else {}
        return web.Response(status=status, body=body, headers=headers,
                            content_type="application/json")
    app = web.Application()
    app.router.add_get("/v1/models", listing)
    return app


async def fleet_listing(peers: tuple[str, ...]) -> tuple[int, Any]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=await fleet.with_peers(request, LOCAL, peers, 2))
    app = web.Application()
    app.router.add_get("/v1/models", handle)
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/v1/models")
        return r.status, json.loads(await r.read()) if r.status == 200 else {}


async def test_a_peer_answering_garbage_costs_only_its_own_entries(subtests: Any) -> None:
    for name, (status, body, why) in GARBAGE.items():
        with subtests.test(peer=name):
            async with TestServer(garbage_app(status, body)) as bad, \
                    TestServer(peer_app(["b"], [])) as good:
                urls = tuple(str(p.make_url("")).rstrip("/") for p in (bad, good))
                code, listing = await fleet_listing(urls)
            assert code == 200
            assert [m["id"] for m in listing["data"]] == ["a", "b"]
            assert why in listing["peers"][0]["error"]


async def test_a_peer_entry_whose_llamad_field_is_not_an_object_still_gets_its_host() -> None:
    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "b", "llamad": "x"},
                                           {"id": "c", "llamad": None}, {"id": 7}, "d"]})
    app = web.Application()
    app.router.add_get("/v1/models", listing)
    async with TestServer(app) as peer:
        url = str(peer.make_url("")).rstrip("/")
        code, body = await fleet_listing((url,))
    assert code == 200
    assert [(m["id"], m["llamad"]) for m in body["data"]] == [
        ("a", {"state": "ready"}), ("b", {"host": url}), ("c", {"host": url})]
    assert body["peers"] == [{"url": url, "models": 2}]  # not 7, nor "d": not entries


async def test_a_model_of_another_host_is_404_saying_where_to_send_it(tmp_path: Path) -> None:
    """With peers, GET /v1/models lists the other hosts' models too: a request for one of
    them here was told to look at GET /v1/models, which lists it."""
    for peers, said in (((), "is not known to llamad"),
                        (("http://10.0.0.9:8080",), "is not served by this host")):
        async with serving(tmp_path / str(len(peers)), ["tiny-a"], peers=peers) as r:
            lim = limits.Limits(r.sup.config)
            app = web.Application(middlewares=[error_middleware, lim.middleware, lim.admit,
                                               record.middleware([])])
            app[limits.LIMITS], app[SUPERVISOR] = lim, r.sup
            app.on_cleanup.append(lim.close)
            proxy.add_routes(app)
            async with TestClient(TestServer(app)) as client, client.post(
                    "/v1/chat/completions", json={"model": "beta", "messages": []}) as resp:
                assert resp.status == 404
                message = (await resp.json())["error"]["message"]
                assert message.startswith(f"model 'beta' {said}"), message
                assert ("llamad.host" in message) == bool(peers)
