"""Host names and origins as browsers send them."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llamad.api import dashboard, webui
from llamad.config import Config, load_config
from llamad.errors import ConfigError
from llamad.http import browsers, keys, middleware
from llamad.http.browsers import host_name, is_local


@pytest.mark.parametrize(("header", "name"), [
    ("localhost:8080", "localhost"), ("LocalHost", "localhost"), ("[::1]:8080", "::1"),
    ("127.0.0.1", "127.0.0.1"), ("llm.example.org.:443", "llm.example.org"), ("::1", "::1")])
def test_host_name(header: str, name: str) -> None:
    assert host_name(header) == name


def test_local_names() -> None:
    """Names no page elsewhere can point at llamad (DNS rebinding): addresses, as clients
    that dial 0.0.0.0 or a LAN address send them, this machine's name, a container's name
    for its host; not names any DNS server or LAN neighbour answers for."""
    for name in ("localhost", "ui.localhost", "127.0.0.1", "127.8.9.10", "::1", "0.0.0.0",
                 "10.0.0.1", "fe80::1", socket.gethostname().lower(), "host.docker.internal"):
        assert is_local(name), name
    for name in ("localhost.example.org", "example", "127.0.0.1.nip.io", "printer.local",
                 "internal.example.org"):
        assert not is_local(name), name


async def test_only_a_browser_must_send_json(subtests: Any) -> None:
    """A POST with an Origin (every browser's) must be JSON, so no page posts a form to
    llamad unasked; one without (curl -d, as Ollama's docs write it) is read as JSON
    whatever its type."""
    door = browsers.Door(Config.default(cors_origins=("http://ui.example",)), keyed=False)
    app = web.Application(middlewares=[middleware.error_middleware, door.middleware])

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(json.loads(await request.read()))
    app.router.add_post("/api/generate", echo)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    async with TestClient(TestServer(app)) as client:
        for origin, status in ((None, 200), ("http://ui.example", 415), ("null", 403),
                               ("http://evil.example", 403)):
            with subtests.test(origin=origin):
                r = await client.post("/api/generate", data=b'{"model": "m"}', headers={
                    **form, **({"Origin": origin} if origin else {})})
                assert r.status == status
                if status == 200:
                    assert await r.json() == {"model": "m"}
        r = await client.post("/api/generate", json={"model": "m"},
                              headers={"Origin": "http://ui.example"})
        assert r.status == 200


def test_cors_origins_are_origins(tmp_path: Path) -> None:
    conf = tmp_path / "llamad.conf"
    conf.write_text("cors-origins = https://ui.example.org, http://127.0.0.1:3000\n"
                    "allowed-hosts = LLM.example.org.\n")
    c = load_config(conf)
    assert c.cors_origins == ("https://ui.example.org", "http://127.0.0.1:3000")
    assert c.allowed_hosts == ("llm.example.org",)
    conf.write_text("cors-origins = ui.example.org/path\n")
    with pytest.raises(ConfigError, match=r"cors-origins = 'ui\.example\.org/path' is invalid"):
        load_config(conf)
    assert Config.default().cors_origins == () and Config.default().allowed_hosts == ()


async def test_what_browsers_are_told_about_each_answer(tmp_path: Path) -> None:
    """security-review-3 L7: no answer is sniffed for another type; the UI and the dashboard
    run only their own scripts and may not be framed; answers that are data (a backend's
    included) run nothing if a browser is sent to one. Error answers too."""
    ui = tmp_path / "ui"
    ui.mkdir()
    boot = "\n  start(document.currentScript.parentElement);\n"
    (ui / "index.html").write_text(f"<!doctype html><body><div><script>{boot}</script>"
                                   "</div></body>")
    (ui / "sw.js").write_text("self.x = 1;")
    (tmp_path / "keys").write_text("k\n")
    keyring = keys.Keyring(tmp_path / "keys")
    door = browsers.Door(Config.default(), keyed=True)
    app = web.Application(middlewares=[middleware.error_middleware, door.middleware,
                                       keys.middleware(keyring)])
    app.on_response_prepare.append(door.on_prepare)
    webui.add_routes(app, ui)
    dashboard.add_routes(app)

    async def backend_html(request: web.Request) -> web.Response:
        return web.Response(text="<script>alert(1)</script>", content_type="text/html")
    app.router.add_get("/props", backend_html)
    digest = base64.b64encode(hashlib.sha256(boot.encode()).digest()).decode()
    async with TestClient(TestServer(app)) as client:
        pages = {}
        for path in ("/", "/sw.js", "/dashboard", "/dashboard/dashboard.js", "/props",
                     "/v1/nothing"):
            r = await client.get(path, headers={"Authorization": "Bearer k"})
            assert r.headers["X-Content-Type-Options"] == "nosniff", path
            pages[path] = r.headers["Content-Security-Policy"]
        assert (await client.get("/props")).headers["X-Content-Type-Options"] == "nosniff"
    for path, csp in pages.items():
        assert "frame-ancestors 'none'" in csp, path
    assert pages["/"] == pages["/sw.js"]  # a service worker runs under its own file's policy
    assert f"script-src 'self' 'sha256-{digest}' 'wasm-unsafe-eval';" in pages["/"]
    assert "connect-src 'self'" in pages["/"] and "unsafe-inline" not in \
        pages["/"].split("script-src")[1].split(";")[0]
    assert pages["/dashboard"] == pages["/dashboard/dashboard.js"] == dashboard.POLICY
    assert "script-src 'self';" in dashboard.POLICY and "unsafe" not in dashboard.POLICY
    assert pages["/props"] == pages["/v1/nothing"] == browsers.API_POLICY
    assert "sandbox" in browsers.API_POLICY and "default-src 'none'" in browsers.API_POLICY


def test_the_dashboard_keeps_its_key_out_of_local_storage() -> None:
    js = (Path(dashboard.STATIC) / "dashboard.js").read_text()
    assert "sessionStorage.getItem(KEY_STORE)" in js and "sessionStorage.setItem(KEY_STORE" in js
    assert "localStorage.getItem" not in js and "localStorage.setItem" not in js
    assert "localStorage.removeItem(KEY_STORE)" in js  # older versions' key is dropped


async def test_a_listed_origin_may_send_the_delete_requests_llamad_serves() -> None:
    """llamad has DELETE routes (a conversation's stream, /api/delete), and llama-server
    allows DELETE to CORS origins ("GET, POST, DELETE, OPTIONS"): a page in cors-origins
    was refused DELETE /v1/stream at its preflight."""
    door = browsers.Door(Config.default(cors_origins=("http://ui.example",)), keyed=False)
    app = web.Application(middlewares=[middleware.error_middleware, door.middleware])
    app.on_response_prepare.append(door.on_prepare)
    async with TestClient(TestServer(app)) as client:
        r = await client.options("/v1/stream?conv_id=c", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "DELETE"})
        assert r.status == 204
        allowed = {m.strip() for m in r.headers["Access-Control-Allow-Methods"].split(",")}
        assert {"GET", "POST", "DELETE"} <= allowed
