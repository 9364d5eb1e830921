"""Requests for a model: resolve it, wait until it is ready, hand the request to forward."""

from __future__ import annotations

import functools
import logging

from aiohttp import web

from llamad import keys
from llamad.api import resolve, supervisor
from llamad.backend import Backend
from llamad.body import parse_keep_alive, read_json
from llamad.errors import BackendUnreachable
from llamad.forward import Watch, forward
from llamad.slot import Slot
from llamad.supervisor import Supervisor

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
    return await _proxied(request, slot, body, keep_alive)


async def _proxied(request: web.Request, slot: Slot, body: bytes,
                   keep_alive: float | None = None) -> web.StreamResponse:
    sup = supervisor(request)
    try:
        async with sup.use(slot, keep_alive) as backend:
            return await forward(request, backend, body, _watch(sup, slot, backend))
    except BackendUnreachable:
        # Nothing came back, so the model never answered: once systemd has restarted the
        # backend (use() waits for that), send it one more time.
        async with sup.use(slot, keep_alive) as backend:
            return await forward(request, backend, body, _watch(sup, slot, backend))


def _watch(sup: Supervisor, slot: Slot, backend: Backend) -> Watch:
    """A backend found wedged is reported to the supervisor, which has its unit restarted."""
    return Watch(sup.config.backend_idle_timeout, sup.config.health_timeout,
                 functools.partial(sup.restart_wedged, slot, backend))


async def handle_get_model(request: web.Request) -> web.StreamResponse:
    sup = supervisor(request)
    name = request.query.get("model")
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
