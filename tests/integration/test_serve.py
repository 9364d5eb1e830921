"""llamad serve on real systemd, real llama-server and the real Gemma model: routing,
swapping, queueing, streaming and the management API."""

from __future__ import annotations

import asyncio
import io
import os
from typing import Any

import aiohttp
import rig
from helpers.daemon import Factory, chat, models, state, stream, wait_state
from helpers.watch import eventually


async def test_chat_stream_and_listing(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"])
    listing = models(d.url)
    assert listing["gemma-a"]["status"]["value"] == "unloaded"
    assert listing["gemma-a"]["llamad"]["unit"] == "llama-server@gemma-a.service"
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, d.url, "gemma-a")
        assert status == 200, body
        assert body["choices"][0]["message"]["content"]
        events = await stream(s, d.url, "gemma-a", max_tokens=16)
        async with s.get(d.url + "/props") as r:
            assert (await r.json())["role"] == "router"
        async with s.get(d.url + "/props", params={"model": "gemma-a"}) as r:
            assert r.status == 200 and "default_generation_settings" in await r.json()
    assert events[-1] == {"done": True}
    assert any(e.get("choices", [{}])[0].get("delta", {}).get("content") for e in events[:-1])
    assert state(d.url, "gemma-a") == "ready"
    assert models(d.url)["gemma-a"]["status"]["value"] == "loaded"
    assert d.model_units() == {"llama-server@gemma-a.service": "active"}
    # The sandbox of a running model unit, as systemd scores it (0 best, 10 worst).
    report = d.box.run(["systemd-analyze", "security", "--no-pager",
                        "llama-server@gemma-a.service"], check=False).stdout
    score = float(report.split("Overall exposure level for")[1].split(":")[1].split()[0])
    assert score <= 1.0, report
    print(f"model unit exposure: {score}")
    # The unit runs with WatchdogSec=10: systemd has seen llamad's pings.
    assert d.show(d.unit, "WatchdogTimestampMonotonic") not in ("", "0")
    rig.wait_for("STATUS= to name the loaded model",
                 lambda: d.show(d.unit, "StatusText") == "1 models, 1 loaded: gemma-a", timeout=10)


async def test_two_models_alternate_with_models_max_1(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a", "gemma-b"], **{"models-max": 1})
    async with aiohttp.ClientSession() as s:
        for model in ("gemma-a", "gemma-b", "gemma-a", "gemma-b"):
            status, body = await chat(s, d.url, model)
            assert status == 200, body
            assert body["model"] == model
            other = "gemma-b" if model == "gemma-a" else "gemma-a"
            assert d.model_units() == {f"llama-server@{model}.service": "active"}
            assert state(d.url, other) == "unloaded"
    assert d.starts("gemma-a") == 2 and d.starts("gemma-b") == 2


async def test_fifty_concurrent_requests_start_one_unit(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"])
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(chat(s, d.url, "gemma-a", f"Count to {i}", 4)
                                         for i in range(50)))
    assert [status for status, _ in results] == [200] * 50
    assert all(body["choices"][0]["message"]["content"] is not None for _, body in results)
    assert d.starts("gemma-a") == 1
    assert models(d.url)["gemma-a"]["llamad"]["served"] == 50


async def test_streaming_request_is_not_cut_by_a_swap(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a", "gemma-b"], **{"models-max": 1})
    async with aiohttp.ClientSession() as s:
        long = asyncio.ensure_future(stream(s, d.url, "gemma-a", max_tokens=200))
        await asyncio.to_thread(wait_state, d.url, "gemma-a", "ready")
        await asyncio.to_thread(rig.wait_for, "the stream to be in flight",
                                lambda: models(d.url)["gemma-a"]["llamad"]["in_flight"] == 1)
        other = asyncio.ensure_future(chat(s, d.url, "gemma-b"))
        events = await long
        # gemma-b waited for the stream: it cannot have loaded and answered yet.
        assert not other.done()
        status, body = await other
    assert status == 200 and body["model"] == "gemma-b"
    assert events[-1] == {"done": True}
    assert not any("error" in e for e in events)
    finish = [e["choices"][0].get("finish_reason") for e in events[:-1] if e.get("choices")]
    assert finish[-1] in ("length", "stop")
    assert d.model_units() == {"llama-server@gemma-b.service": "active"}


async def test_load_and_unload_api(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"])
    async with aiohttp.ClientSession() as s:
        async with s.post(d.url + "/models/load", json={"model": "gemma-a"}) as r:
            assert r.status == 200 and (await r.json())["success"] is True
        await asyncio.to_thread(wait_state, d.url, "gemma-a", "ready")
        # Unloading a busy model waits for its request to finish.
        long = asyncio.ensure_future(stream(s, d.url, "gemma-a", max_tokens=120))
        await asyncio.to_thread(rig.wait_for, "the stream to be in flight",
                                lambda: models(d.url)["gemma-a"]["llamad"]["in_flight"] == 1)
        async with s.post(d.url + "/models/unload", json={"model": "gemma-a"}) as r:
            assert r.status == 200
        events = await long
        assert events[-1] == {"done": True}
    await asyncio.to_thread(wait_state, d.url, "gemma-a", "unloaded")
    rig.wait_for("the unit to be gone", lambda: not d.model_units())


async def test_autoload_off_requires_an_explicit_load(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"], **{"models-autoload": "no"})
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, d.url, "gemma-a")
        assert status == 400 and body["error"]["code"] == "model_not_loaded"
        assert not d.model_units()
        async with s.post(d.url + "/models/load", json={"model": "gemma-a"}) as r:
            assert r.status == 200
        status, body = await chat(s, d.url, "gemma-a")
        assert status == 200


HOSTILE = ["../x", "a\\x2db", "@", "a\0b", "x" * 300, "ü/../../etc", ".hidden", "", "gemma-a/"]


async def test_bad_requests_get_4xx_and_start_nothing(llamad_factory: Factory,
                                                      subtests: Any) -> None:
    d = llamad_factory(["gemma-a"], **{"max-body-mb": 1})
    cursor = d.journal_cursor()
    async with aiohttp.ClientSession() as s:
        for name in HOSTILE:
            with subtests.test(model=name):
                status, body = await chat(s, d.url, name)
                assert status in (400, 404), body
                assert body["error"]["source"] == "llamad" and body["error"]["message"]
        for bad, want in [(b"{not json", 400), (b"[1, 2]", 400), (b'{"model": 7}', 400),
                          (b'{"messages": []}', 400), (b"x" * (2 * 1024 * 1024), 413)]:
            with subtests.test(body=bad[:20]):
                async with s.post(d.url + "/v1/chat/completions", data=io.BytesIO(bad),
                                  headers={"Content-Type": "application/json"}) as r:
                    assert r.status == want
                    assert (await r.json())["error"]["source"] == "llamad"
        async with s.get(d.url + "/no/such/endpoint") as r:
            assert r.status == 404 and "error" in await r.json()
        async with s.post(d.url + "/models/load", json={"model": "../x"}) as r:
            assert r.status == 404
        async with s.get(d.url + "/props", params={"model": "nope"}) as r:
            assert r.status == 404
    assert d.model_units() == {}
    assert "llama-server@" not in d.box.journal("_PID=1", f"--after-cursor={cursor}")


async def test_keep_alive_is_validated(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"])
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, d.url, "gemma-a", keep_alive="soon")
    assert status == 400 and "keep_alive" in body["error"]["message"]
    assert d.model_units() == {}



async def test_tcp_backend(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"], backend="tcp")
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, d.url, "gemma-a")
    assert status == 200, body
    argv = models(d.url)["gemma-a"]["status"]["args"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "--port" in argv


async def test_queue_bound_answers_503_with_retry_after(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"], **{"queue-size": 2})
    async with aiohttp.ClientSession() as s:

        async def one() -> tuple[int, str | None]:
            body = {"model": "gemma-a", "max_tokens": 2,
                    "messages": [{"role": "user", "content": "Hi"}]}
            async with s.post(d.url + "/v1/chat/completions", json=body) as r:
                await r.read()
                return r.status, r.headers.get("Retry-After")
        results = await asyncio.gather(*(one() for _ in range(6)))
    statuses = sorted(status for status, _ in results)
    assert statuses.count(200) >= 2 and 503 in statuses, statuses
    assert all(retry is not None and int(retry) > 0 for status, retry in results
               if status == 503)
    assert d.starts("gemma-a") == 1


async def test_client_disconnect_frees_the_backend_slot(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"])
    body = {"model": "gemma-a", "messages": [{"role": "user", "content": "Go on."}],
            "max_tokens": 3000, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(d.url + "/v1/chat/completions", json=body) as r:
            for _ in range(3):
                await r.content.readline()
        # The response is closed: the connection is gone mid-stream.

        async def busy() -> bool:
            async with s.get(d.url + "/slots", params={"model": "gemma-a"}) as r:
                return any(slot["is_processing"] for slot in await r.json())
        async def idle() -> bool:
            return not await busy()
        await eventually("the backend slot to be free", idle, timeout=10, every=0.1)
        assert not await busy()
    assert models(d.url)["gemma-a"]["llamad"]["in_flight"] == 0


async def test_hot_added_model_is_served_and_removal_unlists_it(llamad_factory: Factory,
                                                                assets: rig.Assets) -> None:
    d = llamad_factory(["gemma-a"])
    new = d.models_dir / "gemma-new.gguf"
    os.link(assets.model, new)
    rig.wait_for("the new model to be listed", lambda: "gemma-new" in models(d.url),
                 timeout=30)
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, d.url, "gemma-new")
        assert status == 200 and body["model"] == "gemma-new"
        new.unlink()
        rig.wait_for("the removed model to leave the list",
                     lambda: "gemma-new" not in models(d.url), timeout=30)
        rig.wait_for("its unit to stop", lambda: "llama-server@gemma-new.service"
                     not in d.model_units(), timeout=30)
        status, body = await chat(s, d.url, "gemma-new")
    assert status == 404


async def test_api_keys_guard_everything_but_health(llamad_factory: Factory,
                                                    box: rig.Box) -> None:
    keys = box.workdir / "api-keys"
    keys.write_text("# one key per line\nsecret-1\n")
    d = llamad_factory(["gemma-a"], **{"api-keys-file": str(keys)})
    async with aiohttp.ClientSession() as s:
        async with s.get(d.url + "/health") as r:
            assert r.status == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret-1"}):
            async with s.get(d.url + "/v1/models", headers=headers) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "invalid_api_key"
        status, _ = await chat(s, d.url, "gemma-a")
        assert status == 401
        assert d.model_units() == {}
        async with s.get(d.url + "/v1/models",
                         headers={"Authorization": "Bearer secret-1"}) as r:
            assert r.status == 200
        async with s.get(d.url + "/v1/models", headers={"x-api-key": "secret-1"}) as r:
            assert r.status == 200
