"""What GET /v1/models shows of one model: router mode's entry, plus llamad's own object.

The entry has the fields llama.cpp's router gives (id, aliases, tags, status with value,
args and preset, architecture, source) and what its web UI and other clients read of a
loaded model (`meta`, `name`, `context_length`); llamad knows those from the GGUF header
before the model is loaded.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import Iterable
from typing import Any

from llamad import redact
from llamad.api import report
from llamad.catalog import argv
from llamad.catalog.catalog import Model
from llamad.memory import estimate as memory
from llamad.memory import heap
from llamad.supervisor.events import State
from llamad.supervisor.slot import SlotView
from llamad.supervisor.supervisor import Supervisor

# Router mode knows unloaded, loading, loaded and sleeping; a model on its way out
# serves nothing more, so it reads as unloaded, and a failed one is unloaded with
# `failed` and a non-zero exit code, as the router shows a crashed child.
ROUTER_STATUS = {State.UNLOADED: "unloaded", State.STARTING: "loading",
                 State.LOADING: "loading", State.READY: "loaded", State.SLEEPING: "sleeping",
                 State.STOPPING: "unloaded", State.FAILED: "unloaded"}
LOAD_STAGES = ("text_model", "mmproj_model")
SLICE = 0.05  # seconds of building entries between two turns of the event loop
TRIM_AFTER = 1000  # new entries cached in one listing
CHUNK = 256 * 1024  # bytes of the listing written at a time


def exit_code(slot: SlotView) -> int:
    """The exit status the router would report: non-zero once the model failed."""
    if slot.state is not State.FAILED:
        return 0
    status = slot.last_exit.get("ExecMainStatus")
    return int(status) if isinstance(status, int) and status != 0 else 1


def n_ctx(model: Model, args: tuple[str, ...] | None = None) -> int | None:
    """Tokens one request may use: the context divided among the slots unless the KV
    cache is unified (llama-server's default when -np is not given). `args`: the model's
    arguments as its unit runs them (with what fitting chose), else its own."""
    trained = model.info.context_length if model.info else None
    s = memory.parse_args(model.settings.args if args is None else args)
    ctx = s.ctx_size or trained
    if ctx is None:
        return None
    unified = s.kv_unified if s.kv_unified is not None else s.parallel is None
    return ctx if unified or not s.parallel else ctx // s.parallel


def meta(model: Model, args: tuple[str, ...] | None = None) -> dict[str, Any] | None:
    """Router mode's `meta` of a loaded model, from the GGUF header."""
    info = model.info
    if info is None:
        return None
    return {"n_ctx": n_ctx(model, args), "n_ctx_train": info.context_length,
            "n_embd": info.embedding_length, "n_params": info.parameters,
            "size": info.size, "ftype": info.quantization}


def info(model: Model) -> dict[str, Any]:
    """What a router's child reports of itself once loaded (the SSE `info` record)."""
    modalities = list(model.info.modalities) if model.info else ["text"]
    return {"id": model.id, "aliases": list(model.aliases),
            "tags": list(model.settings.tags), "object": "model",
            "architecture": {"input_modalities": modalities, "output_modalities": ["text"]},
            "created": model.created, "owned_by": "llamad", "meta": meta(model)}


def entry(sup: Supervisor, slot: SlotView) -> dict[str, Any]:
    m = slot.model
    args = sup.measure.run_args(m)
    status: dict[str, Any] = {"value": ROUTER_STATUS[slot.state],
                              "args": argv.masked(sup.spec(slot, slot.gpus)[0].argv, redact.MASK),
                              "preset": redact.text(m.settings.preset_text)}
    if slot.state is State.FAILED:
        status.update(failed=True, exit_code=exit_code(slot))
    return {
        "id": m.id, "aliases": list(m.aliases), "tags": list(m.settings.tags),
        "object": "model", "owned_by": "llamad", "created": m.created, "status": status,
        "architecture": info(m)["architecture"], "source": m.source,
        # As the router: DELETE /models removes downloads in llama.cpp's cache only.
        "can_remove": m.source == "cache",
        "name": m.id, "context_length": n_ctx(m, args), "meta": meta(m, args),
        "llamad": report.describe(sup, slot),
    }


# GET /v1/models with 10,000 models catalogued took ~1 s, nearly all of it building and
# encoding entries of unloaded models, which do not change until the model is loaded
# again. So an unloaded model's encoded entry is kept, keyed by what it is built from:
# the Model object (the catalog makes a new one when a file or setting changes), the
# slot's fields (its epoch moves with every state change) and the generations of what
# the memory figures and the KV cache figures show. Nothing in the key is computed: 10,000
# keys are compared in a few ms, where asking each model's need() took ten times that.
_listed: weakref.WeakKeyDictionary[Supervisor, dict[str, tuple[Any, bytes]]] = \
    weakref.WeakKeyDictionary()
# And the last listing: asked again for the same models with nothing changed since (no
# slot change the supervisor notified, no new memory or KV figure), its unloaded models'
# entries are taken as they were, without even their keys (10,000 keys took 7 ms).
_last: weakref.WeakKeyDictionary[Supervisor, tuple[Any, list[SlotView], list[bytes]]] = \
    weakref.WeakKeyDictionary()


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _entry_json(sup: Supervisor, slot: SlotView, cache: dict[str, tuple[Any, bytes]]) -> bytes:
    if slot.state is not State.UNLOADED:
        return _encode(entry(sup, slot))
    key = (slot.model, slot.epoch, slot.served, slot.last_used, slot.n_restarts, slot.reason,
           slot.pin, slot.load_seconds, sup.measure.generation, sup.kv.generation)
    hit = cache.get(slot.model.id)
    if hit is not None and hit[0] == key:
        return hit[1]
    data = _encode(entry(sup, slot))
    cache[slot.model.id] = (key, data)
    return data


async def listing(sup: Supervisor, slots: Iterable[SlotView]) -> list[bytes]:
    """The encoded body of GET /v1/models in pieces of about CHUNK bytes (joined, the whole
    body): these models, less those the preset hides. Entries not cached yet cost ~0.2 ms
    each: a first listing of 10,000 models lets other work (requests, the watchdog's ping)
    run every SLICE seconds."""
    shown = [slot for slot in slots if not slot.model.hidden]
    version = (sup.changes, sup.measure.generation, sup.kv.generation)
    last = _last.get(sup)
    if last is not None and last[0] == version and last[1] == shown:  # slots by identity
        parts = [part if slot.state is State.UNLOADED else _encode(entry(sup, slot))
                 for slot, part in zip(shown, last[2], strict=True)]
    else:
        parts = await _parts(sup, shown)
    _last[sup] = (version, shown, parts)
    return _pieces(parts)


async def _parts(sup: Supervisor, shown: list[SlotView]) -> list[bytes]:
    cache = _listed.setdefault(sup, {})
    if len(cache) > 2 * len(sup.models):
        cache.clear()  # models removed from the catalog
    parts: list[bytes] = []
    until, known = time.monotonic() + SLICE, len(cache)
    for n, slot in enumerate(shown):
        parts.append(_entry_json(sup, slot, cache))
        if n % 256 == 255 and time.monotonic() > until:
            await asyncio.sleep(0)
            until = time.monotonic() + SLICE
    if len(cache) - known >= TRIM_AFTER:
        heap.trim()  # building them left megabytes of freed dicts behind
    return parts


def _pieces(parts: list[bytes]) -> list[bytes]:
    """`{"object":"list","data":[parts]}` in pieces of about CHUNK bytes. Written one by
    one, a 12 MB listing (10,000 models) is never copied whole: Python 3.11's transport
    keeps what the socket did not take in one bytearray and moves all of the rest forward
    after every send."""
    out, group, size = [b'{"object":"list","data":['], list[bytes](), 0
    for part in parts:
        group.append(part)
        size += len(part)
        if size >= CHUNK:
            out += [b",".join(group), b","]  # the comma apart: no second copy of the piece
            group, size = [], 0
    if group:
        out.append(b",".join(group))
    elif len(out) > 1:
        out.pop()  # no comma after the last entry
    out.append(b"]}")
    return out
