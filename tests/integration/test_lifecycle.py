"""Crashes, crash loops, adoption across llamad restarts, socket activation, idle exit."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import aiohttp
import rig
from helpers import ggufgen
from helpers.daemon import (
    Factory,
    Llamad,
    chat,
    models,
    state,
    stream,
    wait_http,
    wait_state,
)


def _main_pid(d: Llamad, model: str) -> int:
    return int(d.show(f"llama-server@{model}.service", "MainPID") or 0)



async def test_backend_killed_mid_stream(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"])
    killed: list[int] = []

    def kill_once(n: int) -> None:
        if n == 5 and not killed:
            pid = _main_pid(d, "gemma-a")
            killed.append(pid)
            d.box.run(["kill", "-9", str(pid)])

    async with aiohttp.ClientSession() as s:
        events = await stream(s, d.url, "gemma-a", max_tokens=2000, on_event=kill_once)
        # The client learns of the failure in the stream itself, then the stream ends.
        assert killed
        assert "error" in events[-1], events[-3:]
        assert "backend" in json.dumps(events[-1])
        # systemd restarts it; the next request waits for it and succeeds.
        status, body = await chat(s, d.url, "gemma-a")
    assert status == 200, body
    assert int(d.show("llama-server@gemma-a.service", "NRestarts")) == 1
    assert _main_pid(d, "gemma-a") not in (0, killed[0])


async def test_backend_killed_before_a_plain_request_answers(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"])
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
        pending = asyncio.ensure_future(chat(s, d.url, "gemma-a", max_tokens=40,
                                             ignore_eos=True))
        await asyncio.to_thread(rig.wait_for, "the request to be in flight",
                                lambda: models(d.url)["gemma-a"]["llamad"]["in_flight"] == 1)
        killed = _main_pid(d, "gemma-a")
        d.box.run(["kill", "-9", str(killed)])
        status, body = await pending
    # No byte of the answer had come back: sent once more after systemd's restart.
    assert status == 200, body
    assert int(d.show("llama-server@gemma-a.service", "NRestarts")) == 1
    assert _main_pid(d, "gemma-a") not in (0, killed)


async def test_crash_loop_marks_the_model_failed(llamad_factory: Factory,
                                                 assets: rig.Assets) -> None:
    d = llamad_factory(["gemma-a"], **{"start-limit-burst": 3})
    # A GGUF whose header is fine but whose tensors llama-server can't load.
    ggufgen.write_model(d.models_dir / "broken.gguf")
    rig.wait_for("the watcher to offer broken", lambda: "broken" in models(d.url), timeout=30)
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, d.url, "broken")
        assert status == 503, body
        reason = models(d.url)["broken"]["llamad"]["reason"]
        assert "exit status" in reason or "start-limit-hit" in reason, reason
        assert models(d.url)["broken"]["status"]["failed"] is True
        starts = d.starts("broken")
        assert 1 <= starts <= 3
        # No restart storm: the failed unit stays down, and requests get the reason.
        status, body = await chat(s, d.url, "broken")
        assert status == 503 and "failed" in body["error"]["message"]
        assert d.starts("broken") == starts
        # The proxy stays healthy and serves the other model.
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
        # An explicit load resets the failure and tries again.
        async with s.post(d.url + "/models/load", json={"model": "broken"}) as r:
            assert r.status == 200
        await asyncio.to_thread(wait_state, d.url, "broken", "failed")
    assert d.starts("broken") > starts


async def test_restart_adopts_loaded_models(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a", "gemma-b"], **{"models-max": 2})
    async with aiohttp.ClientSession() as s:
        for model in ("gemma-a", "gemma-b"):
            assert (await chat(s, d.url, model))[0] == 200
    before = {m: d.show(f"llama-server@{m}.service", "InvocationID")
              for m in ("gemma-a", "gemma-b")}
    d.restart()
    wait_http(d.url)
    for model in ("gemma-a", "gemma-b"):
        wait_state(d.url, model, "ready", timeout=30)
        assert d.show(f"llama-server@{model}.service", "InvocationID") == before[model]
        assert d.starts(model) == 1
    assert "adopting llama-server@gemma-a.service" in d.log()
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-b"))[0] == 200


async def test_restart_stops_units_of_models_that_left(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a", "gemma-b"], **{"models-max": 2})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-b"))[0] == 200
    d.stop()
    (d.models_dir / "gemma-b.gguf").unlink()
    d.start()
    wait_http(d.url)
    rig.wait_for("the stale unit to stop", lambda: not d.model_units(), timeout=30)
    assert "stopping stale unit llama-server@gemma-b.service" in d.log()


def test_socket_activation_ready_status_and_idle_exit(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"], socket=True, **{"idle-exit": 3})
    assert d.box.run(["systemctl", "is-active", d.unit],
                     check=False).stdout.strip() == "inactive"
    url = d.url
    # The first connection starts llamad, and is answered by it.
    with urllib.request.urlopen(url + "/v1/models", timeout=60) as r:
        assert json.loads(r.read())["data"][0]["id"] == "gemma-a"
    assert d.show(d.unit, "ActiveState") == "active"
    assert d.show(d.unit, "StatusText").startswith("1 models, 0 loaded")
    # A model loads, then llamad exits when idle; the model keeps running.
    with urllib.request.urlopen(urllib.request.Request(
            url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": "gemma-a", "max_tokens": 4,
                             "messages": [{"role": "user", "content": "Hi"}]}).encode()),
            timeout=120) as r:
        assert r.status == 200
    invocation = d.show("llama-server@gemma-a.service", "InvocationID")
    rig.wait_for("llamad to exit when idle",
                 lambda: d.show(d.unit, "ActiveState") == "inactive", timeout=30)
    assert d.show("llama-server@gemma-a.service", "ActiveState") == "active"
    # The next connection starts llamad again, which adopts the running model.
    assert state(url, "gemma-a") in ("loading", "ready")
    wait_state(url, "gemma-a", "ready", timeout=30)
    assert d.show("llama-server@gemma-a.service", "InvocationID") == invocation
