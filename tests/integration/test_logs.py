"""Journal lines over HTTP (/logs/stream) from llamad and its model units, in the box."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
from helpers.daemon import Factory, chat

Event = dict[str, Any]


async def sse(resp: aiohttp.ClientResponse, until: Callable[[list[Event]], bool] | None = None,
              timeout: float = 60) -> list[Event]:
    """SSE events (data decoded, `id` added) until `until(events)` holds or the stream ends."""
    events: list[Event] = []

    async def read() -> None:
        current: Event = {}
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                current["id"] = line[4:]
            elif line.startswith("data: "):
                current.update(json.loads(line[6:]))
            elif not line and current:
                events.append(current)
                current = {}
                if until is not None and until(events):
                    return
    await asyncio.wait_for(read(), timeout)
    return events


def said(events: list[Event], text: str) -> bool:
    return any(text in e["message"] for e in events)


async def test_model_log_follows_a_load_and_resumes_after_an_id(
        llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"])
    async with aiohttp.ClientSession() as s:
        async with s.get(d.url + "/logs/stream/gemma-a", params={"lines": "0"}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            # Nothing is loaded yet: the lines below arrive while the stream is open.
            asked = asyncio.ensure_future(chat(s, d.url, "gemma-a"))
            events = await sse(r, lambda ev: said(ev, "model loaded") and said(
                ev, "Started llama-server@gemma-a.service"))
            assert (await asked)[0] == 200
        assert {e["unit"] for e in events} == {"llama-server@gemma-a.service"}
        assert all(isinstance(e["time"], float) and e["priority"] in range(8) for e in events)
        # Without following: the last lines, then the stream ends.
        async with s.get(d.url + "/logs/stream/gemma-a",
                         params={"lines": "12", "follow": "0"}) as r:
            backlog = await sse(r)
        # The unit may log more after the backlog was read: compare the 12 entries that
        # end where the backlog ends.
        shown = d.box.journal("-u", "llama-server@gemma-a.service", "-n", "200", "-o", "json")
        entries = [json.loads(line) for line in shown.splitlines()]
        end = 1 + [e["__CURSOR"] for e in entries].index(backlog[-1]["id"])
        assert [(e["id"], e["message"]) for e in backlog] == [
            (e["__CURSOR"], e["MESSAGE"]) for e in entries[end - 12:end]]
        # A reconnecting client resumes after the last event it saw.
        async with s.get(d.url + "/logs/stream/gemma-a", params={"follow": "0"},
                         headers={"Last-Event-ID": backlog[9]["id"]}) as r:
            resumed = await sse(r)
        # ...and goes on to the end; the unit may have logged more since the backlog.
        assert resumed[:2] == backlog[10:]


async def test_daemon_log_and_bad_requests(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"])
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
        async with s.get(d.url + "/logs/stream", params={"follow": "0"}) as r:
            events = await sse(r)
        assert said(events, "starting llama-server@gemma-a.service for model gemma-a")
        assert {e["unit"] for e in events} == {d.unit}
        async with s.get(d.url + "/logs/stream/nope") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "model_not_found"
        async with s.get(d.url + "/logs/stream", params={"lines": "many"}) as r:
            assert r.status == 400


async def test_open_streams_end_at_shutdown(llamad_factory: Factory) -> None:
    """aiohttp waits up to a minute for open handlers before llamad can exit: followed
    logs, the dashboard's feed and the models feed must end when llamad stops."""
    d = llamad_factory(["gemma-a"])
    async with aiohttp.ClientSession() as s:
        paths = ["/logs/stream", "/logs/stream/gemma-a", "/dashboard/events", "/models/sse"]
        opened = [await s.get(d.url + path) for path in paths]
        assert [r.status for r in opened] == [200] * len(paths)
        stopped = await asyncio.to_thread(
            d.box.run, ["systemctl", "stop", d.unit], check=False, timeout=40)
        assert stopped.returncode == 0, stopped.stderr
        for r in opened:  # each stream ended: reading it to the end returns
            await asyncio.wait_for(r.read(), 10)
            r.release()
