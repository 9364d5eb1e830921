"""Middlewares: OpenAI-shaped errors, or Ollama-shaped on Ollama's routes (API keys: keys.py)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from llamad import redact
from llamad.errors import OLLAMA_PREFIX, LlamadError
from llamad.http.limits import too_large


def error_body(request: web.Request, err: LlamadError) -> dict[str, Any]:
    """The error as the request's kind of client reads it."""
    if request.path.startswith(OLLAMA_PREFIX):
        return {"error": redact.text(err.message)}
    return err.body()


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except LlamadError as e:
        resp = web.json_response(error_body(request, e), status=e.status, headers=e.headers)
        if e.status == 408:
            resp.force_close()  # the rest of a body that came too slowly is not awaited
        return resp
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}
        err = LlamadError(_http_message(e), status=e.status,
                          code=code.get(e.status, "http_error"))
        err.type = "invalid_request_error"
        return web.json_response(error_body(request, err), status=e.status)


def _http_message(e: web.HTTPException) -> str:
    if e.status == 413:
        return too_large().message
    if e.status == 404:
        return "no such endpoint on llamad"
    return e.reason
