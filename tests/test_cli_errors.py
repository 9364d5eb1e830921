"""Every client command's mistakes are one sentence and a non-zero status, never a traceback:
bad addresses and keys, answers of the wrong shape, a closed stdout, a terminal that is not
UTF-8, odd numbers on the command line; and the ps table stays aligned whatever the names."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from llamad.cli import LOG_LINES_MAX, ctl
from llamad.observe import logstream

WIDE = "m名前"  # two columns per CJK character on a terminal
ESC = "e\x1b[2Jx"


async def run(*args: str, env: dict[str, str] | None = None,
              stdout: int | None = asyncio.subprocess.PIPE) -> tuple[int, str, str]:
    """`llamad ARGS` in a child, while this loop serves the test's fake llamad."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llamad", *args, stdout=stdout,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, (out or b"").decode(), err.decode()


def one_sentence(code: int, err: str) -> None:
    assert code == 1 and err.startswith("llamad: ") and err.count("\n") == 1, (code, err)
    assert "Traceback" not in err


def status(names: list[str]) -> dict[str, Any]:
    row = {"state": "ready", "main_pid": 7, "ram": 1 << 20, "vram": None,
           "estimate": {"ram": 1 << 20, "vram": 0}, "in_flight": 0, "served": 0,
           "ttl_left": None}
    return {"status": "ok", "gpus": [], "models": {n: dict(row) for n in names}}


@pytest.fixture
async def daemon() -> AsyncIterator[str]:
    """A fake llamad: /status with odd names, an endless log, answers without fields."""
    async def get_status(request: web.Request) -> web.Response:
        return web.json_response(status([WIDE, ESC, "plain"]))

    async def log(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(5000):  # far more than a pipe holds
            await resp.write(b'data: {"time": 0, "unit": "u", "message": "line"}\n\n')
        return resp

    async def fieldless(request: web.Request) -> web.Response:
        return web.json_response({"success": True})  # a dict, but no model, no state
    app = web.Application()
    app.router.add_get("/status", get_status)
    app.router.add_get("/logs/stream", log)
    app.router.add_post("/models/{op}", fieldless)
    async with TestServer(app) as server:
        yield str(server.make_url("")).rstrip("/")


@pytest.mark.parametrize("url", ["http://[::1", "http://a b", "ftp://x", "http://", "nonsense"])
async def test_a_bad_url_is_one_sentence(url: str) -> None:
    for given in (("--url", url), ()):
        code, _, err = await run("ps", *given, env={"LLAMAD_URL": url})
        one_sentence(code, err)
        assert "such as http://127.0.0.1:8080" in err, err


async def test_a_url_without_scheme_is_http_as_ollama_host_is() -> None:
    """OLLAMA_HOST=127.0.0.1:11434 works without a scheme; so does --url."""
    assert ctl.Client.make(None, "127.0.0.1:8080").base == "http://127.0.0.1:8080"
    assert ctl.Client.make(None, "[::1]:8080/").base == "http://[::1]:8080"
    assert ctl.Client.make(None, "https://h.example:1").base == "https://h.example:1"


@pytest.mark.parametrize("key", ["a\nb", "ключ", "a b"])
async def test_a_key_that_cannot_be_sent_is_one_sentence(key: str, daemon: str) -> None:
    code, _, err = await run("ps", "--url", daemon, env={"LLAMAD_API_KEY": key})
    one_sentence(code, err)
    assert "LLAMAD_API_KEY" in err and key not in err, err


@pytest.mark.parametrize("args", [("load", "m"), ("unload", "m"), ("load", "m", "--wait")])
async def test_an_answer_without_llamads_fields_is_one_sentence(args: tuple[str, ...],
                                                                daemon: str) -> None:
    code, _, err = await run(*args, "--url", daemon)
    one_sentence(code, err)
    assert "not llamad's" in err, err


async def not_llamads(command: str, path: str, answer: web.Response) -> None:
    """`llamad COMMAND` against a server whose `path` gives `answer`: one sentence saying
    the answer is not llamad's."""
    async def handler(request: web.Request) -> web.Response:
        return answer
    app = web.Application()
    app.router.add_get(path, handler)
    async with TestServer(app) as server:
        code, _, err = await run(command, "--url", str(server.make_url("")))
    one_sentence(code, err)
    assert "not llamad's" in err, err


async def test_ps_of_a_status_without_models_is_one_sentence() -> None:
    await not_llamads("ps", "/status", web.json_response({"models": {"m": {"state": "ready"}}}))


async def test_logs_from_something_that_is_not_an_event_stream() -> None:
    """A web server's page at /logs/stream printed nothing and exited 0."""
    await not_llamads("logs", "/logs/stream",
                      web.Response(text="<html>hello</html>", content_type="text/html"))


@pytest.mark.parametrize("args", [("logs",), ("logs", "--json"), ("ps", "--watch", "0.01"),
                                  ("ps",)])
async def test_a_closed_stdout_ends_quietly(args: tuple[str, ...], daemon: str) -> None:
    """`llamad logs | head -1`: the reader went away, which is no error of llamad's, nor a
    sign that llamad "stopped sending its log"."""
    read, write = os.pipe()
    os.close(read)
    try:
        code, _, err = await run(*args, "--url", daemon, stdout=write)
    finally:
        os.close(write)
    assert err == "" and code != 0, (code, err)


async def test_a_terminal_that_is_not_utf8_gets_escapes(daemon: str) -> None:
    code, out, err = await run("ps", "--url", daemon, env={"PYTHONIOENCODING": "latin-1"})
    assert (code, err) == (0, "")
    assert "m\\u540d\\u524d" in out


@pytest.mark.parametrize("args", [("ps", "--watch", "-1"), ("ps", "--watch", "nan"),
                                  ("ps", "--watch", "0"), ("top", "--interval", "0"),
                                  ("load", "m", "--timeout", "nan"),
                                  ("load", "m", "--timeout", "-1"),
                                  ("logs", "-n", "-5"), ("logs", "-n", "10001")])
async def test_numbers_out_of_range_are_usage_errors(args: tuple[str, ...]) -> None:
    code, out, err = await run(*args, "--url", "http://127.0.0.1:9")
    assert code == 2 and out == "" and "Traceback" not in err, (code, err)
    assert err.splitlines()[-1].startswith(f"llamad {args[0]}: error: argument "), err


def test_ps_table_aligns_wide_and_escaped_names() -> None:
    lines = ctl.ps_table(status([WIDE, ESC, "plain"]))
    assert "\x1b" not in "".join(lines)
    # The STATE column starts at the same terminal column on every row.
    starts = {ctl.width(line[:line.index("STATE" if i == 0 else "ready")])
              for i, line in enumerate(lines[:4])}
    assert len(starts) == 1, lines


def test_width_counts_terminal_columns() -> None:
    assert ctl.width("abc") == 3
    assert ctl.width("名前") == 4
    assert ctl.width("e\u0301") == 1  # a combining accent takes no column


def test_logs_lines_limit_is_the_servers() -> None:
    """`llamad logs -n` refuses what /logs/stream would not send; one number, two places."""
    assert LOG_LINES_MAX == logstream.MAX_LINES


def test_a_stdout_closed_before_the_start_is_no_traceback(tmp_path: Path) -> None:
    """`llamad models --json >&-`: Python's sys.stdout is None then."""
    conf = tmp_path / "llamad.conf"
    (tmp_path / "models").mkdir()
    conf.write_text(f"models-dir = {tmp_path / 'models'}\nllama-cache = no\nollama-models =\n")
    out = subprocess.run(["bash", "-c", 'exec >&-; exec "$0" -m llamad models --json --config '
                          '"$1"', sys.executable, str(conf)], capture_output=False,
                         stderr=subprocess.PIPE, text=True, timeout=60,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert (out.returncode, out.stderr) == (0, "")
