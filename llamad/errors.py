"""Errors that reach users: one sentence, an HTTP status and an OpenAI-shaped body."""

from __future__ import annotations

import errno
from typing import Any

from llamad import redact

# A connection llamad could not make for want of descriptors or memory: llamad's own trouble
# (503, retry), never a sign that the other end is gone.
SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)
# Ollama's routes (api/ollama.py, api/downloads.py): its clients read an error as
# {"error": "message"}, without the `source` that says an OpenAI-shaped error is llamad's.
OLLAMA_PREFIX = "/api/"


class LlamadError(Exception):
    """A failure with a message meant for the user of whichever channel it reaches."""

    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": redact.text(self.message), "type": self.type,
                          "code": self.code,
                          "source": "llamad"}}


class ConfigError(LlamadError):
    """A configuration file or value is wrong; the message names file, key, value and range."""

    code = "invalid_config"


class BadRequest(LlamadError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class NotFound(LlamadError):
    status = 404
    type = "not_found_error"
    code = "model_not_found"


def unknown_model(name: str, peers: bool) -> NotFound:
    """A model this llamad does not serve. With peers, GET /v1/models also lists the other
    hosts' models: sending a user back there alone would not say why it is listed."""
    if peers:
        return NotFound(f"model {name!r} is not served by this host; GET /v1/models lists the "
                        "fleet's models with the host of each (llamad.host): send the request "
                        "there, or through the fleet's HAProxy (llamad haproxy-config)")
    return NotFound(f"model {name!r} is not known to llamad; GET /v1/models lists them")


class Unavailable(LlamadError):
    """The model cannot serve now; the client may retry after `retry_after` seconds."""

    status = 503
    type = "unavailable_error"
    code = "model_unavailable"

    def __init__(self, message: str, *, retry_after: int = 5, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after)})


class TooManyRequests(LlamadError):
    """A model's concurrency limit is reached and its queue is full (llama-swap's 429)."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: int = 2) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class BackendError(LlamadError):
    status = 502
    type = "backend_error"
    code = "backend_failed"


class BackendUnreachable(BackendError):
    """The backend refused the connection: the request never reached the model."""

    code = "backend_unreachable"


class BackendTimeout(BackendError):
    """The backend went silent and its /health did not answer: it is restarted."""

    status = 504
    code = "backend_timeout"
