"""llama.cpp's web UI (built by tools/setup-dev, shipped by the .deb), served at `/`.

The files of `ui-dir` are listed once, when the app is built, and each gets its own
route, so unknown paths still get llamad's JSON 404. Caching follows how llama-server
serves the same files: the content-hashed files under `_app/immutable/` are cached for
good; every other file, `index.html` first (with the cross-origin isolation headers
llama-server sends with it), is revalidated on every load (`no-cache` with an ETag).
aiohttp's FileResponse sends a `.gz` sibling to clients that accept gzip.

The UI's sources are not changed; the page llamad serves as `index.html` carries one
small link more, to llamad's dashboard, fixed in the bottom left corner. It is added to
the built file when the routes are made, outside the element the UI renders into.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import mimetypes
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from llamad.http.keys import public

log = logging.getLogger("llamad.webui")

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
HASHED_DIR = "_app/immutable/"
# What llama-server sends with the page (server-http.cpp), so the UI runs as it does there.
ISOLATION = {"Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Opener-Policy": "same-origin"}
# Fixed, so the answer does not depend on the machine's /etc/mime.types.
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".json": "application/json",
         ".webmanifest": "application/manifest+json", ".svg": "image/svg+xml",
         ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2",
         ".txt": "text/plain; charset=utf-8", ".wasm": "application/wasm"}
COMPRESSED = (".gz", ".br")
# Names that make plain aiohttp routes; anything else in the directory is not served.
SAFE_NAME = re.compile(r"[A-Za-z0-9._@+-]+(/[A-Za-z0-9._@+-]+)*")
_INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.S)

DASHBOARD_LINK = (
    b'<a href="dashboard" id="llamad-dashboard" title="llamad: the models systemd runs" '
    b'style="position:fixed;left:10px;bottom:10px;z-index:40;padding:1px 8px;'
    b"font:12px/1.6 system-ui,sans-serif;color:inherit;opacity:.7;text-decoration:none;"
    b'border:1px solid rgba(128,128,128,.4);border-radius:6px">Dashboard</a>\n')

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def content_type(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def headers_for(name: str, policy: str) -> dict[str, str]:
    cache = IMMUTABLE if name.startswith(HASHED_DIR) else REVALIDATE
    extra = ISOLATION if name == "index.html" else {}
    return {"Content-Type": content_type(name), "Cache-Control": cache,
            "Content-Security-Policy": policy, **extra}


def policy(index: bytes) -> str:
    """The UI's Content-Security-Policy: scripts only from llamad's own files and the page's
    own inline start-up script (by its hash), so markup a model writes cannot run; nothing
    fetched from or sent to other sites; no page may frame it. The UI's own needs: inline
    styles, data: fonts, blob: workers (PDF.js) and WebAssembly. Sent with every UI file
    (a service worker runs under the policy of its own file)."""
    scripts = " ".join(["'self'", *(
        "'sha256-" + base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode() + "'"
        for m in _INLINE_SCRIPT.finditer(index)), "'wasm-unsafe-eval'"])
    return (f"default-src 'self'; script-src {scripts}; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
            "font-src 'self' data:; media-src 'self' data: blob:; worker-src 'self' blob:; "
            "connect-src 'self'; frame-src 'self' blob: data:; object-src 'none'; "
            "base-uri 'self'; form-action 'self'; frame-ancestors 'none'")


def files(root: Path) -> list[str]:
    """The servable files under `root`, as URL paths relative to it."""
    names = []
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_file() and not name.endswith(COMPRESSED) and SAFE_NAME.fullmatch(name):
            names.append(name)
    return names


def _file_handler(path: Path, headers: dict[str, str]) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        # A fresh response each time: FileResponse adds the ETag and encoding headers.
        return web.FileResponse(path, headers=headers)
    return handle


def with_link(html: bytes) -> bytes:
    """The page with the dashboard link as the last element of its body."""
    end = html.rfind(b"</body>")
    return html[:end] + DASHBOARD_LINK + html[end:] if end >= 0 else html + DASHBOARD_LINK


def _index_handler(body: bytes, csp: str) -> Handler:
    etag = f'"{hashlib.sha256(body).hexdigest()[:20]}"'
    headers = {**headers_for("index.html", csp), "ETag": etag}

    async def handle(request: web.Request) -> web.StreamResponse:
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers=headers)
    return handle


def missing_handler(message: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text=message + "\n",
                            headers={"Cache-Control": REVALIDATE})
    return handle


def _add(app: web.Application, path: str, handler: Handler) -> None:
    app.router.add_get(path, public(handler))


def add_routes(app: web.Application, ui_dir: Path | None,
               root: Callable[[Handler], Handler] = lambda page: page) -> None:
    """Routes for every file of the built UI, or a one-line explanation at `/`; `root`
    wraps the handler of `/` (ollama.probe_or: other clients than browsers probe it)."""
    if ui_dir is None:
        _add(app, "/", root(missing_handler(
            "llamad: the web UI is turned off (ui-dir is empty in llamad.conf); "
            "the API is at /v1")))
        return
    try:
        names = files(ui_dir) if (ui_dir / "index.html").is_file() else []
        index = with_link((ui_dir / "index.html").read_bytes()) if names else b""
        csp = policy(index)
        handlers = {name: _index_handler(index, csp) if name == "index.html"
                    else _file_handler(ui_dir / name, headers_for(name, csp)) for name in names}
    except OSError as e:  # unreadable: say so at / like a missing one
        names, handlers = [], {}
        log.warning("web UI: cannot read %s: %s", ui_dir, e)
    if "index.html" not in handlers:
        log.warning("web UI: %s has no readable index.html; / explains that instead", ui_dir)
        _add(app, "/", root(missing_handler(
            f"llamad: the web UI is not installed: {ui_dir} has no readable index.html "
            "(ui-dir in llamad.conf); the API is at /v1")))
        return
    _add(app, "/", root(handlers["index.html"]))
    for name, handler in handlers.items():
        _add(app, "/" + name, handler)
    log.info("web UI: %d files from %s at /", len(names), ui_dir)
