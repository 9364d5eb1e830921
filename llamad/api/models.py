"""The management API: the model list, load and unload, router properties, status, health."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from aiohttp import web

from llamad.api import fleet, listing, report
from llamad.api.feed import ModelFeed
from llamad.catalog.catalog import Catalog
from llamad.errors import BadRequest, Unavailable
from llamad.http import keys, limits
from llamad.http.body import read_json
from llamad.http.context import CATALOG, SUPERVISOR, app_key, find, resolve, supervisor, visible
from llamad.supervisor.slot import Slot
from llamad.supervisor.supervisor import Supervisor

FEED: Any = app_key("feed", ModelFeed)


async def handle_models(request: web.Request) -> web.StreamResponse:
    sup = supervisor(request)
    if request.query.get("reload"):
        # A full scan of every models directory: an admin's to ask for, and callers at the
        # same time share one scan (the watcher's). The snapshot reaches the supervisor.
        keys.require_admin(request, "GET /v1/models?reload=1")
        if sup.rescan is not None:
            await sup.rescan()
        elif CATALOG in request.app:
            await request.app[CATALOG].rescan_async()
    pieces = await listing.listing(sup, visible(request, sup.models.values()))
    if request.method == "HEAD":  # aiohttp leaves a plain response's body out itself
        return web.Response(body=b"".join(pieces), content_type="application/json")
    if fleet.wants_peers(request, sup.config.peers):  # the other llamads' models too
        body = await fleet.with_peers(request, b"".join(pieces), sup.config.peers,
                                      sup.config.peer_timeout,
                                      request.app[keys.KEYRING].peer_key
                                      if keys.KEYRING in request.app else None)
        return web.Response(body=body, content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = sum(map(len, pieces))
    await resp.prepare(request)
    try:
        for piece in pieces:
            await resp.write(piece)
        await resp.write_eof()
    except ConnectionResetError:  # aiohttp's ClientConnectionResetError too
        pass  # the client left before the whole list (it read the status alone): no error
    return resp


async def handle_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: one entry (the OpenAI SDK's models.retrieve)."""
    slot = resolve(request, request.match_info["id"])
    return web.json_response(listing.entry(supervisor(request), slot))


async def _model_from_body(request: web.Request) -> Slot:
    _, data = await read_json(request)
    return await find(request, data.get("model"))


@keys.admin_only
async def handle_load(request: web.Request) -> web.Response:
    slot = await _model_from_body(request)
    await supervisor(request).load(slot)
    return web.json_response({"success": True, "model": slot.model.id,
                              "state": slot.state.value})


@keys.admin_only
async def handle_unload(request: web.Request) -> web.Response:
    slot = await _model_from_body(request)
    await supervisor(request).unload(slot)
    return web.json_response({"success": True, "model": slot.model.id,
                              "state": slot.state.value})


@keys.admin_only
async def handle_pin(request: web.Request) -> web.Response:
    """`{"model": ..., "pinned": true|false}`: keep a model loaded (no eviction, no TTL)
    until unpinned or llamad restarts."""
    _, data = await read_json(request, "pinned")
    slot = resolve(request, data.get("model"))
    pinned = data.get("pinned", True)
    if not isinstance(pinned, bool):
        raise BadRequest('"pinned" must be true or false', code="invalid_pinned")
    supervisor(request).set_pin(slot, pinned)
    return web.json_response({"success": True, "model": slot.model.id, "pinned": slot.pinned})


async def router_props(request: web.Request) -> web.Response:
    """GET /props without a model: what llama.cpp's router answers."""
    config = supervisor(request).config
    return web.json_response({
        "role": "router", "max_instances": config.models_max,
        "models_autoload": config.models_autoload,
        "model_alias": "llama-server", "model_path": "none",
        "default_generation_settings": {"params": None, "n_ctx": 0},
        "ui_settings": {}, "build_info": await build_info(config.llama_server),
        "cors_proxy_enabled": False,
    })


_build_info: dict[Path, str] = {}
_VERSION = re.compile(r"build (\d+), commit ([^)\s]+)")


async def build_info(binary: Path) -> str:
    """llama-server's build as llama.cpp spells it ("b<number>-<commit>"), asked once."""
    if binary not in _build_info:
        out = b""
        try:
            proc = await asyncio.create_subprocess_exec(
                str(binary), "--version", stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), 10)
        except (TimeoutError, OSError):
            pass
        m = _VERSION.search(out.decode(errors="replace"))
        # llama.cpp's own spelling of a build that knows neither.
        _build_info[binary] = f"b{m.group(1)}-{m.group(2)}" if m else "b0-unknown"
    return _build_info[binary]


@limits.long_lived
async def handle_sse(request: web.Request) -> web.StreamResponse:
    feed: ModelFeed = request.app[FEED]
    return await feed.handle(request)


async def close_feed(app: web.Application) -> None:
    if FEED in app:
        await app[FEED].close()


async def handle_health(request: web.Request) -> web.Response:
    fleet.check_health(request.app)  # 503 while draining before llamad exits
    sup = supervisor(request)
    error = sup.snapshot.error
    if error:  # llamad serves, but not as configured: a health check should say so
        if sup.config.api_keys_file is not None:  # /health needs no key: name less
            error = "the preset file has an error; GET /status (admin) or llamad " \
                "check-config names it"
        raise Unavailable(f"configuration error: {error}", code="configuration_error")
    return web.json_response({"status": "ok"})


@keys.admin_only
async def handle_status(request: web.Request) -> web.Response:
    return web.json_response(report.status(supervisor(request)))


async def handle_running(request: web.Request) -> web.Response:
    """llama-swap's /running shape."""
    sup = supervisor(request)
    return web.json_response({"running": [
        {"model": s.model.id, "state": s.state.value, "unit": s.unit,
         "ttl": sup.ttl(s) or 0} for s in visible(request, sup.loaded_models())]})


def attach(app: web.Application, sup: Supervisor, catalog: Catalog) -> None:
    """Give the handlers the daemon's supervisor and catalog, once both exist."""
    app[SUPERVISOR] = sup
    app[CATALOG] = catalog
    feed = ModelFeed(sup)
    catalog.subscribe(feed.on_catalog)
    app[FEED] = feed


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/models", handle_models)
    r.add_get("/v1/models", handle_models)
    r.add_get("/models/sse", handle_sse)
    r.add_get("/v1/models/{id:.+}", handle_model)
    r.add_post("/models/load", handle_load)
    r.add_post("/models/unload", handle_unload)
    r.add_post("/models/pin", handle_pin)
    r.add_get("/health", handle_health)
    r.add_get("/v1/health", handle_health)
    r.add_get("/status", handle_status)
    r.add_get("/running", handle_running)
    app.on_shutdown.append(close_feed)
