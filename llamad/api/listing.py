"""What GET /v1/models shows of one model: router mode's entry, plus llamad's own object.

The entry has the fields llama.cpp's router gives (id, aliases, tags, status with value,
args and preset, architecture, source) and what its web UI and other clients read of a
loaded model (`meta`, `name`, `context_length`); llamad knows those from the GGUF header
before the model is loaded.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable
from typing import Any

from llamad import redact
from llamad.api import report
from llamad.catalog import argv
from llamad.catalog.catalog import Model
from llamad.memory import estimate as memory
from llamad.supervisor.events import State
from llamad.supervisor.slot import Slot
from llamad.supervisor.supervisor import Supervisor

# Router mode knows unloaded, loading, loaded and sleeping; a model on its way out
# serves nothing more, so it reads as unloaded, and a failed one is unloaded with
# `failed` and a non-zero exit code, as the router shows a crashed child.
ROUTER_STATUS = {State.UNLOADED: "unloaded", State.STARTING: "loading",
                 State.LOADING: "loading", State.READY: "loaded", State.SLEEPING: "sleeping",
                 State.STOPPING: "unloaded", State.FAILED: "unloaded"}
LOAD_STAGES = ("text_model", "mmproj_model")


def exit_code(slot: Slot) -> int:
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


def entry(sup: Supervisor, slot: Slot) -> dict[str, Any]:
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
# again. So an unloaded model's encoded entry is kept, keyed by what it is built from.
_listed: weakref.WeakKeyDictionary[Supervisor, dict[str, tuple[Any, bytes]]] = \
    weakref.WeakKeyDictionary()


def _entry_json(sup: Supervisor, slot: Slot, cache: dict[str, tuple[Any, bytes]]) -> bytes:
    if slot.state is not State.UNLOADED:
        return json.dumps(entry(sup, slot)).encode()
    key = (slot.served, slot.last_used, slot.n_restarts, slot.reason,
           sup.measure.need(slot.model), sup.kv.generation)
    hit = cache.get(slot.model.id)
    # The catalog publishes a new Model object whenever the model's file or settings change.
    if hit is not None and hit[0][0] is slot.model and hit[0][1] == key:
        return hit[1]
    data = json.dumps(entry(sup, slot)).encode()
    cache[slot.model.id] = ((slot.model, key), data)
    return data


def listing(sup: Supervisor, slots: Iterable[Slot]) -> bytes:
    """The encoded body of GET /v1/models: these models, less those the preset hides."""
    cache = _listed.setdefault(sup, {})
    if len(cache) > 2 * len(sup.slots):
        cache.clear()  # models removed from the catalog
    parts = [_entry_json(sup, slot, cache) for slot in slots if not slot.model.hidden]
    return b'{"object": "list", "data": [' + b", ".join(parts) + b"]}"
