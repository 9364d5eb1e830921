"""Requests for a model: resolve it, wait until it is ready, hand the request to forward."""

from __future__ import annotations

import logging

from aiohttp import web

from llamad import keys, metrics, progress
from llamad.api import resolve, supervisor
from llamad.body import parse_keep_alive, read_json
from llamad.errors import BackendUnreachable
from llamad.forward import forward
from llamad.slot import Slot

log = logging.getLogger("llamad.proxy")

# Endpoints served by llama-server itself, routed by the body's "model".
POST_ROUTES = (
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
    "/completion", "/v1/embeddings", "/embeddings", "/embedding", "/v1/rerank", "/rerank",
    "/reranking", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/infill",
    "/tokenize", "/detokenize", "/apply-template",
)
# Routed by ?model=.
GET_ROUTES = ("/props", "/slots", "/metrics")

async def handle_post(request: web.Request) -> web.StreamResponse:
    body, data = await read_json(request)
    slot = resolve(request, data.get("model"))
    keep_alive = parse_keep_alive(data.get("keep_alive"))
    if keep_alive is not None:
        keys.require_admin(request, "keep_alive")
    return await _proxied(request, slot, body, keep_alive, stream=data.get("stream") is True)


async def _proxied(request: web.Request, slot: Slot, body: bytes,
                   keep_alive: float | None = None, stream: bool = False) -> web.StreamResponse:
    sup = supervisor(request)
    wait = progress.Wait(request, sup, slot, stream)
    async with wait:  # an error once load progress went out ends the stream instead
        try:
            async with sup.use(slot, keep_alive) as backend:
                return await forward(request, backend, body, await wait.done())
        except BackendUnreachable:
            # Nothing reached the model, so sending it again is safe: once systemd has
            # restarted the backend (use() waits for that), try one more time.
            async with sup.use(slot, keep_alive) as backend:
                return await forward(request, backend, body, await wait.done())
    return wait.response


async def handle_get_model(request: web.Request) -> web.StreamResponse:
    sup = supervisor(request)
    name = request.query.get("model")
    if name is None and request.path == "/metrics":
        return await metrics.handle(request)  # llamad's own, for Prometheus
    if name is None and request.path == "/props":
        return web.json_response({"role": "router", "llamad": True,
                                  "models": len(sup.slots)})
    return await _proxied(request, resolve(request, name), b"")


def add_routes(app: web.Application) -> None:
    r = app.router
    for path in POST_ROUTES:
        r.add_post(path, handle_post)
    for path in GET_ROUTES:
        r.add_get(path, handle_get_model)
