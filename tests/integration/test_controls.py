"""Per-model controls (issue #24), in the box with the real llama-server and Gemma model:
a concurrency limit, a unit's environment, a second llama-server binary, a draft sidecar,
sleeping models, and configuration errors that answer 503 instead of leaving clients
hanging."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import rig
from helpers.daemon import (
    Factory,
    Llamad,
    chat,
    models,
    state,
    stream,
    tracebacks,
    wait_http,
    wait_state,
)


def fields(d: Llamad, model: str) -> dict[str, Any]:
    found: dict[str, Any] = models(d.url)[model]["llamad"]
    return found


def get(url: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, headers) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def metric(d: Llamad, name: str, model: str) -> float:
    """One sample of llamad's /metrics for a model; 0 if absent."""
    with urllib.request.urlopen(d.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name) and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_concurrency_limit_queues_in_order_and_answers_429_past_the_queue(
        llamad_factory: Factory) -> None:
    """concurrency-limit = 1 on a llama-server with 4 slots: one request at a time reaches
    it, the next ones wait in arrival order, one beyond queue-size gets 429, and a waiting
    client that leaves is dropped from the queue."""
    A = "conc-limit-a"
    d = llamad_factory([A], preset=f"[{A}]\nconcurrency-limit = 1\n", **{"queue-size": 2})
    spans: dict[str, list[float]] = {}

    def timed(name: str) -> Any:
        def on_event(n: int) -> None:
            spans.setdefault(name, []).append(time.monotonic())
        return on_event

    async with aiohttp.ClientSession() as s:
        async def when(what: str, probe: Any) -> None:
            await asyncio.to_thread(rig.wait_for, what, probe, 90)
        first = asyncio.ensure_future(stream(s, d.url, A, 40, timed("first")))
        await when("the first stream in flight", lambda: fields(d, A)["in_flight"] == 1)
        second = asyncio.ensure_future(stream(s, d.url, A, 40, timed("second")))
        await when("the second to queue", lambda: fields(d, A)["queued"] == 1)
        third = asyncio.ensure_future(stream(s, d.url, A, 40, timed("third")))
        await when("the third to queue", lambda: fields(d, A)["queued"] == 2)
        f = fields(d, A)
        assert (f["in_flight"], f["queued"], f["concurrency_limit"]) == (1, 2, 1), f
        assert metric(d, "llamad_model_concurrency_limit", A) == 1
        assert metric(d, "llamad_model_requests_queued", A) == 2
        body = {"model": A, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        async with s.post(d.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 429, await r.text()
            assert int(r.headers["Retry-After"]) > 0
            err = (await r.json())["error"]
            assert err["code"] == "queue_full" and "concurrency-limit 1" in err["message"]
        results = await asyncio.gather(first, second, third)
        # A fourth waits behind a fifth's place: its client leaves, and the fifth is next.
        fourth = asyncio.ensure_future(stream(s, d.url, A, 40, timed("fourth")))
        await when("the fourth in flight", lambda: fields(d, A)["in_flight"] == 1)
        leaver = asyncio.ensure_future(stream(s, d.url, A, 40, timed("leaver")))
        await when("one to queue", lambda: fields(d, A)["queued"] == 1)
        fifth = asyncio.ensure_future(stream(s, d.url, A, 40, timed("fifth")))
        await when("two to queue", lambda: fields(d, A)["queued"] == 2)
        leaver.cancel()  # the client closes its connection while waiting
        await when("the leaver to leave the queue", lambda: fields(d, A)["queued"] == 1)
        await asyncio.gather(fourth, fifth)
    for events in results:
        assert events[-1] == {"done": True} and not any("error" in e for e in events)
    # Each answer began only after the one before it had ended: one at a time, in order.
    assert spans["first"][-1] < spans["second"][0], spans
    assert spans["second"][-1] < spans["third"][0], spans
    assert spans["fourth"][-1] < spans["fifth"][0] and "leaver" not in spans
    assert fields(d, A)["served"] == 5


async def test_a_bad_preset_key_gets_503_naming_it_and_a_fixed_file_is_picked_up(
        llamad_factory: Factory) -> None:
    """An unknown key at start: requests for its model get 503 naming file, line and key
    at once, the other model serves, /health and STATUS= say it; fixed, it serves with no
    restart of llamad. Broken again on an edit: the running unit is left as it was."""
    A, B = "bad-key-a", "bad-key-b"
    good = f"[{A}]\nctx-size = 2048\n"
    bad = f"[{A}]\nctx-size = 2048\nfrobnicate = 3\n"
    d = llamad_factory([A, B], preset=bad, healthy=False)  # /health: 503 until fixed
    preset = d.dir / "presets.ini"
    wait_http(d.url, want=503)
    async with aiohttp.ClientSession() as s:
        began = time.monotonic()
        code, body = await chat(s, d.url, A)
        took = time.monotonic() - began
        assert code == 503 and took < 1.0, (code, took)
        message = body["error"]["message"]
        assert f"{preset}:3 [{A}]: unknown key 'frobnicate'" in message, message
        assert body["error"]["code"] == "configuration_error"
        code, body = await chat(s, d.url, B)  # untouched by the error
        assert code == 200, body
    status, health, _ = get(d.url + "/health")
    assert status == 503 and "frobnicate" in health["error"]["message"]
    assert "frobnicate" in d.show(d.unit, "StatusText")
    check = d.box.run([*d.command, "check-config", "--config", str(d.config)], check=False)
    assert check.returncode == 1 and f"{preset}:3 [{A}]: unknown key" in check.stderr
    pid = d.show(d.unit, "MainPID")
    preset.write_text(good)
    wait_http(d.url)  # picked up by the watcher: no restart
    async with aiohttp.ClientSession() as s:
        code, body = await chat(s, d.url, A)
        assert code == 200, body
        preset.write_text(bad)  # broken on an edit, while A runs
        edited = time.monotonic()
        await asyncio.to_thread(wait_http, d.url, 30, 503)  # the watcher saw the edit
        print(f"\nfirst 503 {took:.3f}s after the request; an edit seen in "
              f"{time.monotonic() - edited:.2f}s")
        code, body = await chat(s, d.url, A)
        assert code == 503 and "frobnicate" in body["error"]["message"]
        preset.write_text(good)
        await asyncio.to_thread(wait_http, d.url)
        code, body = await chat(s, d.url, A)
        assert code == 200, body
    assert d.show(d.unit, "MainPID") == pid and d.show(d.unit, "NRestarts") == "0"
    assert d.starts(A) == 1  # the unit kept its last good settings throughout


def test_a_bad_llamad_conf_answers_503_until_fixed(llamad_factory: Factory) -> None:
    """An error in llamad.conf at start: llamad answers every request with 503 naming file,
    line and key instead of exiting into a restart loop; fixed, it serves."""
    d = llamad_factory(["bad-conf-a"], start=False)
    conf = d.config.read_text()
    d.config.write_text(conf + "concurrency-limit = lots\n")
    line = conf.count("\n") + 1
    d.start()  # Type=notify: returns once llamad said READY=1 (standing by)
    began = time.monotonic()
    status, body, headers = get(d.url + "/v1/models")
    assert status == 503 and time.monotonic() - began < 1.0
    message = body["error"]["message"]
    assert f"{d.config}:{line}: concurrency-limit = 'lots' is invalid" in message, message
    assert int(headers["Retry-After"]) > 0
    assert get(d.url + "/health")[0] == 503
    assert "concurrency-limit" in d.show(d.unit, "StatusText")
    pid = d.show(d.unit, "MainPID")
    d.config.write_text(conf + "concurrency-limit = 2\n")
    wait_http(d.url)
    assert models(d.url)["bad-conf-a"]["llamad"]["concurrency_limit"] == 2
    assert d.show(d.unit, "MainPID") == pid and d.show(d.unit, "NRestarts") == "0"
    assert "Traceback" not in d.log(), tracebacks(d.log())


async def test_env_reaches_the_unit_and_the_process(llamad_factory: Factory) -> None:
    A, B = "env-a", "env-b"
    d = llamad_factory([A, B], preset="[*]\nenv = CTL_TEST_ALL=1\n"
                                      f"[{A}]\nenv = GGML_SCHED_MAX_COPIES=4, "
                                      "CTL_TEST_NOTE=two words, HIP_VISIBLE_DEVICES=0,1\n")
    async with aiohttp.ClientSession() as s:
        for model in (A, B):
            code, body = await chat(s, d.url, model)
            assert code == 200, body
    unit = f"llama-server@{A}.service"
    env = d.show(unit, "Environment")
    for pair in ("GGML_SCHED_MAX_COPIES=4", '"CTL_TEST_NOTE=two words"',
                 "HIP_VISIBLE_DEVICES=0,1", "CTL_TEST_ALL=1"):
        assert pair in env, env
    pid = d.show(unit, "MainPID")
    environ = d.box.run(["cat", f"/proc/{pid}/environ"]).stdout.split("\0")
    assert {"GGML_SCHED_MAX_COPIES=4", "CTL_TEST_NOTE=two words",
            "HIP_VISIBLE_DEVICES=0,1", "CTL_TEST_ALL=1"} <= set(environ)
    other = d.show(f"llama-server@{B}.service", "Environment")
    assert "CTL_TEST_ALL=1" in other and "GGML_SCHED_MAX_COPIES" not in other


FORK = """#!/bin/sh
# A llama-server fork: the real one, plus a flag of its own that presets may use.
if [ "$1" = "--help" ]; then
    {real} --help
    echo "--fork-flag N                           a flag only this fork has"
    exit 0
fi
echo "fork wrapper runs as $(basename "$0")" >&2
skip=0
for a do
    shift
    if [ "$skip" = 1 ]; then skip=0; echo "fork-flag is $a" >&2; continue; fi
    if [ "$a" = --fork-flag ]; then skip=1; continue; fi
    set -- "$@" "$a"
done
exec {real} "$@"
"""


async def test_a_second_llama_server_binary_for_one_model(llamad_factory: Factory,
                                                          box: rig.Box,
                                                          assets: rig.Assets) -> None:
    """`llama-server = PATH` in one model's section: that model's unit runs it, with flags
    checked against its own --help; the other model runs llamad.conf's binary, where the
    fork's flag is an unknown key."""
    A, B = "fork-a", "fork-b"
    fork = box.workdir / "fork-bin" / "llama-server-fork"
    fork.parent.mkdir(mode=0o755, exist_ok=True)
    fork.write_text(FORK.format(real=assets.llama_server))
    fork.chmod(0o755)
    d = llamad_factory([A, B], preset=f"[{A}]\nllama-server = {fork}\nfork-flag = 7\n")
    async with aiohttp.ClientSession() as s:
        for model in (A, B):
            code, body = await chat(s, d.url, model)
            assert code == 200, body
    assert d.show(f"llama-server@{A}.service", "ExecStart").split("argv[]=")[1].startswith(
        f"{fork} ")
    assert f"path={assets.llama_server} " in d.show(f"llama-server@{B}.service", "ExecStart")
    log = box.journal("-u", f"llama-server@{A}.service")
    assert "fork wrapper runs as llama-server-fork" in log and "fork-flag is 7" in log
    assert "fork wrapper" not in box.journal("-u", f"llama-server@{B}.service")
    args = models(d.url)[A]["status"]["args"]
    assert args[0] == str(fork) and args[args.index("--fork-flag") + 1] == "7"
    # The same key where the built-in llama-server runs the model: an unknown key.
    check = d.box.run([*d.command, "check-config", "--config", str(d.config)], check=False)
    assert check.returncode == 0, check.stderr
    (d.dir / "presets.ini").write_text(f"[{B}]\nfork-flag = 7\n")
    check = d.box.run([*d.command, "check-config", "--config", str(d.config)], check=False)
    assert check.returncode == 1 and "unknown key 'fork-flag'" in check.stderr


async def test_a_draft_sidecar_is_paired_listed_and_passed(llamad_factory: Factory,
                                                           assets: rig.Assets) -> None:
    """A model's directory holding mtp-*.gguf: as llama.cpp's router, it is the model's
    draft (--model-draft, the last spelling of -md), never a model of its own."""
    d = llamad_factory(["draft-single"])
    pair = d.models_dir / "draft-pair"
    pair.mkdir(mode=0o755)
    os.link(assets.model, pair / "gemma.gguf")
    os.link(assets.model, pair / "mtp-gemma.gguf")
    rig.wait_for("the pair to be listed", lambda: "draft-pair" in models(d.url))
    listed = models(d.url)
    assert not any("mtp" in name for name in listed), list(listed)
    entry = listed["draft-pair"]
    assert entry["llamad"]["draft"] == str(pair / "mtp-gemma.gguf")
    # Counted in the estimate: the draft is a second copy of the weights.
    single = rig.wait_for("gemma's entry", lambda: models(d.url).get("draft-single"))
    assert entry["llamad"]["estimate"]["ram"] > single["llamad"]["estimate"]["ram"] + 100 * 2**20
    args = entry["status"]["args"]
    assert args[args.index("--model-draft") + 1] == str(pair / "mtp-gemma.gguf")
    async with aiohttp.ClientSession() as s:
        code, body = await chat(s, d.url, "draft-pair")
        assert code == 200, body
    log = d.box.journal("-u", "llama-server@draft-pair.service")
    assert f"loading draft model '{pair / 'mtp-gemma.gguf'}'" in log, log[-2000:]


async def test_a_sleeping_model_is_shown_and_a_request_wakes_it(llamad_factory: Factory
                                                                ) -> None:
    """llama-server's own --sleep-idle-seconds: llamad shows the model sleeping (router
    mode's status too), counts what it freed as free, and a request wakes it in the same
    process, counted as a wake, not a load."""
    A = "sleepy-a"
    d = llamad_factory([A], preset=f"[{A}]\nsleep-idle-seconds = 2\n")
    async with aiohttp.ClientSession() as s:
        code, body = await chat(s, d.url, A)
        assert code == 200, body
        awake = rig.wait_for("an awake RAM sample", lambda: fields(d, A)["ram"], 30)
        wait_state(d.url, A, "sleeping", timeout=60)
        entry = models(d.url)[A]
        assert entry["status"]["value"] == "sleeping"
        asleep = rig.wait_for("an asleep RAM sample",
                              lambda: (lambda r: r if r and r < awake else None)(
                                  fields(d, A)["ram"]), 30)
        print(f"\nGemma 3 270M awake {awake / 2**20:.0f} MiB, asleep {asleep / 2**20:.0f} MiB")
        pid = d.show(f"llama-server@{A}.service", "MainPID")
        loads = metric(d, "llamad_model_load_duration_seconds_count", A)
        code, body = await chat(s, d.url, A, "Water boils at")
        assert code == 200, body
    assert state(d.url, A) in ("ready", "sleeping")
    assert d.show(f"llama-server@{A}.service", "MainPID") == pid and d.starts(A) == 1
    assert metric(d, "llamad_model_wakes_total", A) == 1
    assert metric(d, "llamad_model_load_duration_seconds_count", A) == loads == 1
    log = d.box.journal("-u", f"llama-server@{A}.service")
    assert "server is entering sleeping state" in log and "exiting sleeping state" in log
