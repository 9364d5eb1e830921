"""Requests for a model: resolve it, wait until it is ready, hand the request to forward.

ROUTES is the one table of llama-server's HTTP routes (its tools/server/server.cpp in
router mode) and how llamad finds each one's model: the JSON body's "model", the "model"
field of a multipart form, or `?model=` of a GET. Routes llamad answers itself are in
api.py (models, load, unload, health, /props without a model) and streams.py (resuming
a conversation's stream).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from llamad.api import peerforward, progress, streams
from llamad.api.forward import Watch, forward, watch
from llamad.api.models import router_props
from llamad.errors import BackendUnreachable, BadRequest, LlamadError, NotFound
from llamad.http import browsers, keys, multipart
from llamad.http.body import BOUNDED, check_bounds, parse_keep_alive, read_json
from llamad.http.context import find, resolve, supervisor
from llamad.observe import metrics
from llamad.supervisor.backend import Backend
from llamad.supervisor.events import State
from llamad.supervisor.slot import Slot

log = logging.getLogger("llamad.proxy")

JSON, FORM, QUERY = "json", "form", "query"  # where a request names its model
ROUTES: tuple[tuple[str, str, str], ...] = (
    *(("POST", path, JSON) for path in (
        "/completion", "/completions", "/v1/completions", "/chat/completions",
        "/v1/chat/completions", "/v1/chat/completions/control", "/v1/responses", "/responses",
        "/v1/messages", "/v1/messages/count_tokens", "/infill", "/embedding", "/embeddings",
        "/v1/embeddings", "/rerank", "/reranking", "/v1/rerank", "/v1/reranking",
        "/v1/systemone", "/tokenize", "/detokenize", "/apply-template",
        "/chat/completions/input_tokens", "/v1/chat/completions/input_tokens",
        "/responses/input_tokens", "/v1/responses/input_tokens", "/props",
        "/lora-adapters", "/slots/{id_slot}")),
    ("POST", "/v1/audio/transcriptions", FORM),
    ("POST", "/audio/transcriptions", FORM),
    *(("GET", path, QUERY) for path in ("/props", "/slots", "/metrics", "/lora-adapters")),
)
# Routes that change or show what every client of a model shares: its slots (their saved
# files, other tenants' request settings), its LoRA scales, its properties. With API keys
# only admin keys reach them.
SHARED = frozenset({("POST", "/slots/{id_slot}"), ("GET", "/slots"), ("POST", "/props"),
                    ("POST", "/lora-adapters")})
# Slot actions that name a file in the model's --slot-save-path: with kv-cache = yes that is
# llamad's own directory of saved caches, which no client names files in.
FILE_ACTIONS = ("save", "restore")
# Off in router mode unless llama-server is started with --ui-mcp-proxy or --tools,
# neither of which llamad offers.
DISABLED = ("/cors-proxy", "/tools")
_WAITING = (State.STARTING, State.LOADING, State.READY, State.SLEEPING)
# How a request reaches its backend once the model is ready: forward() passes it on as it
# is; a translation (ollama.py) sends its own request and answers in its own shape.
Send = Callable[[web.Request, Backend, bytes | bytearray, Watch, web.StreamResponse],
                Awaitable[web.StreamResponse]]


def autoload(request: web.Request) -> bool:
    """`?autoload=false` (or `0`) asks not to load the model, as in router mode."""
    value = request.query.get("autoload")
    if value is None:
        return supervisor(request).config.models_autoload
    return value in ("true", "1")


async def handle_post(request: web.Request) -> web.StreamResponse:
    body, data = await read_json(request, *BOUNDED)
    check_bounds(data)
    try:
        slot = await find(request, data.get("model"))
    except NotFound as e:  # perhaps a peer's model (try costs nothing on the local path)
        return await peerforward.elsewhere(request, e, body, data.get("model"))
    keep_alive = keys.admins_say(request, parse_keep_alive(data.get("keep_alive")))
    stream = data.get("stream") is True
    if not request.headers.get(streams.HEADER):
        return await proxied(request, slot, body, keep_alive, stream)
    return await _conversation(request, slot, body, keep_alive, stream)


async def _conversation(request: web.Request, slot: Slot, body: bytes | bytearray,
                        keep_alive: float | None, stream: bool) -> web.StreamResponse:
    """A request of a conversation (X-Conversation-Id, llama.cpp's web UI), as in the
    router: it goes on when its client leaves (a page reloaded while the model loads), and
    the model keeps the answer in the conversation's stream, which GET /v1/stream resumes;
    only a stop (DELETE /v1/stream) cancels it, also while the model loads."""
    unless_stopped = streams.remember(request, slot)

    async def send(request: web.Request, backend: Backend, body: bytes | bytearray,
                   watch: Watch, out: web.StreamResponse) -> web.StreamResponse:
        unless_stopped()
        return await forward(request, backend, body, watch, out)
    task = asyncio.ensure_future(proxied(request, slot, body, keep_alive, stream, send,
                                         detached=True))
    task.add_done_callback(_left_behind)
    return await asyncio.shield(task)


def _left_behind(task: asyncio.Task[web.StreamResponse]) -> None:
    """Whatever ended a conversation's request is its handler's to report; with its client
    gone there is none, and nobody to tell."""
    if not task.cancelled() and (e := task.exception()) is not None:
        log.debug("a conversation's request ended: %r", e)


@browsers.takes_files
async def handle_form(request: web.Request) -> web.StreamResponse:
    """Multipart uploads (audio transcriptions) name the model in a form field."""
    if not request.content_type.startswith("multipart/form-data"):
        return await handle_post(request)
    body, name = await multipart.read_field(request, "model")
    try:
        slot = resolve(request, name)
    except NotFound as e:
        return await peerforward.elsewhere(request, e, body, name)
    return await proxied(request, slot, body)


async def handle_get(request: web.Request) -> web.StreamResponse:
    name = request.query.get("model")
    if name is None and request.path == "/metrics":
        return await metrics.handle(request)  # llamad's own, for Prometheus
    if name is None and request.path == "/props":
        return await router_props(request)
    try:
        slot = resolve(request, name)
    except NotFound as e:
        return await peerforward.elsewhere(request, e, b"", name)
    return await proxied(request, slot, b"")


async def proxied(request: web.Request, slot: Slot, body: bytes | bytearray,
                  keep_alive: float | None = None, stream: bool = False,
                  send: Send = forward, detached: bool = False) -> web.StreamResponse:
    """`stream`: the client reads server-sent events, so load progress may go out as SSE
    comments before the answer (progress.py). `detached`: the request is sent even if its
    client left during the load (_conversation)."""
    sup = supervisor(request)
    wait = progress.Wait(request, sup, slot, stream, detached)
    load = autoload(request)
    if not load and slot.state not in _WAITING:
        raise BadRequest(f"model {slot.model.id} is not loaded and this request does not "
                         "load it (autoload is off); POST /models/load loads it",
                         code="model_not_loaded")
    async with wait:  # an error once load progress went out ends the stream instead
        try:
            async with sup.use(slot, keep_alive, load=load) as backend:
                if sup.config.debug_request_delay:
                    await asyncio.sleep(sup.config.debug_request_delay)
                return await send(request, backend, body, watch(sup, slot, backend),
                                  await wait.done())
        except BackendUnreachable:
            if not load:
                raise
            # Nothing came back, so the model never answered: once systemd has restarted
            # the backend (use() waits for that), send it one more time.
            async with sup.use(slot, keep_alive, load=load) as backend:
                return await send(request, backend, body, watch(sup, slot, backend),
                                  await wait.done())
    return wait.response


@keys.admin_only
async def handle_shared(request: web.Request) -> web.StreamResponse:
    """SHARED routes: admin keys only."""
    if request.method == "GET":
        return await handle_get(request)
    if request.path.startswith("/slots/") and request.query.get("action") in FILE_ACTIONS \
            and supervisor(request).config.kv_cache != "no":
        raise browsers.Refused("llamad keeps the models' KV caches itself (kv-cache = "
                               f"{supervisor(request).config.kv_cache}): their slot files "
                               "are its own; POST /slots/ID?action=erase still works (with "
                               "kv-cache = no llama-server's slot files are yours)",
                               code="slot_files_are_llamads")
    return await handle_post(request)


async def handle_disabled(request: web.Request) -> web.Response:
    err = LlamadError(f"{request.path} is not offered by llamad (in llama-server it needs "
                      "--ui-mcp-proxy or --tools)", status=403, code="feature_disabled")
    err.type = "feature_disabled"
    return web.json_response(err.body(), status=403)


def add_routes(app: web.Application) -> None:
    handlers: dict[str, Any] = {JSON: handle_post, FORM: handle_form, QUERY: handle_get}
    for method, path, kind in ROUTES:
        shared = (method, path) in SHARED
        app.router.add_route(method, path, handle_shared if shared else handlers[kind])
    streams.add_routes(app)
    for path in DISABLED:
        app.router.add_get(path, handle_disabled)
        app.router.add_post(path, handle_disabled)
