"""Middlewares: OpenAI-shaped errors, API keys."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from llamad.errors import LlamadError

# Paths served without an API key, as llama-server serves its UI: the static files of the
# web UI and the dashboard, which hold no data (what they fetch is checked as usual).
# aiohttp 3.8 (Debian 12) has no AppKey; later releases warn about plain string keys.
PUBLIC: Any = web.AppKey("public_paths", set) if hasattr(web, "AppKey") else "public_paths"


def add_public(app: web.Application, path: str) -> None:
    app.setdefault(PUBLIC, set()).add(path)


def is_public(request: web.Request) -> bool:
    return request.path == "/health" or request.path in request.app.get(PUBLIC, ())


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except LlamadError as e:
        return web.json_response(e.body(), status=e.status, headers=e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}
        err = LlamadError(_http_message(e), status=e.status,
                          code=code.get(e.status, "http_error"))
        err.type = "invalid_request_error"
        return web.json_response(err.body(), status=e.status)


def _http_message(e: web.HTTPException) -> str:
    if e.status == 413:
        return "the request body is larger than max-body-mb allows"
    if e.status == 404:
        return "no such endpoint on llamad"
    return e.reason


def key_middleware(keys: frozenset[str]) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if not is_public(request):
            auth = request.headers.get("Authorization", "")
            key = auth[7:] if auth.startswith("Bearer ") else request.headers.get("x-api-key")
            if key not in keys:
                err = LlamadError("a valid API key is required (Authorization: Bearer KEY)",
                                  status=401, code="invalid_api_key")
                err.type = "authentication_error"
                return web.json_response(err.body(), status=401)
        resp: web.StreamResponse = await handler(request)
        return resp
    return check
