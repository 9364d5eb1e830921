"""What llamad reads of a request body: the JSON object, its model and keep_alive."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from llamad.errors import BadRequest

_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)?")


def parse_keep_alive(value: object) -> float | None:
    """Ollama's keep_alive: seconds, or "5m"/"1h"/"30s"; negative keeps the model loaded."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("keep_alive must be a duration like \"5m\" or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.fullmatch(str(value).strip())
        if not m:
            raise BadRequest(f"keep_alive {value!r} is not a duration like \"5m\", \"30s\" or 0")
        unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
        seconds = float(m.group(1)) * unit
    return -1.0 if seconds < 0 else seconds


async def read_json(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    body = await request.read()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    return body, data
