"""What GET /v1/models and /models/sse say of a model, with systemd faked at the Units
boundary (the real feed runs on the box in tests/integration/test_router_contract.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from helpers.supervised import Rig

from llamad.api import listing
from llamad.api.feed import ModelFeed, expected_load_seconds
from llamad.catalog.catalog import scan
from llamad.config import Config
from llamad.supervisor.events import Cause, State
from llamad.supervisor.guards import kvmetrics


def test_context_per_request_follows_slots_and_unified_cache(tiny_config: Config) -> None:
    cases = [((), 4096), (("-c", "8192"), 8192), (("-c", "8192", "-np", "4"), 2048),
             (("-c", "8192", "-np", "4", "--kv-unified"), 8192), (("-np", "2"), 2048),
             (("-c", "0", "-np", "2"), 2048)]
    for args, want in cases:
        model = scan(dataclasses.replace(tiny_config, args=args)).models["tiny"]
        assert listing.n_ctx(model) == want, args


def test_entry_has_router_fields_and_failed_shape(tiny_config: Config) -> None:
    sup = Rig(tiny_config).sup
    slot = sup.slots["tiny"]
    entry = listing.entry(sup, slot)
    assert entry["status"]["value"] == "unloaded" and "failed" not in entry["status"]
    assert entry["name"] == "tiny" and entry["context_length"] == 4096
    assert entry["meta"]["n_ctx_train"] == 4096 and entry["meta"]["n_params"] > 0
    slot.state, slot.last_exit = State.FAILED, {"ExecMainStatus": 0}
    status = listing.entry(sup, slot)["status"]
    # The router shows a failed child as unloaded with a non-zero exit code.
    assert status == {**status, "value": "unloaded", "failed": True, "exit_code": 1}
    slot.last_exit = {"ExecMainStatus": 134}
    assert listing.entry(sup, slot)["status"]["exit_code"] == 134
    body = json.loads(b"".join(asyncio.run(listing.listing(sup, sup.slots.values()))))
    assert [m["id"] for m in body["data"]] == ["tiny"] and body["object"] == "list"


async def test_cached_entries_follow_what_they_show(tiny_config: Config) -> None:
    sup = Rig(tiny_config).sup
    slot = sup.slots["tiny"]

    async def shown() -> dict[str, Any]:
        entry: dict[str, Any] = json.loads(b"".join(await listing.listing(sup, [slot])))[
            "data"][0]
        return entry
    assert await listing.listing(sup, [slot]) == await listing.listing(sup, [slot])
    # Pieces of about CHUNK bytes that join into one body, whatever the count.
    for n in (0, 1, 2, 1000, -(-listing.CHUNK // 1029)):  # the last: a piece ends the list
        pieces = listing._pieces([b'{"id":"%d","p":"%s"}' % (i, b"x" * (1013 - len(str(i))))
                                  for i in range(n)])
        assert n < 1000 or len(pieces) > 3
        assert [m["id"] for m in json.loads(b"".join(pieces))["data"]] == \
            [str(i) for i in range(n)]
    sup.set_pin(slot, True)
    assert (await shown())["llamad"]["pinned"] is True
    sup.move(slot, State.FAILED, Cause.FAILED, "gone")
    slot.reason = "gone"
    sup.move(slot, State.UNLOADED, Cause.RESET)
    assert (await shown())["llamad"]["restarts"] == 0
    slot.in_flight += 1
    sup.release(slot)  # a request ended, as Admission.use ends it
    assert (await shown())["llamad"]["served"] == 1
    # A learned figure changes the need shown without any state change.
    sup.measure.learn(slot.model, 123 * 2**20, None, 1.0)
    assert (await shown())["llamad"]["need"]["ram"] == 123 * 2**20
    sup.kv.figures.setdefault("tiny", kvmetrics.Figures()).saved_tokens = 7
    sup.kv.generation += 1
    assert (await shown())["llamad"]["kv_cache"]["saved_tokens"] == 7
    # Asked again with nothing changed: the same bytes, without building the entry again.
    before = await listing.listing(sup, [slot])
    assert await listing.listing(sup, [slot]) == before
    cached, fresh = (await shown())["llamad"], listing.entry(sup, slot)["llamad"]
    # last_used is wall-clock time, from the monotonic clock: the same up to rounding.
    assert abs(cached.pop("last_used") - fresh.pop("last_used")) < 0.01
    assert cached == json.loads(json.dumps(fresh))
    await sup.close()


async def test_feed_records_follow_state_changes(tiny_config: Config) -> None:
    sup = Rig(tiny_config).sup
    feed = ModelFeed(sup)
    queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
    feed.clients.add(queue)
    slot = sup.slots["tiny"]
    await sup.load(slot)
    sup.on_unit_change(slot.unit, {"ActiveState": "active", "SubState": "running"})
    sup.move(slot, State.READY, Cause.HEALTHY)
    sup.move(slot, State.STOPPING, Cause.UNLOAD)
    sup.move(slot, State.UNLOADED, Cause.STOPPED)
    records = [json.loads(line[6:]) for line in drain(queue)]
    loads = [r for r in records if r["data"].get("llamad")]
    assert [(r["event"], r["data"]["status"], r["data"]["llamad"]["state"]) for r in loads] == [
        ("model_status", "loading", "starting"), ("status_change", "loading", "loading"),
        ("status_change", "loaded", "ready"), ("status_change", "unloaded", "stopping"),
        ("status_change", "unloaded", "unloaded")]
    assert loads[0]["data"]["progress"]["current"] == "text_model"
    assert loads[2]["data"]["info"]["meta"]["n_ctx_train"] == 4096
    assert loads[3]["data"]["exit_code"] == 0
    feed.on_catalog(sup.snapshot, sup.snapshot)
    (line,) = drain(queue)
    assert json.loads(line[6:]) == {"model": "*", "event": "models_reload"}
    await feed.close()
    assert not feed.clients and queue.get_nowait() is None
    await sup.close()


def test_expected_load_time_learned_else_guessed(tiny_config: Config) -> None:
    sup = Rig(tiny_config).sup
    slot = sup.slots["tiny"]
    guess = expected_load_seconds(sup, slot)
    assert 1.0 <= guess < 1.1  # a tiny file: the fixed part of the guess
    sup.measure.learn(slot.model, 1, None, 7.5)
    assert expected_load_seconds(sup, slot) == 7.5
    slot.load_seconds = 2.0
    assert expected_load_seconds(sup, slot) == 2.0


def drain(queue: asyncio.Queue[tuple[str, bytes] | None]) -> list[bytes]:
    out: list[Any] = []
    while not queue.empty():
        item = queue.get_nowait()
        out.append(item[1] if item else None)
    return out


async def test_the_listing_is_written_in_pieces_and_a_client_may_leave_early(
        tiny_config: Config) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from llamad.api import models
    from llamad.http.context import SUPERVISOR

    sup = Rig(tiny_config).sup
    app = web.Application()
    app[SUPERVISOR] = sup
    app.router.add_get("/v1/models", models.handle_models)
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/v1/models")
        body = await r.read()
        assert r.status == 200 and int(r.headers["Content-Length"]) == len(body)
        assert [m["id"] for m in json.loads(body)["data"]] == ["tiny"]
        head = await client.head("/v1/models")
        assert head.status == 200 and await head.read() == b""
        early = await client.get("/v1/models")  # the status alone, then gone
        early.close()
        again = await client.get("/v1/models")
        assert await again.read() == body
    await sup.close()
