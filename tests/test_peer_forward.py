"""peerforward.py: a request for a model only a peer lists is forwarded to that peer, as
llama-swap's peers are. The peers are small HTTP servers answering GET /v1/models as
llamad does and a chat route (JSON, or a stream the test releases chunk by chunk); this
host is llamad's proxy routes over the supervisor rig (helpers/supervised.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from helpers.supervised import serving
from helpers.watch import eventually

from llamad.api import models, peerforward, proxy
from llamad.http import keys, limits, record
from llamad.http.context import SUPERVISOR
from llamad.http.middleware import error_middleware
from llamad.supervisor.supervisor import Supervisor

HOP = "X-Llamad-Forwarded-By"


@dataclass
class Peer:
    """What a fake peer was asked, and the gate its streams wait at between two chunks."""

    models: list[str]
    asked: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    left: asyncio.Event = field(default_factory=asyncio.Event)  # a stream's client left
    url: str = ""
    server: BaseTestServer | None = None
    hung: bool = False  # its chat route and /health never answer
    listed: list[str] = field(default_factory=list)  # each GET /v1/models' query


def peer_app(peer: Peer) -> web.Application:
    async def listing(request: web.Request) -> web.Response:
        peer.listed.append(request.query_string)
        return web.json_response({"object": "list", "data": [
            {"id": m, "aliases": [f"{m}-alias"]} for m in peer.models]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if peer.hung:
            await asyncio.Event().wait()
        peer.asked.append({"path": request.path_qs, "body": body, **{
            h: request.headers.get(h) for h in ("Authorization", "x-api-key", "Cookie", HOP)}})
        if body.get("fail"):
            return web.json_response({"error": {"message": "busy", "code": 429}}, status=429)
        if not body.get("stream"):
            return web.json_response({"answer": body["model"]}, headers={
                "X-Llamad-Host": "peer-host", "Set-Cookie": "peer=1"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 1}\n\n')
        try:
            await peer.release.wait()
        except asyncio.CancelledError:
            peer.left.set()
            raise
        await resp.write(b'data: {"n": 2}\n\ndata: [DONE]\n\n')
        return resp

    async def props(request: web.Request) -> web.Response:
        peer.asked.append({"path": request.path_qs, "body": None, **{
            h: request.headers.get(h) for h in ("Authorization", "x-api-key", "Cookie", HOP)}})
        return web.json_response({"model_path": request.query["model"]})

    async def health(request: web.Request) -> web.Response:
        if peer.hung:
            await asyncio.Event().wait()
        return web.json_response({"status": "ok"})
    app = web.Application()
    app.router.add_get("/v1/models", listing)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/props", props)
    return app


@contextlib.asynccontextmanager
async def peer_serving(models: list[str]) -> AsyncIterator[Peer]:
    peer = Peer(models)
    async with TestServer(peer_app(peer), handler_cancellation=True) as server:
        peer.url, peer.server = str(server.make_url("")).rstrip("/"), server
        yield peer


def llamad_app(sup: Supervisor, keyring: keys.Keyring) -> web.Application:
    lim = limits.Limits(sup.config)
    checks = [keys.middleware(keyring)] if keyring.path is not None else []
    app = web.Application(middlewares=[error_middleware, *checks, lim.middleware, lim.admit,
                                       record.middleware([])])
    app[limits.LIMITS], app[SUPERVISOR], app[keys.KEYRING] = lim, sup, keyring
    app.on_cleanup.append(lim.close)
    peerforward.install(app)
    proxy.add_routes(app)
    app.router.add_get("/v1/models", models.handle_models)
    return app


@contextlib.asynccontextmanager
async def llamad(tmp_path: Path, peers: tuple[str, ...], api_keys: str | None = None,
                 **settings: Any) -> AsyncIterator[TestClient[Any, Any]]:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "peer-key").write_text("peer-key\n")
    (tmp_path / "peer-key").chmod(0o600)
    key_file = None
    if api_keys is not None:
        key_file = tmp_path / "keys"
        key_file.write_text(api_keys)
    keyring = keys.Keyring(key_file, tmp_path / "peer-key")
    async with serving(tmp_path, ["tiny-a"], peers=peers, peer_timeout=1,
                       **settings) as r, \
            TestClient(TestServer(llamad_app(r.sup, keyring))) as client:
        yield client


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def test_a_peer_model_is_answered_by_the_peer_with_llamads_key(tmp_path: Path) -> None:
    async with peer_serving(["b"]) as peer, llamad(tmp_path, (peer.url,)) as client:
        async with client.post("/v1/chat/completions?x=1", json=chat("b"), headers={
                "Authorization": "Bearer client-key", "x-api-key": "client-key",
                "Cookie": "session=secret"}) as resp:
            assert resp.status == 200, await resp.text()
            assert await resp.json() == {"answer": "b"}
            assert resp.headers["X-Llamad-Host"] == "peer-host"  # which host answered
            assert "Set-Cookie" not in resp.headers
        # A GET naming its model in ?model= goes there too.
        async with client.get("/props", params={"model": "b"}) as resp:
            assert (resp.status, await resp.json()) == (200, {"model_path": "b"})
        # An alias the peer lists reaches it too; the peer's own error passes through.
        async with client.post("/v1/chat/completions", json=chat("b-alias", fail=True)) as resp:
            assert resp.status == 429 and (await resp.json())["error"]["message"] == "busy"
    first = peer.asked[0]
    assert first["path"] == "/v1/chat/completions?x=1" and first["body"] == chat("b")
    # llamad's peer key, never the client's key or cookies; marked as forwarded once.
    assert (first["Authorization"], first["x-api-key"], first["Cookie"]) == (
        "Bearer peer-key", None, None)
    assert first[HOP]


async def test_a_peer_stream_flows_chunk_by_chunk(tmp_path: Path) -> None:
    async with peer_serving(["b"]) as peer, llamad(tmp_path, (peer.url,)) as client, \
            client.post("/v1/chat/completions", json=chat("b", stream=True)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await resp.content.readuntil(b"\n\n")
        assert first == b'data: {"n": 1}\n\n' and not peer.release.is_set()
        peer.release.set()
        assert await resp.content.read() == b'data: {"n": 2}\n\ndata: [DONE]\n\n'


async def test_a_client_that_leaves_a_peer_stream_closes_the_peer_request(
        tmp_path: Path) -> None:
    async with peer_serving(["b"]) as peer, llamad(tmp_path, (peer.url,)) as client:
        resp = await client.post("/v1/chat/completions", json=chat("b", stream=True))
        await resp.content.readuntil(b"\n\n")
        resp.close()
        await eventually("the peer to see its client leave", peer.left.is_set)


async def test_a_forwarded_request_is_never_forwarded_again(tmp_path: Path) -> None:
    """A peers B peers A: a request that comes from a peer is answered here or not at all."""
    async with peer_serving(["b"]) as peer, llamad(tmp_path, (peer.url,)) as client:
        async with client.post("/v1/chat/completions", json=chat("b"),
                               headers={HOP: "host-a"}) as resp:
            assert resp.status == 404
            assert "is not served by this host" in (await resp.json())["error"]["message"]
        assert peer.asked == []
        async with client.post("/v1/chat/completions", json=chat("b")) as resp:
            assert resp.status == 200  # from a client, the same request goes on
    assert len(peer.asked) == 1


async def test_a_scoped_key_reaches_no_peer_model_outside_its_scope(tmp_path: Path) -> None:
    async with peer_serving(["b", "c"]) as peer, llamad(
            tmp_path, (peer.url,), "narrow models=tiny-a,c\nplain\n") as client:
        for key, model, status in (("narrow", "b", 404), ("narrow", "b-alias", 404),
                                   ("narrow", "c", 200), ("plain", "b", 200)):
            async with client.post("/v1/chat/completions", json=chat(model),
                                   headers={"Authorization": f"Bearer {key}"}) as resp:
                assert resp.status == status, (key, model, await resp.text())
    assert [a["body"]["model"] for a in peer.asked] == ["c", "b"]


async def test_a_peer_that_does_not_answer_is_a_502_naming_it(tmp_path: Path) -> None:
    async with peer_serving(["b"]) as peer:
        url = peer.url
        async with llamad(tmp_path, (url,)) as client:
            async with client.post("/v1/chat/completions", json=chat("b", fail=True)) as resp:
                assert resp.status == 429  # the peer is known now
            assert peer.server is not None
            await peer.server.close()  # its port refuses connections from now on
            async with client.post("/v1/chat/completions", json=chat("b")) as resp:
                assert resp.status == 502
                error = (await resp.json())["error"]
    assert url in error["message"] and error["code"] == "peer_unreachable", error


async def test_a_model_no_peer_lists_is_still_404(tmp_path: Path) -> None:
    async with peer_serving(["b"]) as peer:
        for peers, said in (((peer.url,), "is not served by this host"),
                            ((), "is not known to llamad")):
            async with llamad(tmp_path / str(len(peers)), peers) as client, client.post(
                    "/v1/chat/completions", json=chat("zeta")) as resp:
                assert resp.status == 404
                assert said in (await resp.json())["error"]["message"]
    assert peer.asked == []


async def test_a_local_model_is_served_here_even_when_a_peer_lists_it(tmp_path: Path) -> None:
    async with peer_serving(["tiny-a"]) as peer, llamad(tmp_path, (peer.url,)) as client, \
            client.post("/v1/chat/completions?autoload=false", json=chat("tiny-a")) as resp:
        assert resp.status == 400  # this host's answer: its model is not loaded
        assert "autoload is off" in await resp.text()
    assert peer.asked == []


async def test_a_peer_gone_silent_is_a_502_once_its_health_says_nothing_either(
        tmp_path: Path) -> None:
    """As a backend is watched (forward.py): silent for liveness-timeout, then /health
    must answer within peer-timeout."""
    async with peer_serving(["b"]) as peer, llamad(
            tmp_path, (peer.url,), liveness_timeout=0.3) as client:
        peer.hung = True
        async with client.post("/v1/chat/completions", json=chat("b")) as resp:
            assert resp.status == 502
            message = (await resp.json())["error"]["message"]
    assert peer.url in message and "/health did not answer within 1s" in message, message


async def test_unknown_names_ask_the_peers_at_most_every_few_seconds(tmp_path: Path) -> None:
    """A client's typo, sent in a loop, must not list every peer's models each time."""
    async with peer_serving(["b"]) as peer, llamad(tmp_path, (peer.url,)) as client:
        for model in ("zeta", "zeta", "b", "zeta"):
            async with client.post("/v1/chat/completions", json=chat(model)) as resp:
                assert resp.status == (200 if model == "b" else 404)
    assert peer.listed == ["peers=no"]  # its own models only, listed once


async def test_a_llamad_peer_answers_for_its_own_model(tmp_path: Path) -> None:
    """Two llamads: A forwards to B what B serves; B's own answer comes back, and a name
    neither serves is a 404 from A without B forwarding it back."""
    keyring = keys.Keyring(None)
    async with serving(tmp_path / "b", ["tiny-b"]) as rig_b, \
            TestServer(llamad_app(rig_b.sup, keyring)) as b:
        url = str(b.make_url("")).rstrip("/")
        async with llamad(tmp_path / "a", (url,)) as a:
            async with a.get("/v1/models") as resp:
                listed = {m["id"]: m["llamad"].get("host") for m in (await resp.json())["data"]}
            assert listed == {"tiny-a": None, "tiny-b": url}
            async with a.post("/v1/chat/completions?autoload=false",
                              json=chat("tiny-b")) as resp:
                assert resp.status == 400  # B's: its model is not loaded
                assert "model tiny-b is not loaded" in await resp.text()
            async with a.post("/v1/chat/completions", json=chat("ghost")) as resp:
                assert resp.status == 404
