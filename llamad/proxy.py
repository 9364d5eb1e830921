"""aiohttp handlers: resolve the model, wait until it is ready, stream to and from it."""

from __future__ import annotations

import json
import logging
import re
import weakref
from typing import Any

import aiohttp
from aiohttp import web

from llamad import report
from llamad.backend import Backend
from llamad.errors import BackendError, BackendUnreachable, BadRequest, LlamadError
from llamad.scheduler import State
from llamad.slot import Slot
from llamad.supervisor import Supervisor

log = logging.getLogger("llamad.proxy")

# aiohttp 3.8 (Debian 12) has no AppKey; later releases warn about plain string keys.
SUPERVISOR: Any = web.AppKey("supervisor", Supervisor) if hasattr(web, "AppKey") else "supervisor"


def supervisor(request: web.Request) -> Supervisor:
    sup: Supervisor = request.app[SUPERVISOR]
    return sup

# Endpoints served by llama-server itself, routed by the body's "model".
POST_ROUTES = (
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
    "/completion", "/v1/embeddings", "/embeddings", "/embedding", "/v1/rerank", "/rerank",
    "/reranking", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/infill",
    "/tokenize", "/detokenize", "/apply-template",
)
# Routed by ?model=.
GET_ROUTES = ("/props", "/slots", "/metrics")

HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "authorization", "x-api-key",
))


def _forward_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)?")


def parse_keep_alive(value: object) -> float | None:
    """Ollama's keep_alive: seconds, or "5m"/"1h"/"30s"; negative keeps the model loaded."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("keep_alive must be a duration like \"5m\" or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.fullmatch(str(value).strip())
        if not m:
            raise BadRequest(f"keep_alive {value!r} is not a duration like \"5m\", \"30s\" or 0")
        unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
        seconds = float(m.group(1)) * unit
    return -1.0 if seconds < 0 else seconds


async def read_json(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    body = await request.read()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    return body, data


async def handle_post(request: web.Request) -> web.StreamResponse:
    sup = supervisor(request)
    body, data = await read_json(request)
    slot = sup.resolve(data.get("model"))
    keep_alive = parse_keep_alive(data.get("keep_alive"))
    return await _proxied(request, slot, body, keep_alive)


async def _proxied(request: web.Request, slot: Slot, body: bytes,
                   keep_alive: float | None = None) -> web.StreamResponse:
    sup = supervisor(request)
    try:
        async with sup.use(slot, keep_alive) as backend:
            return await forward(request, backend, body)
    except BackendUnreachable:
        # Nothing reached the model, so sending it again is safe: once systemd has
        # restarted the backend (use() waits for that), try one more time.
        async with sup.use(slot, keep_alive) as backend:
            return await forward(request, backend, body)


async def handle_get_model(request: web.Request) -> web.StreamResponse:
    sup = supervisor(request)
    name = request.query.get("model")
    if name is None and request.path == "/props":
        return web.json_response({"role": "router", "llamad": True,
                                  "models": len(sup.slots)})
    return await _proxied(request, sup.resolve(name), b"")


async def forward(request: web.Request, backend: Backend, body: bytes) -> web.StreamResponse:
    url = backend.base_url + request.path_qs
    try:
        async with backend.session().request(
                request.method, url, data=body or None,
                headers=_forward_headers(request.headers)) as up:
            if up.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await _stream(request, up)
            data = await up.read()
            return web.Response(status=up.status, body=data, headers=_forward_headers(up.headers))
    except aiohttp.ClientConnectorError as e:
        raise BackendUnreachable(f"the model's backend refused the connection ({_why(e)}); "
                                 "systemd restarts it, retry shortly") from e
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        raise BackendError(f"the model's backend failed before answering ({_why(e)}); "
                           "systemd restarts it, retry shortly") from e


async def _stream(request: web.Request, up: aiohttp.ClientResponse) -> web.StreamResponse:
    resp = web.StreamResponse(status=up.status, headers=_forward_headers(up.headers))
    resp.headers["X-Accel-Buffering"] = "no"
    resp.headers["Cache-Control"] = "no-cache"
    await resp.prepare(request)
    try:
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
    except (TimeoutError, aiohttp.ClientError) as e:
        # Headers are gone already: tell the client in the stream, never truncate silently.
        err = BackendError(f"the model's backend failed mid-stream ({_why(e)})")
        await resp.write(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
    await resp.write_eof()
    return resp


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__


# -- management API ------------------------------------------------------------

ROUTER_STATUS = {"unloaded": "unloaded", "starting": "loading", "loading": "loading",
                 "ready": "loaded", "stopping": "unloaded", "failed": "unloaded"}


def model_entry(sup: Supervisor, slot: Slot) -> dict[str, Any]:
    m = slot.model
    status: dict[str, Any] = {"value": ROUTER_STATUS[slot.state.value],
                              "args": list(sup.spec(slot, slot.gpus)[0].argv),
                              "preset": m.settings.preset_text}
    if slot.state.value == "failed":
        status.update(value="failed", failed=True, reason=slot.reason,
                      exit_code=slot.last_exit.get("ExecMainStatus"))
    modalities = list(m.info.modalities) if m.info else ["text"]
    return {
        "id": m.id, "object": "model", "owned_by": "llamad", "created": m.created,
        "aliases": list(m.aliases), "tags": [], "source": m.source, "status": status,
        "architecture": {"input_modalities": modalities, "output_modalities": ["text"]},
        "llamad": report.describe(sup, slot),
    }


# GET /v1/models with 10,000 models catalogued took ~1 s, nearly all of it building and
# encoding entries of unloaded models, which do not change until the model is loaded
# again. So an unloaded model's encoded entry is kept, keyed by what it is built from.
_listed: weakref.WeakKeyDictionary[Supervisor, dict[str, tuple[Any, bytes]]] = \
    weakref.WeakKeyDictionary()


def _entry_json(sup: Supervisor, slot: Slot, cache: dict[str, tuple[Any, bytes]]) -> bytes:
    if slot.state is not State.UNLOADED:
        return json.dumps(model_entry(sup, slot)).encode()
    key = (slot.served, slot.last_used, slot.n_restarts, slot.reason,
           sup.measure.need(slot.model))
    hit = cache.get(slot.model.id)
    # The catalog publishes a new Model object whenever the model's file or settings change.
    if hit is not None and hit[0][0] is slot.model and hit[0][1] == key:
        return hit[1]
    data = json.dumps(model_entry(sup, slot)).encode()
    cache[slot.model.id] = ((slot.model, key), data)
    return data


async def handle_models(request: web.Request) -> web.Response:
    sup = supervisor(request)
    cache = _listed.setdefault(sup, {})
    if len(cache) > 2 * len(sup.slots):
        cache.clear()  # models removed from the catalog
    parts = [_entry_json(sup, slot, cache) for slot in sup.slots.values()]
    body = b'{"object": "list", "data": [' + b", ".join(parts) + b"]}"
    return web.Response(body=body, content_type="application/json")


async def _model_from_body(request: web.Request) -> Slot:
    _, data = await read_json(request)
    return supervisor(request).resolve(data.get("model"))


async def handle_load(request: web.Request) -> web.Response:
    slot = await _model_from_body(request)
    await supervisor(request).load(slot)
    return web.json_response({"success": True, "model": slot.model.id,
                              "state": slot.state.value})


async def handle_unload(request: web.Request) -> web.Response:
    slot = await _model_from_body(request)
    await supervisor(request).unload(slot)
    return web.json_response({"success": True, "model": slot.model.id,
                              "state": slot.state.value})


async def handle_health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def handle_status(request: web.Request) -> web.Response:
    return web.json_response(report.status(supervisor(request)))


async def handle_running(request: web.Request) -> web.Response:
    """llama-swap's /running shape."""
    sup = supervisor(request)
    return web.json_response({"running": [
        {"model": s.model.id, "state": s.state.value, "unit": s.unit,
         "ttl": sup.ttl(s) or 0} for s in sup.loaded()]})


# -- errors and keys -----------------------------------------------------------

@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except LlamadError as e:
        return web.json_response(e.body(), status=e.status, headers=e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}
        err = LlamadError(_http_message(e), status=e.status,
                          code=code.get(e.status, "http_error"))
        err.type = "invalid_request_error"
        return web.json_response(err.body(), status=e.status)


def _http_message(e: web.HTTPException) -> str:
    if e.status == 413:
        return "the request body is larger than max-body-mb allows"
    if e.status == 404:
        return "no such endpoint on llamad"
    return e.reason


def key_middleware(keys: frozenset[str]) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/health":
            auth = request.headers.get("Authorization", "")
            key = auth[7:] if auth.startswith("Bearer ") else request.headers.get("x-api-key")
            if key not in keys:
                err = LlamadError("a valid API key is required (Authorization: Bearer KEY)",
                                  status=401, code="invalid_api_key")
                err.type = "authentication_error"
                return web.json_response(err.body(), status=401)
        resp: web.StreamResponse = await handler(request)
        return resp
    return check


def add_routes(app: web.Application) -> None:
    r = app.router
    for path in POST_ROUTES:
        r.add_post(path, handle_post)
    for path in GET_ROUTES:
        r.add_get(path, handle_get_model)
    r.add_get("/models", handle_models)
    r.add_get("/v1/models", handle_models)
    r.add_post("/models/load", handle_load)
    r.add_post("/models/unload", handle_unload)
    r.add_get("/health", handle_health)
    r.add_get("/status", handle_status)
    r.add_get("/running", handle_running)
