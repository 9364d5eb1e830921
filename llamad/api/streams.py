"""Resumable streams: which model serves a conversation, so its stream can be resumed.

llama-server keeps the stream of a request that carries `X-Conversation-Id` for a while
and serves GET /v1/stream?conv_id=ID (resume), POST /v1/streams/lookup and DELETE
/v1/stream?conv_id=ID (stop). Like router mode, llamad remembers which model each
conversation went to and sends these requests there; they never load a model.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from llamad.api.forward import forward, watch
from llamad.errors import BadRequest, LlamadError, NotFound, Unavailable
from llamad.http import keys
from llamad.http.body import read_json
from llamad.http.context import app_key, supervisor
from llamad.supervisor.backend import SMALL_ANSWER, capped_json
from llamad.supervisor.events import State
from llamad.supervisor.slot import Slot

log = logging.getLogger("llamad.streams")

HEADER = "X-Conversation-Id"
LIMIT = 10_000  # conversations remembered; the oldest are forgotten first
LOOKUP_TIMEOUT = aiohttp.ClientTimeout(total=2)


class Conversations:
    """conversation id -> model id, bounded; each request's registration has a ticket, which
    a stop (forget) or a newer request of the conversation invalidates."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._owner: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._tickets = itertools.count(1)

    def remember(self, conv: str, model: str) -> int:
        ticket = next(self._tickets)
        self._owner[conv] = (model, ticket)
        self._owner.move_to_end(conv)
        while len(self._owner) > self.limit:
            self._owner.popitem(last=False)
        return ticket

    def owner(self, conv: str) -> str | None:
        entry = self._owner.get(conv)
        return entry[0] if entry else None

    def alive(self, conv: str, ticket: int) -> bool:
        entry = self._owner.get(conv)
        return entry is not None and entry[1] == ticket

    def forget(self, conv: str) -> None:
        self._owner.pop(conv, None)


CONVERSATIONS: Any = app_key("conversations", Conversations)


def remember(request: web.Request, slot: Slot) -> Callable[[], None]:
    """Note the request's conversation, before any wait for its model to load. Returns the
    check to make once the model is ready: as in the router, a stop (DELETE /v1/stream)
    meanwhile cancels the request, so a stop pressed during a load leaves no generation
    behind that nobody reads."""
    conv = request.headers[HEADER]
    convs: Conversations = request.app[CONVERSATIONS]
    ticket = convs.remember(conv, slot.model.id)

    def check() -> None:
        # A later request of the conversation re-registers it, as the router's map does.
        if not convs.alive(conv, ticket):
            raise BadRequest("request cancelled by a stop while the model was loading",
                             code="request_cancelled")
    return check


def _owner(request: web.Request, conv: str) -> tuple[str | None, Slot | None]:
    """The conversation's model, and its slot if that model is ready to serve it."""
    model = request.app[CONVERSATIONS].owner(conv)
    slot = supervisor(request).slots.get(model) if model else None
    if slot is not None and not keys.may_use(request, slot.model.id, slot.model.aliases):
        return None, None  # a scoped key's other models look unknown
    return model, slot if slot is not None and slot.state is State.READY else None


def _conv_id(request: web.Request) -> str:
    conv = request.query.get("conv_id")
    if not conv:
        raise BadRequest("conv_id is missing from the query", code="conv_id_required")
    return conv


async def handle_resume(request: web.Request) -> web.StreamResponse:
    conv = _conv_id(request)
    model, slot = _owner(request, conv)
    if slot is None:
        known = supervisor(request).slots.get(model) if model else None
        if known is not None and known.state in (State.STARTING, State.LOADING):
            raise Unavailable(f"model {model} of this conversation is loading; retry",
                              retry_after=1, code="model_loading")
        raise NotFound("no stream for this conversation here (not started or expired)",
                       code="stream_not_found")
    sup = supervisor(request)
    async with sup.use(slot) as backend:
        return await forward(request, backend, b"", watch(sup, slot, backend))


async def handle_lookup(request: web.Request) -> web.Response:
    """Which of these conversations have a stream: asks only the models that own them."""
    try:
        _, data = await read_json(request, "conversation_ids")
        ids = [c for c in data.get("conversation_ids", []) if isinstance(c, str) and c]
    except (BadRequest, TypeError):
        return web.json_response([])
    groups: dict[str, list[str]] = {}
    for conv in ids:
        _, slot = _owner(request, conv)
        if slot is not None:
            groups.setdefault(slot.model.id, []).append(conv)
    found: list[Any] = []
    for model, convs in groups.items():
        found += await _lookup(request, supervisor(request).slots[model], convs)
    return web.json_response(found)


async def _lookup(request: web.Request, slot: Slot, convs: list[str]) -> list[Any]:
    try:
        async with supervisor(request).use(slot) as backend, backend.client() as session, \
                session.post(backend.base_url + "/v1/streams/lookup",
                             json={"conversation_ids": convs}, timeout=LOOKUP_TIMEOUT) as r:
            answer = await capped_json(r, SMALL_ANSWER) if r.status == 200 else []
    except (TimeoutError, LlamadError, aiohttp.ClientError, ValueError) as e:
        log.debug("stream lookup on %s failed: %s", slot.model.id, e)
        return []
    return [e for e in answer if isinstance(e, dict)] if isinstance(answer, list) else []


async def handle_stop(request: web.Request) -> web.Response:
    conv = _conv_id(request)
    _, slot = _owner(request, conv)
    if slot is not None:
        try:
            async with supervisor(request).use(slot) as backend, backend.client() as session, \
                    session.delete(backend.base_url + request.path_qs, timeout=LOOKUP_TIMEOUT):
                pass
        except (TimeoutError, LlamadError, aiohttp.ClientError) as e:
            log.debug("stopping a stream on %s failed: %s", slot.model.id, e)
    request.app[CONVERSATIONS].forget(conv)
    return web.Response(status=204, content_type="application/json")


def add_routes(app: web.Application) -> None:
    app[CONVERSATIONS] = Conversations()
    app.router.add_get("/v1/stream", handle_resume)
    app.router.add_post("/v1/streams/lookup", handle_lookup)
    app.router.add_delete("/v1/stream", handle_stop)
