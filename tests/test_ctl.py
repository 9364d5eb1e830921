"""The daemon client's parts that need no daemon: completion, the ps table, the sentence
when llamad is not there. tests/integration/test_cli_daemon.py runs it against llamad."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers.ports import refused_url

from llamad.__main__ import parser
from llamad.cli import completion, ctl, pull
from llamad.errors import LlamadError


def complete(*words: str) -> list[str]:
    """What bash offers after `words` (the last one being completed)."""
    script = completion.bash(parser())
    line = " ".join(f"'{w}'" for w in words)
    # bash sets COMP_LINE and COMP_POINT too: the line up to the cursor, at its end here.
    out = subprocess.run(["bash", "-c", f'{script}\nCOMP_WORDS=({line}); COMP_LINE="$1"; '
                          f'COMP_POINT=${{#1}}; COMP_CWORD={len(words) - 1}; _llamad; '
                          'echo "${COMPREPLY[@]}"', "_", " ".join(words)],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_bash_completion_from_the_parser() -> None:
    assert complete("llamad", "lo") == ["load", "logs"]
    assert complete("llamad", "logs", "--f") == ["--follow"]
    assert "--watch" in complete("llamad", "ps", "--")
    assert complete("llamad", "completion", "--x") == []


def test_ps_table() -> None:
    status: dict[str, Any] = {
        "status": "2 models, 1 loaded: a", "gpus": [
            {"index": 0, "name": "H100", "used": 2 << 30, "total": 80 << 30}],
        "models": {"a": {"state": "ready", "main_pid": 42, "ram": 400 << 20, "vram": None,
                         "estimate": {"ram": 300 << 20, "vram": 100 << 20},
                         "load_seconds": 2.71, "in_flight": 1, "queued": 3, "served": 9,
                         "ttl_left": 299.6, "concurrency_limit": 2},
                   "b": {"state": "loading", "main_pid": 43, "ram": None, "vram": None,
                         "estimate": {"ram": 300 << 20, "vram": 0}, "in_flight": 0,
                         "served": 0, "ttl_left": None,
                         "fit": {"args": ["--ctx-size", "12288"], "ctx": 12288,
                                 "reason": "context 12288 of 131072: 9.1 GiB free on GPU 0 "
                                           "after evicting nothing"}}}}
    lines = ctl.ps_table(status)
    assert lines[0].split() == ["MODEL", "STATE", "PID", "RAM", "VRAM", "ESTIMATE", "LOAD",
                                "IN", "FLIGHT", "QUEUED", "SERVED", "TTL", "LEFT", "CONTEXT"]
    assert lines[1].split() == ["a", "ready", "42", "400", "MiB", "-", "400", "MiB", "2.7s",
                                "1/2", "3", "9", "300s", "-"]  # under its concurrency limit
    assert lines[2].split()[:2] == ["b", "loading"] and lines[2].split()[-1] == "12288"
    assert lines[3:] == ["b: context 12288 of 131072: 9.1 GiB free on GPU 0 after evicting "
                         "nothing", "GPU 0 H100: 2048 MiB used of 81920 MiB",
                         "2 models, 1 loaded: a"]


def test_log_events_and_lines() -> None:
    stream = io.BytesIO(b'id: c1\ndata: {"time": 0, "unit": "u", "priority": 6, '
                        b'"message": "hello\\u001b[31m"}\n\n: a comment\n\n')
    entries = list(ctl._events(ctl.Client("http://x", None), stream))
    assert entries == [{"id": "c1", "time": 0, "unit": "u", "priority": 6,
                        "message": "hello\x1b[31m"}]
    assert ctl._log_line(entries[0]).endswith(" u: hello\\x1b[31m")  # no escape to the tty


def test_not_running_is_one_sentence() -> None:
    with refused_url() as url:
        out = subprocess.run([sys.executable, "-m", "llamad", "unload", "x", "--url", url],
                             capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith(f"llamad: llamad is not running at {url} (connection "
                                 "refused)") and out.stderr.count("\n") == 1


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`llamad ARGS` in a child, while this loop serves the test's fake llamad."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llamad", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


ESC = "\x1b]0;PWNED\x07\x1b[2J"


async def test_what_a_server_says_cannot_drive_the_terminal() -> None:
    """security-review-3 L5: a failure reason is the model's journal tail, which holds what
    llama.cpp printed of a GGUF's strings; `llamad load --wait` printed it raw."""
    async def load(request: web.Request) -> web.Response:
        return web.json_response({"success": True, "model": f"m{ESC}", "state": "loading"})

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"models": {f"m{ESC}": {
            "state": "failed", "reason": f"unknown model architecture: '{ESC}'"}}})

    async def unload(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": f"no {ESC}", "source": "llamad"}},
                                 status=404)
    app = web.Application()
    app.router.add_post("/models/load", load)
    app.router.add_post("/models/unload", unload)
    app.router.add_get("/status", status)
    async with TestServer(app) as server:
        url = str(server.make_url("")).rstrip("/")
        for args in (("load", "m", "--wait"), ("load", "m"), ("unload", "m")):
            code, out, err = await _run(*args, "--url", url)
            assert "\x1b" not in out + err and "\x07" not in out + err, (args, out, err)
            assert "\\x1b]0;PWNED\\x07" in out + err, (args, out, err)
        assert code == 1 and err.count("\n") == 1


async def _redirected_with_a_proxy(args: tuple[str, ...], path: str,
                                   redirect: type[web.HTTPMove]
                                   ) -> tuple[int, str, str, list[str | None]]:
    """`llamad ARGS` with a key, against a server whose `path` redirects to another, with
    that other named as the environment's proxy: what it printed, and the Authorization
    headers the other server saw."""
    seen: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"models": {}, "status": "success", "gpus": []})
    other = web.Application()
    other.router.add_route("*", "/{any:.*}", elsewhere)
    async with TestServer(other) as thief:
        target = str(thief.make_url(path))

        async def send_on(request: web.Request) -> web.Response:
            raise redirect(target)
        front = web.Application()
        front.router.add_route("*", path, send_on)
        async with TestServer(front) as server:
            url = str(server.make_url("")).rstrip("/")
            code, out, err = await _run(*args, "--url", url, env={
                "LLAMAD_API_KEY": "sekrit", "http_proxy": target, "HTTP_PROXY": target})
    return code, out, err, seen


async def test_the_key_goes_to_llamad_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """security-review-3 L9: urllib sent the key on to wherever a redirect pointed, through
    any proxy named in the environment, and to whatever held llamad's port while
    llamad.socket was stopped."""
    code, _, err, seen = await _redirected_with_a_proxy(("ps",), "/status", web.HTTPFound)
    assert code == 1 and "HTTP 302" in err and "not as llamad" in err, err
    assert seen == []  # neither followed nor proxied

    monkeypatch.setenv("LLAMAD_API_KEY", "sekrit")
    monkeypatch.delenv("LLAMAD_URL", raising=False)
    monkeypatch.setattr(ctl, "llamad_socket", lambda: ("127.0.0.1:8080", False))
    with pytest.raises(LlamadError, match=r"llamad\.socket is not listening.*not sent"):
        ctl.Client.make(None, None)
    monkeypatch.setattr(ctl, "llamad_socket", lambda: ("127.0.0.1:8080", True))
    assert ctl.Client.make(None, None) == ctl.Client("http://127.0.0.1:8080", "sekrit")
    # An address given on purpose is trusted as given.
    monkeypatch.setattr(ctl, "llamad_socket", lambda: ("127.0.0.1:8080", False))
    assert ctl.Client.make(None, "http://10.0.0.2:8080/").key == "sekrit"


async def test_pull_sends_the_key_to_llamad_alone() -> None:
    """pull spoke through urllib's default opener: on to a redirect's target, through a
    proxy from the environment, with the key."""
    code, out, err, seen = await _redirected_with_a_proxy(
        ("pull", "user/repo"), "/api/pull", web.HTTPTemporaryRedirect)
    assert code == 1 and out == "" and "HTTP 307" in err and err.count("\n") == 1, err
    assert seen == []


async def _serving(answers: dict[str, bytes]) -> TestServer:
    async def answer(request: web.Request) -> web.StreamResponse:
        kind = "text/event-stream" if request.path.startswith("/logs") else "application/json"
        resp = web.StreamResponse(headers={"Content-Type": kind})
        await resp.prepare(request)
        await resp.write(answers[request.path])
        return resp
    app = web.Application()
    app.router.add_route("*", "/{any:.*}", answer)
    server = TestServer(app)
    await server.start_server()
    return server


async def test_an_answer_that_is_not_llamads_is_one_sentence(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What answers at --url may be another program: its answer, whatever its size or
    form, is read within a bound and said in one sentence."""
    monkeypatch.setattr(ctl, "ANSWER_MAX", 4 << 20)
    monkeypatch.setattr(ctl, "LINE_MAX", 1 << 20)
    server = await _serving({
        "/status": b"<html>" + b"x" * 100,
        "/models/load": b"[1, 2]",
        "/models/unload": b"{" + b" " * (5 << 20) + b"}",
        "/logs/stream": b"data: " + b"x" * (2 << 20) + b"\n\n",
        "/api/pull": b'{"status": "pulling manifest"}\nnot json\n',
    })
    client = ctl.Client(str(server.make_url("")).rstrip("/"), None)
    calls = {
        'answered "<html>xxx': lambda: ctl.cmd_ps(client, True, None),
        'answered "[1, 2]", not llamad\'s JSON': lambda: ctl.cmd_load(client, "m", False, 1,
                                                                     True),
        "answered more than 4 MiB, which llamad never does": lambda: ctl.cmd_unload(
            client, "m", True),
        "sent a line longer than 1 MiB": lambda: ctl.cmd_logs(client, None, False, 1, True),
        'answered "not json", not llamad\'s JSON': lambda: pull.cmd_pull(
            client, "user/repo", True, io.StringIO()),
    }
    try:
        for said, call in calls.items():
            with pytest.raises(LlamadError) as e:
                await asyncio.to_thread(call)
            assert e.value.message.startswith(client.base), e.value.message
            assert said in e.value.message and "\n" not in e.value.message, e.value.message
    finally:
        await server.close()


async def test_a_refusal_in_ollamas_shape_is_llamads_on_ollamas_routes() -> None:
    """llamad answers errors under /api/ as Ollama does, {"error": "..."}: pull says them as
    they are; the same shape on llamad's own routes is another program's."""
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": "model 'x' already exists"}, status=400)
    app = web.Application()
    app.router.add_route("*", "/{any:.*}", refuse)
    async with TestServer(app) as server:
        client = ctl.Client(str(server.make_url("")).rstrip("/"), None)
        with pytest.raises(LlamadError) as e:
            await asyncio.to_thread(pull.cmd_pull, client, "x", True, io.StringIO())
        assert e.value.message == "model 'x' already exists"
        with pytest.raises(LlamadError) as e:
            await asyncio.to_thread(ctl.cmd_unload, client, "x", True)
        assert "(HTTP 400), not as llamad" in e.value.message


async def test_a_stream_cut_midway_is_one_sentence() -> None:
    """llamad restarted (or killed) while `logs -f` or `pull` reads its stream: the cut
    is said, not a traceback."""
    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"time": 0, "message": "one"}\n\n' if "logs" in request.path
                         else b'{"status": "pulling manifest"}\n')
        assert request.transport is not None
        request.transport.abort()  # mid-chunk: no terminating chunk ever comes
        return resp
    app = web.Application()
    app.router.add_route("*", "/{any:.*}", cut)
    async with TestServer(app) as server:
        url = str(server.make_url("")).rstrip("/")
        for args, said in ((("logs", "-f"), "stopped sending its log"),
                           (("pull", "user/repo"), "stopped answering while pulling")):
            code, out, err = await _run(*args, "--url", url)
            assert code == 1 and said in err and err.count("\n") == 1, (args, out, err)
