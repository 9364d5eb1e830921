"""A model spread over a llama.cpp RPC worker on another host (issue #15, part 1).

Two boxes play two machines, each with an address of its own on loopback: llamad and its
model units in the session box on 127.0.0.2, the shipped llamad-rpc-worker.service in a
second box on 127.0.0.3 (tests/helpers/rpcworker.py). The real llama-server (built with RPC) and
ggml-rpc-server, the real Gemma model.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import aiohttp
import pytest
import rig
from helpers.daemon import Factory, chat, models, wait_state
from helpers.rpcworker import RpcWorker

pytestmark = pytest.mark.integration

MODEL = "gemma-rpc"


@pytest.fixture(scope="module")
def worker(second_box: rig.Box) -> Iterator[RpcWorker]:
    w = RpcWorker(second_box, host="127.0.0.3")
    w.start()
    yield w
    w.stop()


async def long_stream(url: str, stop_after: int, on_event: object) -> list[bytes]:
    """A streamed completion of many tokens; `on_event()` once `stop_after` events came."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 400, "stream": True, "ignore_eos": True}
    lines: list[bytes] = []
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions",
                                                    json=body) as r:
        assert r.status == 200
        async for line in r.content:
            if line.startswith(b"data: "):
                lines.append(line[6:].strip())
                if len(lines) == stop_after:
                    await asyncio.to_thread(on_event)  # type: ignore[arg-type]
    return lines


def test_a_model_over_a_remote_worker_answers_fails_clearly_and_recovers(
        llamad_factory: Factory, worker: RpcWorker) -> None:
    before = worker.rss()
    d = llamad_factory([MODEL], preset=f"[{MODEL}]\nrpc = {worker.address}\n",
                       host="127.0.0.2")

    async def ask() -> tuple[int, dict[str, object]]:
        async with aiohttp.ClientSession() as s:
            return await chat(s, d.url, MODEL, "Say hello.", max_tokens=8)

    # 1. It answers, with its layers on the worker and its unit reaching only the worker.
    status, body = asyncio.run(ask())
    assert status == 200, body
    assert "Accepted client connection" in worker.journal()
    assert worker.rss() > before + 150 * 1024**2  # the layers and the tied head's copy
    unit = f"llama-server@{MODEL}.service"
    assert d.show(unit, "PrivateNetwork") == "no"
    assert d.show(unit, "IPAddressAllow") == "127.0.0.3/32"
    assert set(d.show(unit, "IPAddressDeny").split()) == {"0.0.0.0/0", "::/0"}
    entry = models(d.url)[MODEL]["llamad"]
    assert entry["rpc"]["workers"] == [worker.address]
    assert entry["need"]["ram"] == entry["rpc"]["local"] and entry["need"]["vram"] == 0

    # 2. The worker stops in the middle of a stream: the stream ends with an error event
    # rather than hanging, and the model fails naming the worker.
    lines = asyncio.run(long_stream(d.url, 3, worker.stop))
    assert json.loads(lines[-1])["error"]["code"] == "backend_failed", lines[-3:]
    wait_state(d.url, MODEL, "failed", timeout=60)
    reason = models(d.url)[MODEL]["llamad"]["reason"]
    assert f"rpc worker {worker.address} went away (Connection refused)" in reason
    starts = d.starts(MODEL)
    # A request while it is down says so at once and starts nothing.
    began = time.monotonic()
    status, body = asyncio.run(ask())
    assert status == 503, body
    error = body["error"]
    assert isinstance(error, dict) and error["code"] == "rpc_worker_unreachable"
    assert f"rpc worker {worker.address} does not answer" in error["message"]
    assert time.monotonic() - began < 5
    assert d.starts(MODEL) == starts and not d.model_units()

    # 3. The worker is back: the next request loads the model again.
    worker.start()
    status, body = asyncio.run(ask())
    assert status == 200, body
    assert d.starts(MODEL) == starts + 1
    rig.wait_for("the model to be ready", lambda: models(d.url)[MODEL]["llamad"]["state"]
                 == "ready", timeout=10)
