"""The web UI and the dashboard served by a real llamad in the box: the files, the live
feed driven by the supervisor's state changes, and the runtime pin."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import rig
from helpers.daemon import Factory, chat, models, wait_state

UI = {"ui-dir": str(rig.WEB_UI)}


async def events(session: aiohttp.ClientSession, url: str) -> AsyncIterator[tuple[str, Any]]:
    """(event, data) of the dashboard's feed, as they arrive."""
    async with session.get(url + "/dashboard/events") as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        kind = ""
        async for line in r.content:
            text = line.decode().rstrip("\n")
            if text.startswith("event: "):
                kind = text[7:]
            elif text.startswith("data: "):
                yield kind, json.loads(text[6:])


async def test_ui_and_dashboard_files(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"], **UI)
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(d.url + "/") as r:
            index = (await r.read()).decode()
            assert r.status == 200 and "<!doctype html>" in index.lower()
            assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
        bundle = next(p for p in index.split('"') if p.endswith(".js") and "immutable" in p)
        async with s.get(d.url + "/" + bundle.removeprefix("./"),
                         headers={"Accept-Encoding": "gzip"}) as r:
            assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
            assert "immutable" in r.headers["Cache-Control"]
            assert len(gzip.decompress(await r.read())) > 1_000_000
        async with s.get(d.url + "/dashboard") as r:
            assert r.status == 200 and "dashboard/dashboard.js" in await r.text()
        async with s.get(d.url + "/dashboard/dashboard.js") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/javascript")


async def test_feed_follows_every_state_change(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a", "gemma-b"])
    seen: list[str] = []
    measured: dict[str, Any] = {}
    async with aiohttp.ClientSession() as s:
        feed = events(s, d.url)
        kind, hello = await feed.__anext__()
        assert kind == "hello" and sorted(hello["ids"]) == ["gemma-a", "gemma-b"]
        assert hello["machine"]["ram"]["total"] > 0
        kind, batch = await feed.__anext__()
        assert kind == "models" and {m["id"]: m["state"] for m in batch} == {
            "gemma-a": "unloaded", "gemma-b": "unloaded"}

        async def watch(until: str) -> None:
            async for kind, data in feed:
                if kind == "model" and data["id"] == "gemma-a":
                    seen.append(data["state"])
                if kind == "figures":
                    measured.update({m["id"]: m for m in data["models"]})
                a = measured.get("gemma-a", {})
                if seen and seen[-1] == until and (
                        until != "ready" or (a.get("ram") and a["served"] == 1)):
                    return

        status, _ = await chat(s, d.url, "gemma-a")
        assert status == 200
        await asyncio.wait_for(watch("ready"), 120)
        assert seen[:3] == ["starting", "loading", "ready"]
        a = measured["gemma-a"]
        assert a["unit"] == "llama-server@gemma-a.service" and a["main_pid"] > 0
        assert a["ram"] > 50 << 20 and a["estimate"]["ram"] > 50 << 20 and a["served"] == 1
        async with s.post(d.url + "/models/unload", json={"model": "gemma-a"}) as r:
            assert r.status == 200
        await asyncio.wait_for(watch("unloaded"), 60)
        assert seen[-2:] == ["stopping", "unloaded"]


async def test_runtime_pin_keeps_a_model_loaded(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a", "gemma-b"], **{"models-max": 1})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
        async with s.post(d.url + "/models/pin", json={"model": "gemma-a", "pinned": "yes"}) as r:
            assert r.status == 400
        async with s.post(d.url + "/models/pin", json={"model": "gemma-a", "pinned": True}) as r:
            assert (r.status, await r.json()) == (
                200, {"success": True, "model": "gemma-a", "pinned": True})
        status, body = await chat(s, d.url, "gemma-b")
        assert status == 503 and "pinned" in body["error"]["message"]
        assert rig.wait_for("gemma-a listed as pinned", lambda: _pinned(d.url, "gemma-a"))
        async with s.post(d.url + "/models/pin", json={"model": "gemma-a", "pinned": False}) as r:
            assert r.status == 200
        assert (await chat(s, d.url, "gemma-b"))[0] == 200
    wait_state(d.url, "gemma-a", "unloaded")


def _pinned(url: str, model: str) -> bool:
    entry = models(url)[model]["llamad"]
    return bool(entry["pinned"] and entry["ttl_left"] is None)
