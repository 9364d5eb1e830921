"""Every route of the pinned llama-server (proxy.ROUTES) through llamad, with the real model.

Each request goes once through llamad and once straight to the model's own llama-server
(its UNIX socket, reached through the box's /proc/<init>/root). llamad must answer as the
model does: the same status, and for an error the model's own JSON, never llamad's 400.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import rig
from helpers.daemon import Factory

from llamad.api.proxy import FORM, QUERY, ROUTES

# Generation on gemma-a (with --metrics), embeddings on gemma-e.
PRESET = "[gemma-a]\nmetrics = true\n[gemma-e]\nembeddings = true\npooling = mean\n"
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
BODIES: dict[str, dict[str, Any]] = {
    "/completion": {"prompt": "Hi", "n_predict": 2},
    "/completions": {"prompt": "Hi", "max_tokens": 2},
    "/v1/completions": {"prompt": "Hi", "max_tokens": 2},
    "/chat/completions": CHAT, "/v1/chat/completions": CHAT,
    "/v1/chat/completions/control": {"id": "chatcmpl-none", "action": "reasoning_end"},
    "/v1/responses": {"input": "Hi", "max_output_tokens": 2},
    "/responses": {"input": "Hi", "max_output_tokens": 2},
    "/v1/messages": CHAT, "/v1/messages/count_tokens": {"messages": CHAT["messages"]},
    "/infill": {"input_prefix": "def f(", "input_suffix": "):", "n_predict": 2},
    "/embedding": {"content": "Hi"}, "/embeddings": {"content": "Hi"},
    "/v1/embeddings": {"input": "Hi"},
    "/rerank": {"query": "a", "documents": ["b"]}, "/reranking": {"query": "a",
                                                                  "documents": ["b"]},
    "/v1/rerank": {"query": "a", "documents": ["b"]},
    "/v1/reranking": {"query": "a", "documents": ["b"]},
    "/v1/systemone": {"input": "Hi"},
    "/tokenize": {"content": "Hi"}, "/detokenize": {"tokens": [2, 3]},
    "/apply-template": {"messages": CHAT["messages"]},
    "/chat/completions/input_tokens": {"messages": CHAT["messages"]},
    "/v1/chat/completions/input_tokens": {"messages": CHAT["messages"]},
    "/responses/input_tokens": {"input": "Hi"}, "/v1/responses/input_tokens": {"input": "Hi"},
    "/props": {}, "/lora-adapters": {}, "/slots/{id_slot}": {"filename": "x.bin"},
}
EMBEDDING = {"/embedding", "/embeddings", "/v1/embeddings"}


def request(method: str, path: str, kind: str, model: str) -> dict[str, Any]:
    """aiohttp request arguments for one route, naming `model` where the route wants it."""
    url = path.replace("{id_slot}", "0")
    if kind == QUERY:
        return {"method": method, "url": url, "params": {"model": model}}
    if kind == FORM:
        form = aiohttp.FormData()
        form.add_field("model", model)
        form.add_field("file", b"RIFF\x00\x00\x00\x00WAVE", filename="a.wav",
                       content_type="audio/wav")
        return {"method": method, "url": url, "data": form}
    params = {"action": "save"} if "{id_slot}" in path else {}
    return {"method": method, "url": url, "params": params,
            "json": {**BODIES[path], "model": model}}


async def answer(s: aiohttp.ClientSession, base: str, args: dict[str, Any]) -> tuple[int, Any]:
    async with s.request(**{**args, "url": base + args["url"]}) as r:
        text = (await r.read()).decode(errors="replace")
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


async def test_every_route_reaches_the_model(llamad_factory: Factory, box: rig.Box) -> None:
    # kv-cache = no: with llamad keeping the KV caches (the default) the slot files are
    # its own, and a client's /slots save or restore is refused (test_security_http).
    d = llamad_factory(["gemma-a", "gemma-e"], preset=PRESET, **{"kv-cache": "no"})
    run = f"/proc/{box.pid}/root/run/llamad"
    seen: list[tuple[str, str, int]] = []
    async with aiohttp.ClientSession() as s:
        for model in ("gemma-a", "gemma-e"):
            async with s.post(d.url + "/v1/completions",
                              json={"model": model, "prompt": "Hi", "max_tokens": 1}) as r:
                assert r.status in (200, 501), await r.text()  # loads it
        direct = {m: aiohttp.ClientSession(connector=aiohttp.UnixConnector(
            path=f"{run}/{m}/llama.sock")) for m in ("gemma-a", "gemma-e")}
        try:
            for method, path, kind in ROUTES:
                model = "gemma-e" if path in EMBEDDING else "gemma-a"
                via, body = await answer(s, d.url, request(method, path, kind, model))
                own, own_body = await answer(direct[model], "http://localhost",
                                             request(method, path, kind, model))
                seen.append((method, path, via))
                assert via == own, (method, path, via, body, own_body)
                if via >= 400:
                    # The model's own error, passed through: not one of llamad's.
                    assert isinstance(body, dict) and "source" not in body.get("error", {}), \
                        (path, body)
                    assert body == own_body, (path, body, own_body)
        finally:
            for c in direct.values():
                await c.close()
    print("\n".join(f"{m} {p} -> {status}" for m, p, status in seen))
    assert {status for _, _, status in seen} & {200} and len(seen) == len(ROUTES)
    assert d.starts("gemma-a") == 1 and d.starts("gemma-e") == 1


async def test_routes_llamad_answers(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"])
    async with aiohttp.ClientSession() as s:
        for method, path, body, want in [
                ("GET", "/v1/health", None, 200),
                ("GET", "/v1/stream?conv_id=nope", None, 404),
                ("DELETE", "/v1/stream?conv_id=nope", None, 204),
                ("POST", "/v1/streams/lookup", {"conversation_ids": ["nope"]}, 200),
                ("GET", "/cors-proxy", None, 403), ("POST", "/tools", {}, 403),
                # Downloads go to llama.cpp's cache, which this llamad does not serve
                # (test_downloads.py downloads).
                ("POST", "/models", {"model": "u/r:Q4_0"}, 400),
                ("DELETE", "/models?model=u/r:Q4_0", None, 404),
                ("DELETE", "/v1/models/u/r:Q4_0", None, 404)]:
            async with s.request(method, d.url + path, json=body) as r:
                assert r.status == want, (method, path, r.status, await r.text())
    assert d.model_units() == {}
