"""The web UI's files served at /: types, caching, gzip, and the real build's offline use."""

from __future__ import annotations

import gzip
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import rig
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llamad.api import webui
from llamad.http import keys, middleware

BUILT = rig.WEB_UI
JS = b"console.log('hi');\n" * 200

if TYPE_CHECKING:  # aiohttp 3.8 (Debian 12) has no TestClient[...] at run time
    Client = TestClient[web.Request, web.Application]


def fake_build(root: Path) -> Path:
    (root / "_app" / "immutable").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>ui</title><body>"
                                      "<div>app</div></body></html>")
    (root / "_app" / "immutable" / "bundle.abc123.js").write_bytes(JS)
    (root / "_app" / "immutable" / "bundle.abc123.js.gz").write_bytes(gzip.compress(JS))
    (root / "_app" / "version.json").write_text('{"version": "1"}')
    (root / "sw.js").write_text("self.x = 1;")
    (root / "manifest.webmanifest").write_text("{}")
    (root / "favicon.ico").write_bytes(b"\0\0\1\0")
    (root / "odd {name}.txt").write_text("not served")
    return root


async def client_for(ui_dir: Path | None) -> Client:
    app = web.Application(middlewares=[middleware.error_middleware])
    webui.add_routes(app, ui_dir)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def ui(tmp_path: Path) -> AsyncIterator[Client]:
    client = await client_for(fake_build(tmp_path / "ui"))
    yield client
    await client.close()


async def test_index_at_root_with_isolation_and_revalidation(ui: Client) -> None:
    for path in ("/", "/index.html"):
        r = await ui.get(path)
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
        page = await r.text()
        # The built page as it is, with llamad's dashboard link last in the body.
        assert page.startswith("<!doctype html><title>ui</title><body><div>app</div>")
        assert page.endswith("</a>\n</body></html>") and 'href="dashboard"' in page
        again = await ui.get(path, headers={"If-None-Match": r.headers["ETag"]})
        assert again.status == 304


async def test_hashed_assets_are_immutable_and_gzipped(ui: Client) -> None:
    path = "/_app/immutable/bundle.abc123.js"
    r = await ui.get(path, headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert r.status == 200
    assert r.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert r.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(await r.read()) == JS
    plain = await ui.get(path, headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers and await plain.read() == JS


async def test_other_files_revalidate(ui: Client) -> None:
    for path, ctype in [("/sw.js", "text/javascript; charset=utf-8"),
                        ("/manifest.webmanifest", "application/manifest+json"),
                        ("/_app/version.json", "application/json"),
                        ("/favicon.ico", "image/x-icon")]:
        r = await ui.get(path)
        assert (r.status, r.headers["Content-Type"], r.headers["Cache-Control"]) == (
            200, ctype, "no-cache"), path
        assert "Cross-Origin-Embedder-Policy" not in r.headers


async def test_unknown_paths_stay_llamads_404(ui: Client) -> None:
    for path in ("/nope.js", "/_app/immutable/bundle.abc123.js.gz", "/odd%20%7Bname%7D.txt"):
        r = await ui.get(path)
        assert r.status == 404
        assert (await r.json())["error"]["source"] == "llamad"


async def test_missing_or_disabled_ui_says_so_at_root(tmp_path: Path) -> None:
    for ui_dir, words in [(tmp_path / "absent", "not installed"), (None, "turned off")]:
        client = await client_for(ui_dir)
        try:
            r = await client.get("/")
            text = await r.text()
            assert r.status == 404 and words in text and "ui-dir" in text
            assert text.count("\n") == 1
        finally:
            await client.close()


def test_built_ui_loads_nothing_from_the_internet() -> None:
    """The real build (tools/setup-dev): every file index.html names is local, and the
    stylesheet pulls no remote fonts or imports; a machine without internet shows it."""
    assert (BUILT / "index.html").is_file(), f"{BUILT} is missing; run `make dev`"
    names = set(webui.files(BUILT))
    index = (BUILT / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', index)
    assert refs and not [r for r in refs if re.match(r"(https?:)?//", r)]
    assert {r.removeprefix("./") for r in refs if not r.startswith("data:")} <= names
    for css in (BUILT / "_app" / "immutable").rglob("*.css"):
        text = css.read_text()
        urls = re.findall(r"url\(\s*['\"]?([^'\")]+)", text)
        assert not [u for u in urls if not u.startswith(("data:", "#"))], css
        assert "@import" not in text, css
    # The big bundle goes out compressed.
    assert any(n.endswith(".js") and (BUILT / (n + ".gz")).is_file() for n in names)


async def test_ui_files_need_no_api_key(tmp_path: Path) -> None:
    """Like llama-server: a browser cannot send a key for a page load; the API it then
    calls still needs one."""
    (tmp_path / "keys").write_text("k\n")
    (tmp_path / "keys").chmod(0o600)
    keyring = keys.Keyring(tmp_path / "keys")
    app = web.Application(middlewares=[middleware.error_middleware, keys.middleware(keyring)])
    webui.add_routes(app, fake_build(tmp_path / "ui"))
    async def api(request: web.Request) -> web.Response:
        return web.json_response({})
    app.router.add_get("/v1/models", api)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/")).status == 200
        assert (await client.get("/_app/immutable/bundle.abc123.js")).status == 200
        assert (await client.get("/v1/models")).status == 401
        ok = await client.get("/v1/models", headers={"Authorization": "Bearer k"})
        assert ok.status == 200
