"""What a web page in a local user's browser can make llamad do: nothing it is not meant to.

- DNS rebinding: without API keys, a request whose Host is not a local name (or listed in
  `allowed-hosts`) is refused, so a page whose name points at 127.0.0.1 gets nothing. Local
  names are those no one outside can point here: any address (a page served from one
  cannot be rebound), `localhost` and `*.localhost`, this machine's name, and `*.internal`
  (a container's name for its host). Ollama takes `*.local` too, which anyone on the LAN
  may answer for (mDNS): here it goes in `allowed-hosts`.
- Cross-site requests: a browser sends a POST without asking first (no CORS preflight) only
  with a form's content types, and with an Origin header (the Fetch standard sends one with
  every POST). So a POST with an Origin must be `application/json` (415 otherwise), or
  `multipart/form-data` for a route declared @takes_files, and one from another origin than
  llamad's own that is not in `cors-origins` is refused outright. Without an Origin it is
  no browser's, and any type is read as JSON, as Ollama does for `curl -d`.
- CORS is llamad's own: the backends' `Access-Control-*` headers never reach the client;
  origins listed in `cors-origins` get them from llamad, and OPTIONS is answered here.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from aiohttp import web

from llamad.config import Config
from llamad.errors import LlamadError

FILES_ATTR = "llamad_takes_files"
# Answers that are data (JSON, events, a backend's text), should a browser be sent to one:
# nothing loads or runs, and no page may frame it.
API_POLICY = "default-src 'none'; frame-ancestors 'none'; sandbox"
METHODS = "GET, POST, DELETE, OPTIONS"  # llama-server's own; llamad has DELETE routes too
H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])


def takes_files(handler: H) -> H:
    """Declare that a POST route reads `multipart/form-data` (uploads) besides JSON."""
    setattr(handler, FILES_ATTR, True)
    return handler


class Refused(LlamadError):
    status = 403
    type = "permission_error"


def host_name(header: str) -> str:
    """'LocalHost:8080' -> 'localhost', '[::1]:80' -> '::1'."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0].rstrip(".") if h.count(":") == 1 else h.rstrip(".")


LOCAL_SUFFIXES = (".localhost", ".internal")


@functools.lru_cache(maxsize=256)  # asked for every request, mostly of the same few names
def is_local(name: str) -> bool:
    if name in ("localhost", socket.gethostname().lower()) or name.endswith(LOCAL_SUFFIXES):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Door:
    """The checks above, as one middleware and one response hook (see app.py)."""

    def __init__(self, config: Config, keyed: bool) -> None:
        self.check_host = not keyed and "*" not in config.allowed_hosts
        self.hosts = frozenset(config.allowed_hosts)
        self.origins = frozenset(config.cors_origins)

    def cors_allowed(self, origin: str | None) -> bool:
        return origin is not None and ("*" in self.origins or origin.lower() in self.origins)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        host = request.headers.get("Host")
        if self.check_host and host is not None:
            name = host_name(host)
            if not is_local(name) and name not in self.hosts:
                raise Refused(f"Host {name!r} is not a local name; add it to allowed-hosts "
                              "in llamad.conf to serve it (or set api-keys-file)",
                              code="host_not_allowed")
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS":
            return self.preflight(request, origin)
        if request.method == "POST" and origin is not None:
            if not self.cors_allowed(origin) and \
                    urlsplit(origin).netloc.lower() != (host or "").lower():
                raise Refused(f"a request from the web page origin {origin!r} is refused; "
                              "list it in cors-origins to allow it", code="origin_not_allowed")
            _check_content_type(request)
        resp: web.StreamResponse = await handler(request)
        return resp

    def preflight(self, request: web.Request, origin: str | None) -> web.Response:
        if origin is None:  # not a CORS preflight: say what llamad accepts
            return web.Response(status=204, headers={"Allow": METHODS})
        if not self.cors_allowed(origin):
            raise Refused(f"the web page origin {origin!r} may not use llamad; list it in "
                          "cors-origins to allow it", code="origin_not_allowed")
        asked = request.headers.get("Access-Control-Request-Headers", "")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": METHODS,
            "Access-Control-Allow-Headers": asked or "Authorization, Content-Type",
            "Access-Control-Max-Age": "600"})

    async def on_prepare(self, request: web.Request, resp: web.StreamResponse) -> None:
        """Every response, before its headers go out (streams included): drop what a backend
        said about CORS, then say llamad's own; no answer is sniffed for another type, and
        one that is not a page of llamad's (which set their own policy) runs nothing and
        may not be framed if a browser is sent to it."""
        headers = resp.headers
        for name in [k for k in headers if k.lower().startswith("access-control-")
                     and request.method != "OPTIONS"]:
            del headers[name]
        headers["X-Content-Type-Options"] = "nosniff"
        if "Content-Security-Policy" not in headers:
            headers["Content-Security-Policy"] = API_POLICY
        origin = request.headers.get("Origin")
        if self.cors_allowed(origin):
            assert origin is not None
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Expose-Headers"] = "Retry-After"
            resp.headers.add("Vary", "Origin")


def _check_content_type(request: web.Request) -> None:
    media = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media == "application/json":
        return
    files = getattr(request.match_info.handler, FILES_ATTR, False)
    if files and media == "multipart/form-data":
        return
    wanted = "application/json or multipart/form-data" if files else "application/json"
    err = LlamadError(f"the request body must be {wanted} (Content-Type), not "
                      f"{media or 'untyped'}", status=415, code="unsupported_media_type")
    err.type = "invalid_request_error"
    raise err
