"""The forward path against a stand-in for llama-server's HTTP side.

The stand-in does on cue what a real llama-server does only by accident of timing: hang
up before answering, go silent with or without answering /health, answer 503 while
loading. The real process is killed, stopped and restarted in tests/integration.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from helpers import llamaserver
from helpers.watch import eventually
from rig import wait_for

from llamad.api.forward import Watch, exchange, forward
from llamad.http import record
from llamad.http.middleware import error_middleware
from llamad.supervisor.backend import Backend, cpu_ticks

IDLE = 0.3
HEALTH = 0.3
RECORD = record.Record("POST", "/")  # the last request's, as the request log sees it


@dataclass
class FakeServer:
    """What the next requests meet; `connections` counts the distinct ones seen."""

    health: str = "ok"  # ok, loading (503) or silent
    # ok, hang-up, loading, silent, stall (one event, then silence) or die (one event, then
    # the connection is gone)
    answer: str = "ok"
    delay: float = 0.0  # seconds of silence before answering, as a long prompt
    connections: list[int] = field(default_factory=list)
    never: asyncio.Event = field(default_factory=asyncio.Event)
    together: int = 0  # answer only once this many requests are in (each on a connection)
    arrived: list[asyncio.Event] = field(default_factory=list)

    async def on_health(self, request: web.Request) -> web.StreamResponse:
        if self.health == "silent":
            await self.never.wait()
        return web.json_response({}, status=503 if self.health == "loading" else 200)

    async def on_chat(self, request: web.Request) -> web.StreamResponse:
        conn = id(request.transport)
        if conn not in self.connections:
            self.connections.append(conn)
        body = await request.json()
        if self.together:
            self.arrived.append(asyncio.Event())
            if len(self.arrived) >= self.together:
                for ev in self.arrived:
                    ev.set()
            await self.arrived[-1].wait()
        if self.answer == "hang-up":
            assert request.transport is not None
            request.transport.close()
            await self.never.wait()
        if self.answer == "loading":
            return web.json_response({"error": {"message": "Loading model"}}, status=503)
        if self.answer == "silent":
            await self.never.wait()
        await asyncio.sleep(body.get("delay", self.delay))
        if self.answer in ("big", "cut"):
            return await self.big(request)
        if not body.get("stream"):
            return web.json_response({"text": "done"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 1}\n\n')
        if self.answer == "stall":
            await self.never.wait()
        if self.answer == "die":
            assert request.transport is not None
            request.transport.close()
            await self.never.wait()
        await resp.write(b'data: {"n": 2}\n\ndata: [DONE]\n\n')
        return resp


    async def big(self, request: web.Request) -> web.StreamResponse:
        """BIG bytes of JSON-ish text ending in usage counts ("cut": the backend dies
        halfway)."""
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = BIG + len(TAIL)
        await resp.prepare(request)
        piece = b"1," * 32768
        for sent in range(0, BIG, len(piece)):
            if self.answer == "cut" and sent >= BIG // 2:
                assert request.transport is not None
                request.transport.close()
                await self.never.wait()
            await resp.write(piece)
        await resp.write(TAIL)
        return resp


BIG = 64 << 20
TAIL = b'], "usage": {"prompt_tokens": 7, "completion_tokens": 9}}'


@dataclass
class Rig:
    server: FakeServer
    backend: Backend
    client: TestClient  # type: ignore[type-arg]
    wedged: list[str]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    fake = FakeServer()
    app = web.Application()
    app.router.add_get("/health", fake.on_health)
    app.router.add_post("/v1/chat/completions", fake.on_chat)
    app.router.add_post("/v1/messages", fake.on_chat)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "llama.sock"
    await web.UnixSite(runner, str(sock)).start()
    backend = Backend(f"unix:{sock}")
    wedged: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        global RECORD
        RECORD = record.of(request)
        out = record.TapResponse(RECORD)
        if "X-Begun" in request.headers:  # as a stream that waited for its model's load
            out.content_type = "text/event-stream"
            await out.prepare(request)
            await out.comment("loading")
        return await forward(request, backend, await request.read(),
                             Watch(IDLE, HEALTH, wedged.append), out)
    front = web.Application(middlewares=[error_middleware])
    front.router.add_post("/v1/chat/completions", handle)
    front.router.add_post("/v1/messages", handle)
    client = TestClient(TestServer(front))
    await client.start_server()
    try:
        yield Rig(fake, backend, client, wedged)
    finally:
        fake.never.set()
        await client.close()
        await backend.close()
        await runner.cleanup()


async def chat(rig: Rig, stream: bool = False, **extra: Any) -> tuple[int, Any]:
    r = await rig.client.post("/v1/chat/completions", json={"stream": stream, **extra})
    text = await r.text()
    if stream:
        return r.status, [json.loads(line[6:]) for line in text.splitlines()
                          if line.startswith("data: {")]
    return r.status, json.loads(text)


async def test_a_big_plain_answer_passes_through_without_being_held(rig: Rig) -> None:
    """security-review-3 M3: a plain (non-SSE) answer was read whole, and joined (twice its
    size at peak): a big /tokenize or embeddings answer took llamad past MemoryMax. Now it
    passes piece by piece, with its Content-Length, and its token counts are seen."""
    rig.server.answer = "big"
    tracemalloc.start()
    try:
        async with rig.client.post("/v1/chat/completions", json={}) as r:
            assert r.status == 200 and r.content_length == BIG + len(TAIL)
            got, last = 0, b""
            while chunk := await r.content.readany():
                got, last = got + len(chunk), chunk
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == BIG + len(TAIL) and last.endswith(b'"completion_tokens": 9}}')
    assert peak < 16 << 20, peak  # the client's, llamad's and the backend's buffers together
    assert RECORD.counts == {b"prompt_tokens": 7, b"completion_tokens": 9}


async def test_a_plain_answer_cut_halfway_is_never_passed_on_as_whole(rig: Rig) -> None:
    rig.server.answer = "cut"
    with pytest.raises(aiohttp.ClientPayloadError):
        async with rig.client.post("/v1/chat/completions", json={}) as r:
            assert r.status == 200
            await r.read()
    assert RECORD.status == 502 and RECORD.code == "backend_failed"


async def test_a_long_silence_is_waited_for_while_health_answers(rig: Rig) -> None:
    rig.server.delay = 4 * IDLE
    assert await chat(rig) == (200, {"text": "done"})
    assert await chat(rig, stream=True) == (200, [{"n": 1}, {"n": 2}])
    assert rig.wedged == []


async def test_a_wedged_stream_ends_with_an_error_event_and_is_reported(rig: Rig) -> None:
    rig.server.answer, rig.server.health = "stall", "silent"
    started = time.monotonic()
    status, events = await chat(rig, stream=True)
    took = time.monotonic() - started
    assert status == 200 and events[0] == {"n": 1}
    assert events[-1]["error"]["code"] == "backend_timeout", events
    assert IDLE + HEALTH <= took < IDLE + HEALTH + 2
    assert len(rig.wedged) == 1 and "/health" in rig.wedged[0]
    assert (RECORD.status, RECORD.code) == (504, "backend_timeout")  # not 200 in the log


async def test_a_stream_whose_backend_dies_ends_with_an_error_event_and_is_a_failure(
        rig: Rig) -> None:
    """The client gets a clean end (an error event), and the request log and
    llamad_requests_total say the answer failed, as for a plain answer cut halfway: a
    crash mid-stream was counted as a 200."""
    rig.server.answer = "die"
    status, events = await chat(rig, stream=True)
    assert status == 200
    assert events[-1]["error"]["code"] == "backend_failed", events
    assert (RECORD.status, RECORD.code) == (502, "backend_failed")


async def test_a_plain_error_to_a_begun_stream_is_its_last_event_and_a_failure(
        rig: Rig) -> None:
    """A stream that waited for its model's load has sent its 200 already; an error the
    backend then answers is the stream's last event, and the request log and
    llamad_requests_total say the backend's status, not 200."""
    rig.server.answer = "loading"  # a 503 of the backend's own: /health says it is up
    async with rig.client.post("/v1/chat/completions", json={"stream": True},
                               headers={"X-Begun": "1"}) as r:
        assert r.status == 200
        text = await r.text()
    assert text.endswith('data: {"error": {"message": "Loading model"}}\n\n'), text
    assert RECORD.status == 503


async def test_an_anthropic_stream_names_its_error_event(rig: Rig) -> None:
    """Anthropic's SDK reads only named events (llama-server writes `event: error` on
    /v1/messages): llamad's unnamed error event was a silent cut to it."""
    for answer, begun, code in (("die", {}, "backend_failed"),
                                ("loading", {"X-Begun": "1"}, None)):
        rig.server.answer = answer
        async with rig.client.post("/v1/messages", json={"stream": True},
                                   headers=begun) as r:
            text = await r.text()
        name, data = text.split("\n\n")[-2].split("\n")
        assert name == "event: error", text
        event = json.loads(data.removeprefix("data: "))
        assert event["type"] == "error" and event["error"].get("code") == code, event
    async with rig.client.post("/v1/chat/completions", json={"stream": True}) as r:
        assert "event:" not in await r.text()  # OpenAI's streams stay unnamed


async def test_a_backend_answering_other_requests_is_not_wedged(rig: Rig) -> None:
    """llama-server may leave /health queued behind requests in flight; a backend that
    answers other requests is alive, however long this one takes."""
    rig.server.health = "silent"
    slow = asyncio.ensure_future(chat(rig, delay=5 * IDLE))
    while not slow.done():
        assert await chat(rig) == (200, {"text": "done"})
        await asyncio.sleep(IDLE / 2)
    assert await slow == (200, {"text": "done"})
    assert rig.wedged == []


async def test_wedged_before_the_answer_is_504_and_reported(rig: Rig) -> None:
    rig.server.answer, rig.server.health = "silent", "silent"
    status, body = await chat(rig)
    assert status == 504 and body["error"]["code"] == "backend_timeout"
    assert len(rig.wedged) == 1


async def test_no_answer_is_unreachable_and_the_pool_is_dropped(rig: Rig) -> None:
    # Two connections in the pool (the backend answers once both requests are in, so a
    # busy machine cannot serve them one after the other on one connection), then the
    # backend hangs up on a request (as a dying process does); whatever is still pooled
    # may lead to the dead process.
    rig.server.together = 2
    assert [s for s, _ in await asyncio.gather(chat(rig), chat(rig))] == [200, 200]
    rig.server.together = 0
    pooled = list(rig.server.connections)
    assert len(pooled) == 2
    rig.server.answer = "hang-up"
    status, body = await chat(rig)
    assert status == 502 and body["error"]["code"] == "backend_unreachable"
    rig.server.answer = "ok"
    assert await chat(rig) == (200, {"text": "done"})
    assert rig.server.connections[-1] not in pooled


async def test_a_backend_loading_again_is_unreachable(rig: Rig) -> None:
    rig.server.answer, rig.server.health = "loading", "loading"
    status, body = await chat(rig)
    assert status == 502 and body["error"]["code"] == "backend_unreachable"
    # A 503 of its own from a healthy backend is passed on as it is.
    rig.server.health = "ok"
    status, body = await chat(rig)
    assert status == 503 and body["error"]["message"] == "Loading model"


async def test_closing_a_backend_never_cuts_a_live_answer(rig: Rig) -> None:
    rig.server.delay = 2 * IDLE
    pending = asyncio.ensure_future(chat(rig, stream=True))
    await eventually("the request to reach the backend", lambda: rig.server.connections)
    in_use = list(rig.backend._users)
    await rig.backend.close()
    assert await pending == (200, [{"n": 1}, {"n": 2}])
    assert in_use and all(session.closed for session in in_use)  # once the answer was in



@pytest.fixture
def spinning() -> Iterator[tuple[int, int]]:
    """Two processes that spin on a CPU, the second one stopped (SIGSTOP): their pids."""
    spin = [sys.executable, "-c", "while True: pass"]
    busy, stopped = subprocess.Popen(spin), subprocess.Popen(spin)
    try:
        stopped.send_signal(signal.SIGSTOP)
        wait_for("the process to stop", lambda: Path(f"/proc/{stopped.pid}/stat")
                 .read_text().rpartition(") ")[2].startswith("T"))
        yield busy.pid, stopped.pid
    finally:
        for p in (busy, stopped):
            p.kill()
            p.wait()


def test_cpu_ticks_tell_a_stopped_process_from_a_busy_one(spinning: tuple[int, int]) -> None:
    busy, stopped = spinning
    frozen, start = cpu_ticks(stopped), cpu_ticks(busy)
    assert frozen is not None and start is not None
    # While the busy one uses CPU (a tick is 10 ms of it), the stopped one uses none.
    wait_for("CPU time of the busy one", lambda: (cpu_ticks(busy) or 0) >= start + 5,
             timeout=30)
    assert cpu_ticks(stopped) == frozen
    assert cpu_ticks(0) is None and cpu_ticks(2**22 + 1) is None  # above pid_max: none


async def test_a_probe_counts_cpu_used_when_health_is_slow(rig: Rig,
                                                           spinning: tuple[int, int]) -> None:
    """/health unanswered: a process that computes is alive, a stopped one (or one llamad
    does not know) is not; a /health answer, whatever its status, is alive."""
    busy, stopped = spinning
    rig.server.health = "silent"
    assert await rig.backend.probe(1.0, busy) is True
    assert await rig.backend.probe(1.0, stopped) is False
    assert await rig.backend.probe(1.0, 0) is False
    rig.server.health = "loading"  # 503: an answer
    assert await rig.backend.probe(1.0, stopped) is True


async def test_a_silent_request_on_a_computing_backend_is_not_wedged(
        rig: Rig, spinning: tuple[int, int]) -> None:
    """No byte for many idle timeouts and /health unanswered, but the process computes (a
    long prefill on a busy machine): the answer is waited for."""
    busy, _ = spinning
    rig.server.health, rig.server.delay = "silent", 6 * IDLE
    # A probe window long enough for the spinner to be scheduled on a machine whose cores
    # are taken (in 0.3 s at load 12 it may get no clock tick at all).
    watched = Watch(IDLE, 5 * HEALTH, rig.wedged.append, lambda: busy)

    async def handle(request: web.Request) -> web.StreamResponse:
        return await forward(request, rig.backend, await request.read(), watched)
    front = web.Application(middlewares=[error_middleware])
    front.router.add_post("/v1/chat/completions", handle)
    async with TestClient(TestServer(front)) as client:
        r = await client.post("/v1/chat/completions", json={})
        assert (r.status, await r.json()) == (200, {"text": "done"})
    assert rig.wedged == []


@pytest.fixture(scope="module")
def llama_url() -> Iterator[str]:
    with llamaserver.running("-t", "1", "-c", "512", "-np", "1") as url:
        yield url


async def test_a_streams_connection_is_never_reused(llama_url: str) -> None:
    """The real llama-server hangs up once a stream ends, though it says keep-alive: a
    request sent on that connection before the hang-up is seen failed as if the backend
    were gone (503, and the supervisor checked the model as if it had crashed). Sent at
    once, as the next request to a busy llamad may be, it failed every time."""
    backend = Backend(llama_url)
    request = make_mocked_request("POST", "/api/chat")
    for _ in range(5):
        async with exchange(request, backend, "/v1/chat/completions", _hi(stream=True),
                            Watch(60, 60, print)) as up:
            assert up.status == 200 and up.streamed
            assert b"".join([c async for c in up.chunks()]).endswith(b"data: [DONE]\n\n")
        async with backend.session().post(backend.base_url + "/v1/chat/completions",
                                          data=_hi(stream=False)) as r:
            assert r.status == 200 and (await r.json())["choices"]
    await backend.close()


def _hi(stream: bool) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                       "stream": stream}).encode()
