"""`llamad haproxy-config`: HAProxy (Debian 12's 2.6) accepts what it prints, and the real
haproxy routes by the body's "model" and fails over as docs/scaling.md says. The llamad
hosts here are two small HTTP servers on 127.0.0.2 and 127.0.0.3 that say who they are;
tests/integration/test_haproxy_fleet.py puts real llamads there."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import yarl
from aiohttp import web
from helpers.ports import free_port
from helpers.watch import eventually

from llamad.cli import haproxy
from llamad.errors import ConfigError

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def check(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    return subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True,
                          timeout=30)


def test_haproxy_accepts_the_configuration(tmp_path: Path) -> None:
    text = haproxy.config(["127.0.0.2:8080", "[::1]:8081", "localhost:8082"],
                          "127.0.0.1:9000", {"gemma-a": "[::1]:8081"})
    out = check(text, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[WARNING]" not in out.stdout + out.stderr
    # A host name that does not resolve leaves that host out, not the balancer.
    out = check(haproxy.config(["127.0.0.2:8080", "llm-3.invalid:8080"], "127.0.0.1:9000"),
                tmp_path)
    assert out.returncode == 0 and "disabling server" in out.stdout + out.stderr
    assert "    server ::1:8081 [::1]:8081" in text
    assert "use-server ::1:8081 if { var(txn.model) -m str gemma-a }" in text


def test_the_command_prints_it_and_refuses_bad_input_in_a_sentence(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "llamad", "haproxy-config", *args],
                              capture_output=True, text=True, timeout=30)
    good = run("127.0.0.2:8080", "127.0.0.3:8080", "--place", "m=127.0.0.3:8080")
    assert good.returncode == 0 and check(good.stdout, tmp_path).returncode == 0
    for args, words in [
            (["127.0.0.2"], "'127.0.0.2' is not a llamad host; give HOST:PORT"),
            (["127.0.0.2:8080", "--place", "m=127.0.0.9:8080"], "not among the hosts"),
            (["127.0.0.2:8080", "--place", "a b=127.0.0.2:8080"], "is not MODEL=HOST:PORT"),
            # security-review-3 L11: a leading '-' would be one of HAProxy's match flags.
            (["127.0.0.2:8080", "--place=-i=127.0.0.2:8080"], "does not start with -"),
            (["127.0.0.2:8080", "--place=-f/etc/passwd=127.0.0.2:8080"],
             "does not start with -"),
            (["127.0.0.2:8080", "127.0.0.2:8080"], "given twice"),
            (["127.0.0.2:99999"], "is not a llamad host")]:
        out = run(*args)
        assert out.returncode == 1 and words in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    with pytest.raises(ConfigError):
        haproxy.config([], "127.0.0.1:9000")


def test_one_host_written_two_ways_is_one_host() -> None:
    """`10.0.0.2:8080` and `10.0.0.2:08080` (or `LLM-2` and `llm-2`) are one llamad:
    HAProxy took both as servers, so that host got twice its share of the models."""
    for twice in (["127.0.0.2:8080", "127.0.0.2:08080"], ["LLM-2:8080", "llm-2:8080"]):
        with pytest.raises(ConfigError, match="given twice"):
            haproxy.config(twice, "127.0.0.1:9000")
    hosts = [haproxy.host("LLM-2:08080")]
    assert haproxy.placements(["m=llm-2:8080"], hosts) == {"m": "llm-2:8080"}
    assert "    server llm-2:8080 llm-2:8080" in haproxy.config(hosts, "127.0.0.1:9000")


async def host_app(name: str) -> web.AppRunner:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def chat(request: web.Request) -> web.Response:
        return web.json_response({"host": name, "model": (await request.json())["model"]})

    async def other(request: web.Request) -> web.Response:
        return web.json_response({"host": name})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_route("*", "/{tail:.*}", other)
    runner = web.AppRunner(app)
    await runner.setup()
    return runner


@pytest.fixture
async def two_hosts(tmp_path: Path) -> AsyncIterator[tuple[str, dict[str, web.AppRunner]]]:
    runners = {}
    for ip in ("127.0.0.2", "127.0.0.3"):
        address = f"{ip}:{free_port(ip)}"
        runners[address] = await host_app(address)
        await web.TCPSite(runners[address], ip, int(address.split(":")[1])).start()
    listen = f"127.0.0.1:{free_port('127.0.0.1')}"
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy.config(list(runners), listen, {"pinned": list(runners)[1]}))
    proc = await asyncio.create_subprocess_exec(HAPROXY, "-db", "-f", str(cfg),
                                                stdout=asyncio.subprocess.DEVNULL)
    try:
        yield f"http://{listen}", runners
    finally:
        proc.terminate()
        await proc.wait()
        for runner in runners.values():
            await runner.cleanup()


async def post(s: aiohttp.ClientSession, url: str, model: str) -> tuple[int, str]:
    # "model" last and after a long prompt, as the OpenAI SDK sends it.
    body = {"messages": [{"role": "user", "content": "x" * 100_000}], "model": model}
    try:
        async with s.post(url + "/v1/chat/completions", json=body) as r:
            return r.status, (await r.json())["host"] if r.status == 200 else ""
    except aiohttp.ClientError:
        return 0, ""


async def haproxy_up(s: aiohttp.ClientSession, url: str) -> None:
    async def up() -> bool:
        return (await post(s, url, "pinned"))[0] == 200
    await eventually("haproxy to come up", up, timeout=10, every=0.05)


async def test_routes_by_model_and_fails_over(
        two_hosts: tuple[str, dict[str, web.AppRunner]]) -> None:
    url, runners = two_hosts
    first, second = runners
    names = [f"model-{i}" for i in range(12)]
    async with aiohttp.ClientSession() as s:
        await haproxy_up(s, url)
        # Each model always goes to one host; the models are spread over both.
        where = {m: {(await post(s, url, m))[1] for _ in range(3)} for m in names}
        assert all(len(hosts) == 1 for hosts in where.values()), where
        assert {h for hosts in where.values() for h in hosts} == {first, second}
        assert (await post(s, url, "pinned"))[1] == second
        # The second host dies: its models, the placed one too, are served by the first
        # at once (connection refused: the request is sent on), the others stay put.
        await runners[second].cleanup()
        after = {m: await post(s, url, m) for m in [*names, "pinned"]}
        assert after == {m: (200, first) for m in [*names, "pinned"]}, after


def named_elsewhere(model: str) -> list[tuple[str, str, Any]]:
    """Requests that name `model` elsewhere than in a body's "model": llama.cpp's web UI
    asks GET /props?model= when a model is picked, and looks up and resumes its streams
    as CONVERSATION::MODEL; a client asks a model's entry or journal by its path."""
    q = quote(model, safe="")
    conv = quote(f"chat-1::{model}", safe="")
    gets = [f"/props?model={q}&autoload=false", f"/props?model={q}", f"/slots?model={q}",
            f"/metrics?model={q}", f"/lora-adapters?model={q}", f"/v1/models/{q}",
            f"/logs/stream/{q}", f"/v1/stream?conv_id={conv}&from=0"]
    return [*(("GET", path, None) for path in gets), ("DELETE", f"/v1/models/{model}", None),
            ("DELETE", f"/v1/stream?conv_id={conv}", None),
            ("POST", "/v1/streams/lookup", {"conversation_ids": [f"chat-1::{model}"]})]


async def test_a_model_named_in_the_query_or_path_reaches_its_host(
        two_hosts: tuple[str, dict[str, web.AppRunner]]) -> None:
    """round 2: only the body's "model" was read, so these went round-robin: GET
    /props?model=M loaded M on a host where its chat requests never go (a second copy, or
    "not loaded" to the web UI while M served on its own host)."""
    url, runners = two_hosts
    names = [f"org/model-{i}" for i in range(8)]
    async with aiohttp.ClientSession() as s:
        await haproxy_up(s, url)
        home = {m: (await post(s, url, m))[1] for m in names}
        assert set(home.values()) == set(runners), home

        async def who(method: str, path: str, body: Any) -> str:
            async with s.request(method, yarl.URL(url + path, encoded=True), json=body) as r:
                return str((await r.json())["host"])
        wrong = [(m, method, path, host) for m in names
                 for method, path, body in named_elsewhere(m) for _ in range(2)
                 if (host := await who(method, path, body)) != home[m]]
    assert not wrong, wrong
