"""security-review-3's findings about what clients can make llamad hold (M2, M3, M6), the
slot files (M7) and the small ones of the HTTP side (L1, L4, L7), each tried on the box
against llamad as a systemd service with the shipped unit's MemoryMax=1G. docs/security.md,
"Attacks tried", lists each with what it did before."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from typing import Any

import aiohttp
import rig
from helpers.daemon import Factory, Llamad, chat
from helpers.watch import eventually

# As units/llamad.service: the bound that hostile bodies and answers used to break.
MEMORY_MAX = "MemoryMax=1G"
KEYS = "boss admin\nnarrow models=gemma-a\n"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _peak_rss_mib(d: Llamad) -> int:
    """llamad's peak resident memory so far (VmHWM), MiB."""
    return d.memory_of("VmHWM") // 2**20


def _keys(box: rig.Box, name: str) -> str:
    path = box.workdir / name
    path.write_text(KEYS)
    path.chmod(0o600)
    return str(path)


async def test_multipart_bombs_cost_llamad_nothing(llamad_factory: Factory, box: rig.Box,
                                                   subtests: Any) -> None:
    """M2: 30 MiB of tiny parts cost email's parser ~1.1 GiB and ~45 s of CPU: two such
    uploads from any key OOM-killed llamad (MemoryMax=1G), and it crash-looped as often
    as they came."""
    d = llamad_factory(["gemma-a"], unit=(MEMORY_MAX,),
                       **{"api-keys-file": _keys(box, "m2-keys")})
    pid = d.show(d.unit, "MainPID")
    parts = b"--b\r\n\r\nx\r\n" * 3_000_000 + b"--b--\r\n"
    headers = {**_auth("narrow"), "Content-Type": "multipart/form-data; boundary=b"}
    async with aiohttp.ClientSession() as s:
        async def upload() -> tuple[int, Any]:
            async with s.post(d.url + "/v1/audio/transcriptions", data=io.BytesIO(parts),
                              headers=headers) as r:
                return r.status, await r.json()

        async def health_ms() -> float:
            began = asyncio.get_running_loop().time()
            async with s.get(d.url + "/health") as r:
                assert r.status == 200
            return (asyncio.get_running_loop().time() - began) * 1000
        uploads = asyncio.gather(upload(), upload())
        latencies = [await health_ms()]
        while not uploads.done():
            latencies.append(await health_ms())
            await asyncio.sleep(0.05)
        answers = await uploads
    with subtests.test("each is one 400, quickly"):
        for status, body in answers:
            assert status == 400 and body["error"]["code"] == "invalid_form", body
            assert "more than 256 parts" in body["error"]["message"]
    with subtests.test("llamad neither died nor grew"):
        assert d.show(d.unit, "MainPID") == pid and d.show(d.unit, "NRestarts") == "0"
        # The two bodies themselves (60 MiB, counted in max-bodies-mb) and little more.
        assert _peak_rss_mib(d) < 300, _peak_rss_mib(d)
    with subtests.test("the event loop kept answering"):
        assert max(latencies) < 1000, latencies
    assert d.model_units() == {}


async def test_a_big_plain_answer_passes_through(llamad_factory: Factory) -> None:
    """M3: a non-streamed answer was read whole and joined (twice its size at peak) before
    it went out: three big /tokenize answers took llamad past MemoryMax=1G. Now it is
    passed on piece by piece."""
    d = llamad_factory(["gemma-a"], unit=(MEMORY_MAX,))
    text = "a " * 1_500_000
    async with aiohttp.ClientSession() as s:
        status, _ = await chat(s, d.url, "gemma-a")  # loaded: its load is no part of this
        assert status == 200
        before = _peak_rss_mib(d)
        body = json.dumps({"model": "gemma-a", "content": text, "with_pieces": True}).encode()
        async with s.post(d.url + "/tokenize", data=io.BytesIO(body),
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200 and r.content_length is not None
            size, parts = r.content_length, bytearray()
            while chunk := await r.content.readany():
                parts += chunk
    tokens = json.loads(parts)["tokens"]
    assert len(parts) == size and len(tokens) >= 1_500_000 and tokens[1]["piece"] == " a"
    grown = _peak_rss_mib(d) - before
    # Before, it grew by twice the answer's size.
    assert size > 30 << 20 and grown < 16, (size >> 20, grown)


async def _sse(s: aiohttp.ClientSession, url: str, key: str) -> tuple[int, Any]:
    """GET /models/sse: its status, and the open response (to close later) or the error."""
    r = await s.get(url + "/models/sse", headers=_auth(key))
    if r.status == 200:
        return 200, r
    body, retry = await r.json(), r.headers.get("Retry-After")
    r.release()
    return r.status, (body["error"]["code"], retry)


async def test_event_feeds_do_not_starve_requests(llamad_factory: Factory, box: rig.Box,
                                                  subtests: Any) -> None:
    """M6: /models/sse (any key) held a max-requests place for ever: 64 of them with
    max-requests = 64, and every other request, an admin's too, got 503 while /health
    said 200. Now feeds count against max-streams (256; a non-admin key a quarter)."""
    d = llamad_factory(["gemma-a"], **{"max-requests": 64,
                                       "api-keys-file": _keys(box, "m6-keys")})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        feeds = [await _sse(s, d.url, "narrow") for _ in range(100)]
        try:
            with subtests.test("a key holds a quarter of max-streams; beyond, 503"):
                assert [status for status, _ in feeds].count(200) == 64
                assert {x for status, x in feeds if status != 200} == {
                    ("too_many_streams", "2")}
            with subtests.test("requests and /health are served"):
                status, body = await chat(s, d.url, "gemma-a", headers=_auth("narrow"))
                assert status == 200, body
                for path, key in (("/v1/models", "narrow"), ("/status", "boss"),
                                  ("/health", "narrow")):
                    async with s.get(d.url + path, headers=_auth(key)) as r:
                        assert r.status == 200, (path, await r.text())
            with subtests.test("unauthenticated clients hold nothing and learn nothing"):
                async with s.get(d.url + "/models/sse", headers=_auth("wrong")) as r:
                    assert r.status == 401
            with subtests.test("an admin still gets a feed"):
                status, feed = await _sse(s, d.url, "boss")
                assert status == 200
                feed.close()
        finally:
            for status, r in feeds:
                if status == 200:
                    r.close()


async def test_a_client_that_stops_reading_lets_go(llamad_factory: Factory,
                                                   subtests: Any) -> None:
    """M6: a client that stopped reading a streamed completion held its request (and, by
    backpressure, llama-server's HTTP thread) for ever. Now send-timeout cuts it off;
    meanwhile /health says 503 (saturated), so a balancer sends others elsewhere."""
    d = llamad_factory(["gemma-a"], **{"max-requests": 1, "send-timeout": 3})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
        body = json.dumps({"model": "gemma-a", "prompt": "Count to a thousand:", "stream": True,
                           "n_predict": 1000, "n_probs": 100, "ignore_eos": True}).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", d.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")  # then reads no more

        async def health_until(want: int, timeout: float) -> None:
            async def answers() -> bool:
                async with s.get(d.url + "/health") as r:
                    return r.status == want
            await eventually(f"/health to answer {want}", answers, timeout, every=0.2)
        with subtests.test("while it is held: /health 503, requests 503"):
            await health_until(503, 30)
            status, answer = await chat(s, d.url, "gemma-a")
            assert status == 503 and answer["error"]["code"] == "too_many_requests"
        with subtests.test("cut off at send-timeout once its buffers are full"):
            await health_until(200, 240)
            assert "unread for 3s (send-timeout); closing its connection" in d.log()
            status, answer = await chat(s, d.url, "gemma-a")
            assert status == 200, answer
        with subtests.test("the model stopped generating for it"):
            async with s.get(d.url + "/slots", params={"model": "gemma-a"}) as r:
                assert not any(slot["is_processing"] for slot in await r.json())
        writer.close()


async def test_slot_files_and_other_shared_state_are_the_operators(
        llamad_factory: Factory, box: rig.Box, subtests: Any) -> None:
    """M7: with kv-cache = yes any key could make llama-server write files of its choosing
    into llamad's KV directory (filling /var/lib), erase or restore other tenants' slots,
    and read their request settings in GET /slots. L1: ?reload=1 was a full rescan for any
    key. L4: a key that is not UTF-8 was a 500 with a traceback. L7: browser headers."""
    d = llamad_factory(["gemma-a", "gemma-b"], **{
        "kv-cache": "yes", "api-keys-file": _keys(box, "m7-keys"),
        "ui-dir": str(rig.WEB_UI)})
    kv = d.dir / "state" / "kv"
    async with aiohttp.ClientSession() as s:
        async def call(method: str, path: str, key: str, **kw: Any) -> tuple[int, Any]:
            async with s.request(method, d.url + path, headers=_auth(key), **kw) as r:
                text = await r.text()
                try:
                    return r.status, json.loads(text)
                except ValueError:
                    return r.status, text
        assert (await chat(s, d.url, "gemma-a", headers=_auth("narrow")))[0] == 200
        save = {"params": {"action": "save"},
                "json": {"model": "gemma-a", "filename": "fill.bin"}}
        with subtests.test("a scoped key may not touch the slots, nor read them"):
            for method, path, kw in [("POST", "/slots/0", save),
                                     ("POST", "/slots/0", {"params": {"action": "erase"},
                                                           "json": {"model": "gemma-a"}}),
                                     ("GET", "/slots", {"params": {"model": "gemma-a"}}),
                                     ("POST", "/lora-adapters", {"json": {"model": "gemma-a"}})]:
                status, body = await call(method, path, "narrow", **kw)
                assert status == 403 and body["error"]["code"] == "admin_key_required", path
        with subtests.test("nobody names files in llamad's KV directory"):
            status, body = await call("POST", "/slots/0", "boss", **save)
            assert status == 403 and body["error"]["code"] == "slot_files_are_llamads", body
            assert not list(kv.rglob("fill.bin"))
            status, body = await call("POST", "/slots/0", "boss", params={"action": "erase"},
                                      json={"model": "gemma-a"})
            assert status == 200, body
            status, body = await call("GET", "/slots", "boss", params={"model": "gemma-a"})
            assert status == 200 and isinstance(body, list)
        with subtests.test("L1: ?reload=1 is an admin's"):
            assert (await call("GET", "/v1/models?reload=1", "narrow"))[0] == 403
            assert (await call("GET", "/v1/models?reload=1", "boss"))[0] == 200
        with subtests.test("L7: nothing sniffed, pages with a policy, no framing"):
            for path, key, policy in [("/props?model=gemma-a", "narrow", "sandbox"),
                                      ("/", "narrow", "script-src 'self' 'sha256-"),
                                      ("/dashboard", "narrow", "script-src 'self';"),
                                      ("/v1/models", "narrow", "sandbox")]:
                async with s.get(d.url + path, headers=_auth(key)) as r:
                    assert r.status == 200 and r.headers["X-Content-Type-Options"] == "nosniff"
                    csp = r.headers["Content-Security-Policy"]
                    assert policy in csp and "frame-ancestors 'none'" in csp, (path, csp)
    with subtests.test("L4: a key that is not UTF-8 is a wrong key"):
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n"
                     b"Authorization: Bearer \xff\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert "Traceback" not in d.log() and "Error handling request" not in d.log()


async def test_an_ollama_embedding_answer_is_translated_in_pieces(
        llamad_factory: Factory) -> None:
    """Ollama's /api/embed, for any client: its answer was read whole, decoded and encoded
    again on the event loop. 1,500 short inputs (20 MiB of vectors) grew llamad by 100 MiB
    and held /health for 2.1 s; a request may hold 50,000. Now a few inputs at a time."""
    d = llamad_factory(["gemma-e"], "[gemma-e]\nembeddings = true\npooling = mean\n",
                       unit=(MEMORY_MAX,))
    inputs = [f"word {i}" for i in range(1000)]
    async with aiohttp.ClientSession() as s:
        async with s.post(d.url + "/api/embed", json={"model": "gemma-e", "input": "a"}) as r:
            assert r.status == 200, await r.text()  # loaded: its load is no part of this
        before = _peak_rss_mib(d)

        async def embed() -> Any:
            async with s.post(d.url + "/api/embed",
                              json={"model": "gemma-e", "input": inputs}) as r:
                assert r.status == 200 and r.content_type == "application/json"
                return await r.json()
        answer = asyncio.ensure_future(embed())
        waits = []
        while not answer.done():
            began = asyncio.get_running_loop().time()
            async with s.get(d.url + "/health") as r:
                assert r.status == 200
            waits.append(asyncio.get_running_loop().time() - began)
            await asyncio.sleep(0.05)
        got = await answer
        async with s.post(d.url + "/v1/embeddings",
                          json={"model": "gemma-e", "input": inputs[900:902]}) as r:
            direct = [row["embedding"] for row in (await r.json())["data"]]
    vectors = got["embeddings"]
    grown = _peak_rss_mib(d) - before
    assert grown < 30 and max(waits) < 0.7, (grown, max(waits))
    assert len(vectors) == 1000 and all(len(v) == 640 for v in vectors)
    for mine, theirs in zip(vectors[900:902], direct, strict=True):  # in order, each its own
        # (not bit for bit: llama.cpp's sums depend on what else is in the batch)
        assert sum(a * b for a, b in zip(mine, theirs, strict=True)) > 0.999
    assert got["model"] == "gemma-e" and got["prompt_eval_count"] >= 2000


async def test_numbers_that_become_llama_servers_memory_are_bounded(
        llamad_factory: Factory) -> None:
    """llama-server takes repeat_last_n (and dry_penalty_last_n) up to 2^31 - 1 and gives
    the request a zeroed ring of that many tokens: 8 GiB from one request of any client,
    four at once on four slots. Measured by hand on the pinned llama-server: 500,000,000
    raised its resident memory from 0.36 to 2.7 GB; n_probs 2^31 - 1 made a 52 MB answer
    of two tokens and +570 MB."""
    d = llamad_factory(["gemma"])
    huge = 2**31 - 1
    async with aiohttp.ClientSession() as s:
        for path, body in [
                ("/completion", {"model": "gemma", "prompt": "Hi", "n_predict": 2,
                                 "repeat_last_n": huge, "repeat_penalty": 1.1}),
                ("/v1/chat/completions", {"model": "gemma", "max_tokens": 2,
                                          "dry_penalty_last_n": huge, "dry_multiplier": 0.8,
                                          "messages": [{"role": "user", "content": "Hi"}]}),
                ("/api/generate", {"model": "gemma", "prompt": "Hi", "stream": False,
                                   "options": {"num_predict": 2, "repeat_last_n": huge}}),
                # Every candidate of the 262k vocabulary for every token: 52 MB of JSON
                # for two tokens, a context's worth is tens of GB built in llama-server.
                ("/completion", {"model": "gemma", "prompt": "Hi", "n_predict": 2,
                                 "n_probs": huge}),
                ("/v1/chat/completions", {"model": "gemma", "logprobs": True,
                                          "top_logprobs": huge,
                                          "messages": [{"role": "user", "content": "Hi"}]})]:
            async with s.post(d.url + path, json=body) as r:
                said = await r.json()
                assert r.status == 400, (path, said)
                message = said["error"] if path.startswith("/api/") else \
                    said["error"]["message"]
                assert f"{huge} is too large: at most" in message, said
        assert d.model_units() == {}  # refused before anything loads, nothing allocated
        async with s.post(d.url + "/completion", json={
                "model": "gemma", "prompt": "Hi", "n_predict": 2, "repeat_last_n": 4096,
                "repeat_penalty": 1.1, "n_probs": 20}) as r:
            assert r.status == 200, await r.text()
