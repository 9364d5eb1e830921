"""The management API: the model list, load and unload, status, health."""

from __future__ import annotations

import json
import weakref
from typing import Any

from aiohttp import web

from llamad import keys, report
from llamad.body import read_json
from llamad.scheduler import State
from llamad.slot import Slot
from llamad.supervisor import Supervisor

# aiohttp 3.8 (Debian 12) has no AppKey; later releases warn about plain string keys.
SUPERVISOR: Any = web.AppKey("supervisor", Supervisor) if hasattr(web, "AppKey") else "supervisor"


def supervisor(request: web.Request) -> Supervisor:
    sup: Supervisor = request.app[SUPERVISOR]
    return sup


def resolve(request: web.Request, name: object) -> Slot:
    """The model a request names, as far as its API key may see it (keys.py)."""
    slot = supervisor(request).resolve(name)
    keys.check_model(request, slot.model.id, slot.model.aliases, str(name))
    return slot


def visible(request: web.Request, slots: Any) -> list[Slot]:
    return [s for s in slots if keys.may_use(request, s.model.id, s.model.aliases)]

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
    parts = [_entry_json(sup, slot, cache) for slot in visible(request, sup.slots.values())]
    body = b'{"object": "list", "data": [' + b", ".join(parts) + b"]}"
    return web.Response(body=body, content_type="application/json")


async def _model_from_body(request: web.Request) -> Slot:
    _, data = await read_json(request)
    return resolve(request, data.get("model"))


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


async def handle_health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@keys.admin_only
async def handle_status(request: web.Request) -> web.Response:
    return web.json_response(report.status(supervisor(request)))


async def handle_running(request: web.Request) -> web.Response:
    """llama-swap's /running shape."""
    sup = supervisor(request)
    return web.json_response({"running": [
        {"model": s.model.id, "state": s.state.value, "unit": s.unit,
         "ttl": sup.ttl(s) or 0} for s in visible(request, sup.loaded())]})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/models", handle_models)
    r.add_get("/v1/models", handle_models)
    r.add_post("/models/load", handle_load)
    r.add_post("/models/unload", handle_unload)
    r.add_get("/health", handle_health)
    r.add_get("/status", handle_status)
    r.add_get("/running", handle_running)
