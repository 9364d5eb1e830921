"""Ollama's API as Ollama's own clients see it, where llamad's translation once differed from
Ollama: long strings in a body, tool-call arguments, an /api/embed that fails in a later
batch, a chat history longer than the context. The translation runs in-process against a
real llama-server (the bundled Gemma, a 512-token context); the client is ollama-python."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import ollama as ollama_client
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import llamaserver

from llamad.api import ollama
from llamad.api import ollama_models as models
from llamad.api import ollama_translate as tr
from llamad.api.forward import Watch
from llamad.api.proxy import Send
from llamad.config import Config
from llamad.errors import BackendUnreachable, LlamadError
from llamad.http import limits, middleware, record
from llamad.supervisor.backend import Backend

CTX = 512


@pytest.fixture(scope="module")
def llama_url() -> Iterator[str]:
    """One real llama-server for the module: chat and embeddings, one slot of CTX tokens."""
    with llamaserver.running("-t", "2", "-c", str(CTX), "-np", "1", "--embeddings",
                             "--pooling", "mean") as url:
        yield url


@pytest.fixture
async def front(llama_url: str) -> AsyncIterator[str]:
    """llamad's Ollama routes, minus the supervisor (no model to find, load or hold): the
    handlers' translation and senders, to the real llama-server."""
    backend = Backend(llama_url)

    async def run(request: web.Request, send: Send, body: bytes = b"") -> web.StreamResponse:
        for again in (False, True):
            try:
                return await send(request, backend, body, Watch(60, 60, print),
                                  record.TapResponse(record.of(request)))
            except BackendUnreachable:
                # As proxy.proxied: sent once more (llama-server may have closed a pooled
                # connection after a streamed answer, as it does now and then).
                if again:
                    raise
        raise AssertionError("not reached")

    async def chat(request: web.Request) -> web.StreamResponse:
        req = await ollama.read_request(request)
        stream = tr.flag("stream", req.get("stream"), True)
        reply = tr.Reply(req["model"], tr.CHAT, stream)
        body = tr.chat_body(req, req["messages"], stream, CTX)
        truncate = tr.flag("truncate", req.get("truncate"), True)  # as handle_chat
        return await run(request, ollama._sender(tr.CHAT_PATH, reply, body if truncate
                                                  else None), json.dumps(body).encode())

    async def embed(request: web.Request) -> web.StreamResponse:
        req = await ollama.read_request(request)
        fit = models.Fit(CTX, tr.flag("truncate", req.get("truncate"), True))
        return await run(request, ollama._embed_sender(
            req["model"], tr.embed_inputs(req.get("input")), req.get("dimensions"), fit))

    lim = limits.Limits(Config.default())
    app = web.Application(middlewares=[lim.middleware, middleware.error_middleware])
    app[limits.LIMITS] = lim
    app.on_cleanup.append(lim.close)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/embed", embed)
    async with TestClient(TestServer(app)) as client:
        yield str(client.make_url("/"))
    await backend.close()


# -- A: a long string is one item, however many commas it holds -----------------------------

async def test_long_strings_are_not_counted_as_json_items() -> None:
    """A CSV in a chat message (355 KB, 54,000 commas) and LangChain's embed_documents (all
    texts in one /api/embed) are what Ollama takes; only structure counts, as json.loads
    builds an object for each item, not for each comma in a string."""
    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"keys": sorted(await ollama.read_request(request))})

    lim = limits.Limits(Config.default())
    app = web.Application(middlewares=[lim.middleware, middleware.error_middleware])
    app[limits.LIMITS] = lim
    app.on_cleanup.append(lim.close)
    app.router.add_post("/api/chat", handle)
    csv = "\n".join(",".join(str(i * 10 + j) for j in range(10)) for i in range(6000))
    chunk = ("The quick brown fox, as the story goes, jumped over the lazy dog; "
             "[then] {after} a pause, it ran on. \\\" " * 12)[:800]
    async with TestClient(TestServer(app)) as client:
        for body in ({"model": "m", "messages": [{"role": "user", "content": csv}]},
                     {"model": "m", "input": [chunk] * 2000}):
            r = await client.post("/api/chat", data=io.BytesIO(json.dumps(body).encode()))
            assert (r.status, await r.json()) == (200, {"keys": sorted(body)})
        # What the bound is for still holds: many small items are refused, as before.
        many = json.dumps({"model": "m", "input": ["a"] * (ollama.MAX_ITEMS + 1)}).encode()
        r = await client.post("/api/chat", data=io.BytesIO(many))
        assert r.status == 413 and "JSON items" in (await r.json())["error"]


# -- B: tool-call arguments are an object, or the answer is an error, as Ollama's -----------

def test_tool_call_arguments_that_are_not_an_object_are_an_error() -> None:
    """Ollama (llm/llama_server.go, accumulatedToolCalls) decodes llama-server's arguments
    into an object or fails the request; ollama-python takes nothing else."""
    for text in ("not json", "[1, 2]", '"x"', "{"):
        reply = tr.Reply("m", tr.CHAT, stream=False)
        reply.event({"choices": [{"message": {"content": None, "tool_calls": [
            {"id": "c", "function": {"name": "f", "arguments": text}}]},
            "finish_reason": "tool_calls"}]})
        with pytest.raises(LlamadError) as e:
            reply.last(1.0, 0.0)
        assert e.value.status == 500 and "invalid tool call arguments for 'f'" in \
            e.value.message, text
    reply = tr.Reply("m", tr.CHAT, stream=False)
    reply.event({"choices": [{"message": {"tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": " "}}]}, "finish_reason": "stop"}]})
    (done,) = reply.last(1.0, 0.0)
    assert done["message"]["tool_calls"][0]["function"]["arguments"] == {}
    ollama_client.ChatResponse(**done)  # what ollama-python validates


# -- C: /api/embed checks every input before it answers -------------------------------------

async def test_a_too_long_input_in_a_later_batch_is_an_ollama_error(front: str) -> None:
    async with ollama_client.AsyncClient(host=front) as client:
        await _embed_checks(client)


async def _embed_checks(client: ollama_client.AsyncClient) -> None:
    long = "word " * 3000
    for inputs in (["short"] * 3 + [long], ["short"] * (ollama.EMBED_BATCH + 1) + [long]):
        with pytest.raises(ollama_client.ResponseError) as e:
            await client.embed(model="gemma", input=inputs, truncate=False)
        assert (e.value.status_code, e.value.error) == (
            400, "the input length exceeds the context length"), len(inputs)
    got = await client.embed(model="gemma", input=["short"] * (ollama.EMBED_BATCH + 1) + [long])
    assert len(got.embeddings) == ollama.EMBED_BATCH + 2  # truncate (the default): cut to fit


# -- D: a history longer than the context loses its oldest messages, as in Ollama -----------

def _history(turns: int) -> list[dict[str, Any]]:
    said = [{"role": "user" if n % 2 == 0 else "assistant", "content": f"turn {n}: " +
             "word " * 60} for n in range(turns)]
    return [{"role": "system", "content": "Be brief."}, *said,
            {"role": "user", "content": "Say hi."}]


async def test_a_long_history_drops_its_oldest_messages(front: str) -> None:
    messages = _history(40)  # some 2,800 tokens into 512
    async with ollama_client.AsyncClient(host=front) as client:
        done = await client.chat(model="gemma", messages=messages, options={"num_predict": 4})
        parts = [p async for p in await client.chat(
            model="gemma", messages=messages, stream=True, options={"num_predict": 4})]
        for answer in (done, parts[-1]):
            assert answer.done and 0 < (answer.prompt_eval_count or 0) < CTX, answer
        # The latest message always stays (as in Ollama): if it alone is too long, the
        # model's own refusal comes back.
        with pytest.raises(ollama_client.ResponseError) as e:
            await client.chat(model="gemma", messages=[
                *messages[:5], {"role": "user", "content": "word " * 600}])
        assert e.value.status_code == 400 and "context size" in e.value.error
    # What went: the oldest turns; what stayed: the system message and the latest turns.
    kept = models.kept_messages(messages, 30)
    assert [m["content"] for m in kept] == ["Be brief."] + \
        [m["content"] for m in messages[30:]]
    # truncate: false asks for llama-server's refusal, as Ollama's own 400 (ollama-python
    # has no `truncate` for chat: Ollama's Go client and curl send it).
    async with aiohttp.ClientSession() as session:
        r = await session.post(front + "api/chat", json={
            "model": "gemma", "messages": messages, "stream": False, "truncate": False})
        assert r.status == 400 and "exceeds the available context size" in \
            (await r.json())["error"]
