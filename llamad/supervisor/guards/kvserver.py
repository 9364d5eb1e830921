"""Talking to llama-server about its slots: GET /slots, POST /slots/N?action=save|restore,
GET /metrics. Every call is bounded by the deadline its caller was given."""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from llamad.supervisor import backend as be
from llamad.supervisor.guards import kvpolicy

METRICS_BYTES = 256 * 1024  # llama-server's /metrics is a few KiB


class KvError(Exception):
    """llama-server refused a slot action; the message is its own."""


def left(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("kv-cache-timeout ran out")
    return remaining


async def slots(backend: be.Backend, deadline: float) -> list[dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=left(deadline))
    async with backend.session().get(backend.base_url + "/slots", timeout=timeout) as r:
        body = await be.capped_json(r, be.SMALL_ANSWER)
        if r.status != 200 or not isinstance(body, list):
            raise KvError(f"GET /slots answered {r.status}: {str(body)[:200]}")
        return [s for s in body if isinstance(s, dict)]


async def action(backend: be.Backend, slot: int, what: str, filename: str,
                 deadline: float) -> dict[str, Any]:
    url = f"{backend.base_url}/slots/{slot}?action={what}"
    timeout = aiohttp.ClientTimeout(total=left(deadline))
    async with backend.session().post(url, json={"filename": filename}, timeout=timeout) as r:
        body = await be.capped_json(r, be.SMALL_ANSWER)
        if r.status != 200 or not isinstance(body, dict):
            error = body.get("error", body) if isinstance(body, dict) else body
            message = error.get("message", error) if isinstance(error, dict) else error
            raise KvError(str(message)[:300])
        return body


async def counters(backend: be.Backend, deadline: float) -> kvpolicy.Counters | None:
    """The process's prompt counters, from its /metrics; None where it has none (a preset's
    `metrics = false`)."""
    timeout = aiohttp.ClientTimeout(total=left(deadline))
    async with backend.session().get(backend.base_url + "/metrics", timeout=timeout) as r:
        if r.status != 200:
            return None
        text = (await r.content.read(METRICS_BYTES)).decode(errors="replace")
    return kvpolicy.counters(text)


def held(slot: dict[str, Any]) -> int:
    """Tokens a slot of GET /slots holds (shown once it has served a request)."""
    n = slot.get("n_prompt_tokens", 0)
    return n if isinstance(n, int) else 0


def served(slot: dict[str, Any] | None) -> bool:
    """Whether a slot of GET /slots has served a request and is done with it: llama-server
    shows a task only once a slot has had one (a restored slot has none)."""
    return slot is not None and "id_task" in slot and not slot.get("is_processing")


def busy(slot: dict[str, Any] | None) -> bool:
    """Whether a slot of GET /slots is serving a request now."""
    return slot is not None and bool(slot.get("is_processing"))
