"""The contract llama.cpp's web UI and clients rely on in router mode, on the real box:
GET /props without a model, ?autoload=false probes, the /models/sse feed, and what
GET /v1/models says of each model."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import rig
from helpers.daemon import Factory, models, wait_state

PRESET = "[gemma-a]\ntags = small, test\nalias = gemma\n"


async def get(s: aiohttp.ClientSession, url: str, **params: str) -> tuple[int, Any]:
    async with s.get(url, params=params) as r:
        return r.status, json.loads(await r.read())


async def test_router_props_and_probes_never_load(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"], preset=PRESET, **{"models-max": 3})
    async with aiohttp.ClientSession() as s:
        status, props = await get(s, d.url + "/props", autoload="false")
        assert status == 200
        assert props["role"] == "router" and props["max_instances"] == 3
        assert props["models_autoload"] is True
        assert props["default_generation_settings"] == {"params": None, "n_ctx": 0}
        assert props["build_info"].startswith("b")
        for path in ("/props", "/slots", "/metrics"):
            for flag in ("false", "0"):
                status, body = await get(s, d.url + path, model="gemma-a", autoload=flag)
                assert status == 400, (path, body)
                assert body["error"]["code"] == "model_not_loaded"
        assert models(d.url)["gemma-a"]["status"]["value"] == "unloaded"
        assert d.model_units() == {}
        # Without the flag (autoload on) the same probe loads the model.
        status, body = await get(s, d.url + "/props", model="gemma", autoload="true")
        assert status == 200 and "default_generation_settings" in body
        # Once loaded, a probe is answered by the model itself.
        status, body = await get(s, d.url + "/slots", model="gemma-a", autoload="false")
        assert status == 200 and isinstance(body, list)
    assert d.starts("gemma-a") == 1


async def test_models_list_carries_what_the_ui_reads(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a", "gemma-b"], preset=PRESET)
    entry = models(d.url)["gemma-a"]
    assert entry["status"]["value"] == "unloaded" and entry["name"] == "gemma-a"
    assert entry["tags"] == ["small", "test"] and entry["aliases"] == ["gemma"]
    # -c 4096 -np 4 (the fixture's args): four slots of 1024 tokens.
    assert entry["context_length"] == 1024
    meta = entry["meta"]
    assert meta["n_ctx"] == 1024 and meta["n_ctx_train"] == 32768
    assert meta["n_params"] == 268098176 and meta["n_embd"] == 640
    assert meta["size"] > 200_000_000
    assert models(d.url)["gemma-b"]["tags"] == []
    async with aiohttp.ClientSession() as s:
        for name in ("gemma-a", "gemma"):
            status, one = await get(s, d.url + f"/v1/models/{name}")
            assert status == 200 and one["id"] == "gemma-a" and one["meta"] == meta
        status, body = await get(s, d.url + "/v1/models/nope")
        assert status == 404 and body["error"]["code"] == "model_not_found"


async def test_models_sse_feed(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"])
    records: list[dict[str, Any]] = []
    subscribed = asyncio.Event()
    async with aiohttp.ClientSession() as s:

        async def listen() -> None:
            async with s.get(d.url + "/models/sse") as r:
                # llamad sends the headers and subscribes the stream in one step.
                subscribed.set()
                assert r.headers["Content-Type"].startswith("text/event-stream")
                async for line in r.content:
                    if line.startswith(b"data: "):
                        records.append(json.loads(line[6:]))

        listener = asyncio.ensure_future(listen())
        await asyncio.wait_for(subscribed.wait(), 10)  # before the load starts
        async with s.post(d.url + "/models/load", json={"model": "gemma-a"}) as r:
            assert r.status == 200
        await asyncio.to_thread(wait_state, d.url, "gemma-a", "ready")
        await asyncio.to_thread(rig.wait_for, "the loaded record", lambda: any(
            r.get("data", {}).get("status") == "loaded" for r in records), timeout=10)
        async with s.post(d.url + "/models/unload", json={"model": "gemma-a"}) as r:
            assert r.status == 200
        await asyncio.to_thread(rig.wait_for, "the unloaded record", lambda: any(
            r.get("data", {}).get("llamad", {}).get("state") == "unloaded" for r in records),
            timeout=30)
        listener.cancel()
    mine = [r for r in records if r["model"] == "gemma-a"]
    assert mine[0]["event"] == "model_status" and mine[0]["data"]["status"] == "loading"
    loading = [r["data"] for r in mine if r["data"]["status"] == "loading"]
    values = [x["progress"]["value"] for x in loading]
    assert values == sorted(values) and all(0 <= v < 1 for v in values)
    assert loading[0]["progress"]["stages"] == ["text_model"]
    loaded = next(r["data"] for r in mine if r["data"]["status"] == "loaded")
    assert loaded["info"]["id"] == "gemma-a" and loaded["info"]["meta"]["n_ctx_train"] == 32768
    assert loaded["llamad"]["cause"] == "healthy"
    last = mine[-1]["data"]
    assert last["status"] == "unloaded" and last["exit_code"] == 0
    assert last["llamad"] == {"state": "unloaded", "cause": "stopped", "detail": ""}


async def test_reload_rescans_before_answering(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"], preset="[gemma-a]\n")
    d.dir.joinpath("presets.ini").write_text(
        f"[gemma-a]\nalias = first\n[extra]\nmodel = {d.models_dir / 'gemma-a.gguf'}\n")
    async with aiohttp.ClientSession() as s:
        status, body = await get(s, d.url + "/models", reload="1")
    assert status == 200
    listed = {m["id"]: m for m in body["data"]}
    assert listed["gemma-a"]["aliases"] == ["first"] and "extra" in listed


async def test_preset_precedence_and_relative_paths(llamad_factory: Factory) -> None:
    """Router mode's precedence: llamad.conf args (its command line) > [model] > [*];
    a relative model path is taken from the preset file's directory."""
    preset = ("version = 1\n[*]\nc = 1024\nthreads = 1\nbatch-size = 64\n"
              "[gemma-a]\nc = 512\nthreads = 2\n"
              "[relative]\nmodel = ../{models}/gemma-a.gguf\n")
    d = llamad_factory(["gemma-a"], preset="[gemma-a]\n", args="-c 2048 -np 2")
    d.dir.joinpath("presets.ini").write_text(preset.format(models=d.models_dir.name))
    async with aiohttp.ClientSession() as s:
        status, body = await get(s, d.url + "/v1/models", reload="1")
        listed = {m["id"]: m for m in body["data"]}
        argv = listed["gemma-a"]["status"]["args"]
        flags = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
        assert (flags["--ctx-size"], flags["--threads"], flags["--batch-size"],
                flags["--parallel"]) == ("2048", "2", "64", "2")
        assert listed["relative"]["status"]["args"][1:3] == [
            "--model", str(d.dir / ".." / d.models_dir.name / "gemma-a.gguf")]
        status, body = await get(s, d.url + "/props", model="relative")
    assert status == 200 and body["default_generation_settings"]["n_ctx"] == 1024
