"""Attacks on llamad from docs/security.md, each tried on the real box: hostile file names,
slow clients, keys, browsers, memory, local users."""

from __future__ import annotations

import asyncio
import io
import json
import os
import resource
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import rig
from helpers.daemon import PYTHON, Factory, Llamad, chat, models, stream, wait_state
from helpers.watch import eventually

# A file name that, written raw into a transient unit file, adds a command systemd runs as
# root when the unit stops after a daemon-reload. A file name holds no '/': `touch` is
# found on systemd's fixed search path, and its relative path lands in /, the working
# directory of system services.
MARKER = "llamad-pwned"
INJECTED = f"evil\n[Service]\nExecStopPost=+touch {MARKER}"
SAFE = ("50%-off", "br[ack]et")


async def test_hostile_file_names_never_reach_systemd_raw(llamad_factory: Factory,
                                                          assets: rig.Assets,
                                                          subtests: Any) -> None:
    d = llamad_factory(["gemma-a"])
    for name in (INJECTED, *SAFE):
        os.link(assets.model, d.models_dir / f"{name}.gguf")
    rig.wait_for("the catalog to take the new files",
                 lambda: set(SAFE) <= set(models(d.url)), timeout=30)
    listed = models(d.url)
    async with aiohttp.ClientSession() as s:
        answers = {name: await chat(s, d.url, name) for name in (INJECTED, *SAFE)}
    units = {name: m["llamad"]["unit"] for name, m in listed.items() if name != "gemma-a"}
    files = {name: d.box.run(["cat", f"/run/systemd/transient/{unit}"], check=False).stdout
             for name, unit in units.items()}
    # systemd reads the transient files back; then every model's unit is stopped (by
    # systemctl: llamad itself loses track of its units on a daemon-reload today).
    d.box.run(["systemctl", "daemon-reload"])
    shown = {name: d.show(unit, "Description") for name, unit in units.items()}
    d.box.run(["systemctl", "stop", *units.values()])

    rig.wait_for("the units to stop", lambda: not d.model_units(), timeout=60)
    with subtests.test("nothing injected ran"):
        assert d.box.run(["test", "-e", f"/{MARKER}"], check=False).returncode == 1
    with subtests.test("refused at scan time, one problem line naming the file"):
        assert INJECTED not in listed and answers[INJECTED][0] == 404, answers[INJECTED]
        log = d.log()
        assert f"{d.models_dir}/evil\\n[Service]\\nExecStopPost=+touch {MARKER}.gguf" in log
        assert not any(line.startswith(("[Service]", "ExecStopPost")) for line in
                       log.splitlines())
    for name in SAFE:
        with subtests.test("served safely", model=name):
            assert answers[name][0] == 200, answers[name]
            descriptions = [line for line in files[name].splitlines()
                            if line.startswith("Description=")]
            assert descriptions == [f"Description={name.replace('%', '%%')}"], files[name]
            assert "ExecStopPost" not in files[name]
            assert shown[name] == name


# Names a file may have (up to 250 bytes before .gguf): each is served. systemd names a
# unit's PrivateTmp= directory systemd-private-<boot id>-<unit>-XXXXXX, one path component
# of at most 255 bytes: a unit name past 199 bytes failed every start ('File name too long',
# result 'resources'), so a model named by a long file name never ran.
ODD_NAMES = ("y" * 200, "z" * 250, "uni\u00e9\u4e2d", ".dot", "a..b")
# A C1 control character (U+009B is CSI to a terminal that takes 8-bit controls, as xterm
# does): refused like the C0 ones.
C1_NAME = "c1\u009b2J"


async def test_long_and_odd_names_are_served_and_c1_controls_refused(
        llamad_factory: Factory, subtests: Any) -> None:
    d = llamad_factory([*ODD_NAMES, C1_NAME], **{"models-max": 1})
    listed = models(d.url)
    async with aiohttp.ClientSession() as s:
        for name in ODD_NAMES:
            with subtests.test("served", model=name[:12]):
                status, body = await chat(s, d.url, name)
                assert status == 200 and body["model"] == name, body
        status, body = await chat(s, d.url, C1_NAME)
    with subtests.test("the C1 control refused at scan time, one problem line"):
        assert C1_NAME not in listed and status == 404, body
        assert "c1\\x9b2J.gguf: the model's name holds control characters; skipped" in \
            d.log()


async def test_control_characters_from_presets_never_reach_systemd(
        llamad_factory: Factory) -> None:
    # A tab inside a preset value passes the INI parser; it must still never reach systemd.
    # It is refused where it is read, naming the file, line and key (d0f635c); the D-Bus
    # boundary refuses any that come another way (test_safetext.py).
    d = llamad_factory(["gemma-a"], preset="[gemma-a]\nchat-template = a\tb\n")
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, d.url, "gemma-a")
    assert status == 503, body
    message = body["error"]["message"]
    assert "presets.ini:2 [gemma-a]: chat-template" in message, message
    assert "control characters" in message
    assert d.model_units() == {}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _get(url: str, key: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=_auth(key)),
                                    timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def http_json(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """(status, decoded JSON answer) of a GET, or of a JSON POST of `body`."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def test_a_key_file_without_keys_serves_nothing_and_fails_check_config(
        llamad_factory: Factory, box: rig.Box, subtests: Any) -> None:
    """Fails closed: llamad stands by (issue #24: no restart loop with clients queued on
    the socket), and every request, keyed or not, gets a 503 naming the problem; no model
    is served or started."""
    keys = box.workdir / "no-keys"
    keys.write_text("# keys go here, one a line\n")
    for path, why in [(keys, "holds no key"), (box.workdir / "absent", "cannot be read")]:
        with subtests.test(why=why):
            d = llamad_factory(["gemma-a"], healthy=False, **{"api-keys-file": str(path)})
            for route in ("/v1/models", "/health"):
                status, body = http_json(d.url + route)
                assert status == 503 and f"api-keys-file {why}" in body["error"]["message"]
            status, _ = http_json(d.url + "/v1/chat/completions", {"model": "gemma-a"})
            assert status == 503 and d.model_units() == {}
            assert f"{path}: api-keys-file {why}" in d.log()
            out = box.run([str(PYTHON), "-m", "llamad", "check-config", "--config",
                           str(d.config)], check=False)
            assert out.returncode == 1 and f"llamad: {path}: api-keys-file {why}" in out.stderr


async def test_key_scopes_and_reload(llamad_factory: Factory, box: rig.Box) -> None:
    keys = box.workdir / "scoped-keys"
    keys.write_text("boss admin\nplain\nnarrow models=gemma-b\n")
    keys.chmod(0o644)
    d = llamad_factory(["gemma-a", "gemma-b"], **{"api-keys-file": str(keys)})
    assert "readable by group or others (mode 0644)" in d.log()
    body = {"model": "gemma-a"}
    async with aiohttp.ClientSession() as s:
        async def status(method: str, path: str, key: str, **kw: Any) -> int:
            async with s.request(method, d.url + path, headers=_auth(key), **kw) as r:
                await r.read()
                return r.status

        # Management needs an admin key.
        cases: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", "/models/load", {"json": body}), ("POST", "/models/unload", {"json": body}),
            ("GET", "/status", {}), ("GET", "/logs/stream", {})]
        for method, path, kw in cases:
            assert await status(method, path, "plain", **kw) == 403, path
            assert await status(method, path, "narrow", **kw) in (403, 404), path
        assert await status("GET", "/status", "boss") == 200
        # With keys, any Host name may reach llamad (it is meant to be exposed then).
        async with s.get(d.url + "/v1/models",
                         headers={**_auth("plain"), "Host": "llm.example.org"}) as r:
            assert r.status == 200
        assert d.model_units() == {}
        # A scoped key sees and uses only its models.
        async with s.get(d.url + "/v1/models", headers=_auth("narrow")) as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["gemma-b"]
        async with s.get(d.url + "/v1/models", headers=_auth("plain")) as r:
            assert len((await r.json())["data"]) == 2
        assert await status("POST", "/v1/chat/completions", "narrow", json=body) == 404
        assert await status("GET", "/props?model=gemma-a", "narrow") == 404
        assert d.model_units() == {}
        status_b, answer = await chat(s, d.url, "gemma-b", headers=_auth("narrow"))
        assert status_b == 200, answer
        # keep_alive is an admin's say: a plain key's is ignored (the model stays), not
        # refused, as clients such as Continue send one with every request.
        status_b, answer = await chat(s, d.url, "gemma-b", headers=_auth("narrow"),
                                      keep_alive=0)
        assert status_b == 200, answer
        assert list(d.model_units()) == ["llama-server@gemma-b.service"]

        # systemctl reload reads the file again: a new key works, a removed one no more.
        keys.write_text("boss admin\nnewer\n")
        box.run(["systemctl", "reload", d.unit])
        rig.wait_for("the new key to work", lambda: _get(d.url + "/v1/models", "newer") == 200)
        assert await status("GET", "/v1/models", "plain") == 401
        # A broken file fails the reload and keeps the keys in force.
        keys.write_text("# emptied by mistake\n")
        out = box.run(["systemctl", "reload", d.unit], check=False)
        assert out.returncode != 0
        assert await status("GET", "/v1/models", "newer") == 200


async def test_browsers_cannot_drive_the_api(llamad_factory: Factory, subtests: Any) -> None:
    ui = "http://ui.example:3000"
    d = llamad_factory(["gemma-a"], **{"allowed-hosts": "llm.example",
                                       "cors-origins": ui})
    port = d.port
    body = b'{"model": "gemma-a"}'
    async with aiohttp.ClientSession() as s:
        async def post(path: str, data: bytes, **headers: str) -> int:
            async with s.post(d.url + path, data=data, headers=headers) as r:
                await r.read()
                return r.status

        with subtests.test("a page's form content types are refused before anything happens"):
            for ctype in ("text/plain", "application/x-www-form-urlencoded",
                          "multipart/form-data; boundary=x"):
                assert await post("/models/load", body, Origin=ui,
                                  **{"Content-Type": ctype}) == 415
                assert await post("/v1/chat/completions", body, Origin=ui,
                                  **{"Content-Type": ctype}) == 415
            assert await post("/models/unload", body, Origin=ui) == 415  # no type at all
            assert d.model_units() == {}
            assert await post("/models/load", body, Origin=ui, **{
                "Content-Type": "application/json; charset=utf-8"}) == 200
            # No Origin: no browser's. curl -d's type is read as JSON, as Ollama reads it.
            assert await post("/models/unload", body, **{
                "Content-Type": "application/x-www-form-urlencoded"}) == 200

        with subtests.test("DNS rebinding: only local or allowed Host names"):
            for host, want in [(f"rebind.attacker.example:{port}", 403), ("localhost", 200),
                               (f"[::1]:{port}", 200), ("127.0.0.2", 200), ("0.0.0.0", 200),
                               (f"LLM.example.:{port}", 200), ("gemma.localhost", 200)]:
                async with s.get(d.url + "/v1/models", headers={"Host": host}) as r:
                    assert r.status == want, host
            async with s.get(d.url + "/v1/models",
                             headers={"Host": "rebind.attacker.example"}) as r:
                assert (await r.json())["error"]["code"] == "host_not_allowed"

        with subtests.test("a cross-origin POST is refused, a same-origin one is not"):
            json_type = {"Content-Type": "application/json"}
            assert await post("/models/unload", body, Origin="http://evil.example",
                              **json_type) == 403
            assert await post("/models/unload", body, Origin=d.url, **json_type) == 200

        with subtests.test("CORS is llamad's own"):
            # llama-server answers every origin with its own CORS headers: llamad drops them.
            # (The model was unloaded just above: load it, and wait until it is gone first.)
            await asyncio.to_thread(rig.wait_for, "gemma-a to be unloaded",
                                    lambda: models(d.url)["gemma-a"]["llamad"]["state"]
                                    in ("unloaded", "ready"), 60)
            assert await post("/models/load", body, **{"Content-Type": "application/json"}) \
                == 200
            await asyncio.to_thread(wait_state, d.url, "gemma-a", "ready")
            for origin, allowed in (("http://evil.example", None), (ui, ui)):
                async with s.get(d.url + "/props", params={"model": "gemma-a"},
                                 headers={"Origin": origin}) as r:
                    assert r.status == 200
                    assert r.headers.get("Access-Control-Allow-Origin") == allowed
                    assert "Access-Control-Allow-Credentials" not in r.headers
            preflight = {"Access-Control-Request-Method": "POST",
                         "Access-Control-Request-Headers": "authorization,content-type"}
            async with s.options(d.url + "/v1/chat/completions",
                                 headers={"Origin": ui, **preflight}) as r:
                assert r.status == 204
                assert r.headers["Access-Control-Allow-Origin"] == ui
                assert "POST" in r.headers["Access-Control-Allow-Methods"]
            async with s.options(d.url + "/v1/chat/completions",
                                 headers={"Origin": "http://evil.example", **preflight}) as r:
                assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers


async def test_bodies_bad_json_and_the_global_bound(llamad_factory: Factory,
                                                   subtests: Any) -> None:
    d = llamad_factory(["gemma-a"], **{"max-body-mb": 2, "max-bodies-mb": 3})
    json_type = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        for what, body in [
                ("deeply nested", b'{"model": "gemma-a", "x": ' + b"[" * 100_000 +
                 b"]" * 100_000 + b"}"),
                ("NaN keep_alive", b'{"model": "gemma-a", "keep_alive": NaN}'),
                ("Infinity keep_alive", b'{"model": "gemma-a", "keep_alive": Infinity}'),
                ("huge keep_alive", b'{"model": "gemma-a", "keep_alive": 1e999}'),
                ("non-UTF-8", b'{"model": "gemma-a", "messages": "caf\xe9"}')]:
            with subtests.test(what):
                async with s.post(d.url + "/v1/chat/completions", data=io.BytesIO(body),
                                  headers=json_type) as r:
                    assert r.status == 400, await r.text()
                    assert (await r.json())["error"]["source"] == "llamad"
        assert d.model_units() == {}

        with subtests.test("bodies held at once are bounded"):
            # One client announces 2 MiB and sends it slowly; llamad holds room for it.
            size = 2 * 1024 * 1024

            async def slow_first() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
                writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {size}\r\n"
                             '\r\n{"model": "gemma-a", "x": "'.encode())
                await writer.drain()
                return reader, writer

            first = await slow_first()
            second = b'{"model": "no-such-model", "x": "' + b"y" * (size - 40) + b'"}'

            async def until(want: int) -> None:
                async def answered() -> bool:
                    nonlocal first
                    async with s.post(d.url + "/v1/chat/completions", data=io.BytesIO(second),
                                      headers=json_type) as r:
                        await r.read()
                        if r.status == want == 503:
                            assert int(r.headers["Retry-After"]) > 0
                    if want == 503 and r.status != 503:
                        # A second that llamad read before the first left no room for the
                        # first: it was answered (or its time ran out). Start it again.
                        try:
                            await asyncio.wait_for(first[0].read(1), 0.05)
                        except TimeoutError:
                            pass  # still waiting for its body: llamad holds it
                        else:
                            first[1].close()
                            first = await slow_first()
                    return r.status == want
                await eventually(f"a {want}", answered, timeout=30, every=0.1)
            # A second 2 MiB would make 4 MiB held, over max-bodies-mb = 3: refused unread.
            try:
                await until(503)
            finally:
                first[1].close()
            await until(404)  # room again once the first is gone
        assert d.model_units() == {}


Trickler = tuple[asyncio.StreamReader, "asyncio.Future[None]"]


async def _trickle(port: int, every: float = 1.0) -> Trickler:
    """A connection that sends a request's header lines one by one, never the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")

    async def more() -> None:
        try:
            while not writer.is_closing():
                await asyncio.sleep(every)
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            writer.close()  # also when cancelled
    return reader, asyncio.ensure_future(more())


async def _connections(port: int, n: int) -> list[Trickler]:
    out: list[Trickler] = []
    for start in range(0, n, 100):  # in batches: the listen backlog is 1024
        out += await asyncio.gather(*(_trickle(port) for _ in range(start, min(n, start + 100))))
    return out


def _refused(url: str, code: str) -> dict[str, Any] | None:
    """The error body of a 503 with this code and a Retry-After, or None."""
    try:
        urllib.request.urlopen(url, timeout=10).close()
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        if e.code == 503 and body["error"]["code"] == code and int(e.headers["Retry-After"]):
            return dict(body)
    return None


def _unchanged(d: Llamad, model: str, pid: str) -> None:
    unit = f"llama-server@{model}.service"
    assert models(d.url)[model]["llamad"]["state"] == "ready"
    assert d.show(unit, "MainPID") == pid and d.show(unit, "NRestarts") == "0"
    assert "refused a connection" not in d.log() and "failed" not in d.log()


async def test_slow_clients_cannot_starve_llamad(llamad_factory: Factory,
                                                 subtests: Any) -> None:
    # 1,100 connections and more need more descriptors than a test process gets by default.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    d = llamad_factory(["gemma-a"], **{"receive-timeout": 20, "max-connections": 1150,
                                       "max-requests": 2})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
        pid = d.show("llama-server@gemma-a.service", "MainPID")
        slow = await _connections(d.port, 1100)
        with subtests.test("a real request is answered"):
            status, body = await chat(s, d.url, "gemma-a")
            assert status == 200, body

        with subtests.test("beyond max-connections: 503 with Retry-After"):
            extra = [await asyncio.open_connection("127.0.0.1", d.port) for _ in range(60)]
            answers = [await asyncio.wait_for(r.read(), 10) for r, _ in extra[-5:]]
            assert all(a.startswith(b"HTTP/1.1 503") and b"Retry-After: " in a
                       and b"max-connections" in a for a in answers), answers
            for _, w in extra:
                w.close()

        with subtests.test("beyond max-requests: 503 with Retry-After"):
            streams = [asyncio.ensure_future(stream(s, d.url, "gemma-a", max_tokens=400))
                       for _ in range(2)]
            refused = await asyncio.to_thread(rig.wait_for, "a third request refused", lambda:
                                              _refused(d.url + "/v1/models", "too_many_requests"))
            assert "max-requests" in refused["error"]["message"]
            for streaming in streams:
                streaming.cancel()

        with subtests.test("the slow ones are closed by the deadline, with 408"):
            answers = await asyncio.gather(*(asyncio.wait_for(r.read(), 60) for r, _ in slow))
            assert all(a.startswith(b"HTTP/1.1 408") for a in answers), \
                {a[:40] for a in answers}
        with subtests.test("no model changed state"):
            _unchanged(d, "gemma-a", pid)
        for _, task in slow:
            task.cancel()


def _backend_connections(box: rig.Box, pid: str) -> int:
    """UNIX connections from process `pid` to a llama.sock (ss shows every box's sockets,
    so they are matched by inode)."""
    rows = [line.split() for line in box.run(["ss", "-xpH"]).stdout.splitlines()]
    mine = {row[5] for row in rows if len(row) > 8 and f"pid={pid}," in row[8]}
    return sum(1 for row in rows if len(row) > 7 and row[4].endswith("/llama.sock")
               and row[7] in mine)


async def test_out_of_descriptors_is_503_and_changes_no_model(llamad_factory: Factory,
                                                              box: rig.Box,
                                                              subtests: Any) -> None:
    """With its descriptors used up, llamad cannot reach a healthy backend: that is llamad's
    trouble (503), not the model's (whose state must not change)."""
    # liveness-timeout = 0: no /health probes, which would keep a pooled connection to the
    # backend for the request to reuse (that llamad does not take a probe it cannot make
    # for a wedge is tests/test_supervisor.py's test_a_probe_llamad_cannot_make_is_no_wedge).
    d = llamad_factory(["gemma-a"], unit=("LimitNOFILE=100",),  # llamad cannot lift it
                       # asyncio logs each accept that fails, with its traceback.
                       tracebacks_after=("socket.accept() out of system resource",),
                       **{"queue-timeout": 20, "max-connections": 1000, "liveness-timeout": 0})
    slow: list[Trickler] = []
    try:
        async with aiohttp.ClientSession() as s, s.post(
                d.url + "/models/load", json={"model": "gemma-a"}) as r:
            assert r.status == 200
        await asyncio.to_thread(wait_state, d.url, "gemma-a", "ready")
        unit = "llama-server@gemma-a.service"
        pid, llamad_pid = d.show(unit, "MainPID"), d.show(d.unit, "MainPID")
        # A request whose body is not finished yet: accepted while descriptors are free.
        body = json.dumps({"model": "gemma-a", "max_tokens": 4,
                           "messages": [{"role": "user", "content": "Hi"}]}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:-1])
        await writer.drain()
        # llamad keeps no connection to the backend (llama-server closes idle ones)...
        await asyncio.to_thread(rig.wait_for, "llamad's idle backend connections to close",
                                lambda: _backend_connections(box, llamad_pid) == 0,
                                timeout=30)
        # ... and then every descriptor it may have is taken by slow clients.
        slow = await _connections(d.port, 150)
        await asyncio.to_thread(rig.wait_for, "llamad to run out of descriptors",
                                lambda: len(box.run(["ls", f"/proc/{llamad_pid}/fd"]).stdout
                                            .split()) >= 99, timeout=30)
        writer.write(body[-1:])
        answer = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        with subtests.test("503 with Retry-After"):
            assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
            assert b"Retry-After: " in answer and b"llamad_overloaded" in answer
        with subtests.test("no model changed state"):
            for _, task in slow:
                task.cancel()
            await asyncio.gather(*(task for _, task in slow), return_exceptions=True)
            await asyncio.to_thread(_unchanged, d, "gemma-a", pid)
    finally:
        for _, task in slow:
            task.cancel()


CONNECT = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n"
           "    s.connect(sys.argv[1])\n    print('CONNECTED')\n"
           "except OSError as e:\n    print('REFUSED', e.errno)\n")
TOKEN = "hf_SeCrEt1234567890"


def _connect(box: rig.Box, path: str, *prefix: str) -> str:
    return box.run([*prefix, "python3", "-c", CONNECT, path], check=False).stdout.strip()


def _credentials(box: rig.Box, pid: str) -> tuple[str, str]:
    status = box.run(["cat", f"/proc/{pid}/status"]).stdout.splitlines()
    uid, gid = (next(x for x in status if x.startswith(k)).split()[1] for k in ("Uid:", "Gid:"))
    return uid, gid


async def test_only_llamad_reaches_a_model_and_secrets_stay(llamad_factory: Factory,
                                                           box: rig.Box, subtests: Any) -> None:
    # units/llamad.sysusers makes the group where the package is installed.
    box.run("getent group llamad-backend || groupadd -r llamad-backend")
    d = llamad_factory(["gemma-a", "gemma-b"], preset=f"[*]\nhf-token = {TOKEN}\n")
    async with aiohttp.ClientSession() as s:
        for model in ("gemma-a", "gemma-b"):
            status, body = await chat(s, d.url, model)
            assert status == 200, body
        async with s.get(d.url + "/status") as r:
            status_text = await r.text()
    sock_a = "/run/llamad/gemma-a/llama.sock"
    pid_a, pid_b = (d.show(f"llama-server@{m}.service", "MainPID") for m in ("gemma-a", "gemma-b"))
    with subtests.test("another local user cannot connect"):
        nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
        assert _connect(box, sock_a, *nobody) == "REFUSED 13"
    with subtests.test("llamad.service's own sandbox can, through the group alone"):
        run = ("systemd-run", "--wait", "--pipe", "--quiet", "-p", "CapabilityBoundingSet=",
               "-p", "PrivateUsers=yes", "-p", "NoNewPrivileges=yes")
        assert _connect(box, sock_a, *run, "-p", "SupplementaryGroups=llamad-backend") \
            == "CONNECTED"
        assert _connect(box, sock_a, *run) == "REFUSED 13"
    with subtests.test("another model's unit cannot, nor reach the system bus"):
        uid, gid = _credentials(box, pid_b)  # gemma-b's own, in its own namespaces
        inside_b = ("nsenter", "-t", pid_b, "-a", "-S", uid, "-G", gid)
        assert _connect(box, sock_a, *inside_b).startswith("REFUSED")
        assert _connect(box, "/run/dbus/system_bus_socket", *inside_b).startswith("REFUSED")
        assert _connect(box, "/run/llamad/gemma-b/llama.sock", *inside_b) == "CONNECTED"
    with subtests.test("UMask 0007 and the sandbox score"):
        assert d.show("llama-server@gemma-a.service", "UMask") == "0007"
        report = box.run(["systemd-analyze", "security", "--no-pager",
                          "llama-server@gemma-a.service"], check=False).stdout
        score = float(report.split("Overall exposure level for")[1].split(":")[1].split()[0])
        assert score <= 1.0, report
    with subtests.test("the hf-token never leaves"):
        listing = urllib.request.urlopen(d.url + "/v1/models", timeout=10).read().decode()
        exec_start = d.show("llama-server@gemma-a.service", "ExecStart")
        cmdline = box.run(["cat", f"/proc/{pid_a}/cmdline"]).stdout
        for where, text in [("/v1/models", listing), ("/status", status_text),
                            ("ExecStart", exec_start), ("cmdline", cmdline),
                            ("llamad's log", d.log())]:
            assert TOKEN not in text, where
        assert "<redacted>" in listing and "hf-token is set for 2 models" in d.log()
