"""What a request handler reaches through its application: the supervisor and the catalog,
and the model a request names, as far as its API key may see it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from llamad.catalog.catalog import Catalog
from llamad.http import keys
from llamad.supervisor.slot import Slot, SlotView
from llamad.supervisor.supervisor import Supervisor


def app_key(name: str, kind: type) -> Any:
    # aiohttp 3.8 (Debian 12) has no AppKey; later releases warn about plain string keys.
    return web.AppKey(name, kind) if hasattr(web, "AppKey") else name


SUPERVISOR: Any = app_key("supervisor", Supervisor)
CATALOG: Any = app_key("catalog", Catalog)


def supervisor(request: web.Request) -> Supervisor:
    sup: Supervisor = request.app[SUPERVISOR]
    return sup


def resolve(request: web.Request, name: object) -> Slot:
    """The model a request names, as far as its API key may see it (keys.py)."""
    sup = supervisor(request)
    slot = sup.resolve(name)
    keys.check_model(request, slot.model.id, slot.model.aliases, str(name), bool(sup.config.peers))
    return slot


async def find(request: web.Request, name: object) -> Slot:
    """resolve(), but a model whose file is being copied in is waited for (Supervisor.find),
    only by a key that may use that name: another would learn from the wait that the name
    is coming."""
    sup = supervisor(request)
    slot = await sup.find(name) if keys.may_use(request, str(name)) else sup.resolve(name)
    keys.check_model(request, slot.model.id, slot.model.aliases, str(name), bool(sup.config.peers))
    return slot


def visible(request: web.Request, slots: Iterable[SlotView]) -> list[SlotView]:
    """The models of `slots` the request's key may use (the key looked up once: GET
    /v1/models may list 10,000 models)."""
    key = keys.request_key(request)
    if key is None or key.models is None:
        return list(slots)
    return [s for s in slots if key.may_use(s.model.id, s.model.aliases)]
