"""What GET /models, /status and `llamad ps` show of the supervisor's state."""

from __future__ import annotations

import time
from typing import Any

from llamad import redact
from llamad.catalog import argv
from llamad.catalog.presets import DRAFT
from llamad.supervisor.events import State
from llamad.supervisor.guards import rpcguard
from llamad.supervisor.scheduler import ttl_left
from llamad.supervisor.slot import SlotView
from llamad.supervisor.supervisor import Supervisor


def status_line(sup: Supervisor) -> str:
    """systemd's STATUS= line: "4 models, 1 loaded: gemma-a", after the preset file's
    error if it has one."""
    ready = [s.model.id + (" (sleeping)" if s.state is State.SLEEPING else "")
             for s in sup.models.values() if s.state in (State.READY, State.SLEEPING)]
    names = ", ".join(ready[:5]) + (", ..." if len(ready) > 5 else "")
    line = f"{len(sup.models)} models, {len(ready)} loaded"
    line = f"{line}: {names}" if ready else line
    error = sup.snapshot.error
    return f"configuration error: {redact.text(error)}; {line}" if error else line


def describe(sup: Supervisor, slot: SlotView) -> dict[str, Any]:
    """llamad's own fields for GET /models and /status."""
    now = time.monotonic()
    need = sup.measure.need(slot.model)
    return {
        "state": slot.state.value, "unit": slot.unit, "main_pid": slot.main_pid or None,
        "invocation_id": slot.invocation_id or None, "in_flight": slot.in_flight,
        "queued": slot.queued, "served": slot.served, "restarts": slot.n_restarts,
        "last_used": time.time() - (now - slot.last_used) if slot.last_used else None,
        "load_seconds": slot.load_seconds, "reason": redact.text(slot.reason) or None,
        # The scheduler's own rule: no TTL runs while the model is busy, pinned or loading.
        "ttl_left": ttl_left(sup.view(slot), now, sup.ttl(slot)),
        "pinned": slot.pinned, "gpus": list(slot.gpus),
        # Per-model controls: the concurrency limit (null: none), the draft model (a
        # preset's, or the sidecar in its directory), the preset error that keeps it from
        # serving.
        "concurrency_limit": sup.concurrency(slot) or None,
        "draft": draft.value if (draft := argv.last(slot.model.settings.args, DRAFT)) else None,
        "error": redact.text(slot.model.error) if slot.model.error else None,
        "need": {"ram": need.ram, "vram": need.vram},
        "kv_cache": sup.kv.describe(slot.model),
        # With llama.cpp RPC workers: who, and the memory split (`need` is the local share).
        "rpc": rpcguard.describe(slot.model.info, slot.model.settings.args),
        "fit": _fit(slot),
        **_memory_fields(sup, slot),
    }


def _fit(slot: SlotView) -> dict[str, Any] | None:
    """What fitting chose for the running unit (memory/fit.py): the arguments it added,
    the context, and why, e.g. "context 12288 of 131072: 9.1 GiB free on GPU 0 after
    evicting nothing"; None while unloaded or where it chose nothing."""
    fit = slot.fit
    if fit is None or not (fit.args or fit.reason):
        return None
    return {"args": list(fit.args), "ctx": fit.ctx, "reason": fit.reason or fit.what}


def _memory_fields(sup: Supervisor, slot: SlotView) -> dict[str, Any]:
    """Estimate beside measurement: bytes; measured ones None until a sample."""
    est = sup.measure.estimate(slot.model)
    running = slot.state is not State.UNLOADED and slot.sampled_pid == slot.main_pid != 0
    return {
        "estimate": {"ram": est.ram, "vram": est.vram},
        "ram": slot.used.ram or None if running else None,
        "vram": slot.used.vram if running and slot.peak.vram else None,
        "peak": {"ram": slot.peak.ram or None, "vram": slot.peak.vram or None},
    }


def status(sup: Supervisor) -> dict[str, Any]:
    return {
        "status": status_line(sup), "uptime": time.monotonic() - sup.started,
        "models": {s.model.id: describe(sup, s) for s in sup.loaded_models()},
        "catalogued": len(sup.models),
        "errors": [redact.text(e) for e in sup.snapshot.errors],
        "gpus": [{"index": g.index, "name": g.name, "total": g.total, "used": g.used,
                  "free": g.free} for g in sup.measure.gpu_list()],
    }
