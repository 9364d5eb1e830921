"""Files llamad keeps for itself (state-dir's caches and learned figures, a download's ref):
written whole or not at all, read back bounded.

What a state file holds only saves work (a scan of GGUF headers, a run of `--help`, a
measurement), so one that is missing, unreadable or damaged costs that work and, when
damaged, one line in the log; never a start.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

log = logging.getLogger("llamad.statefile")

READ_MAX = 64 << 20  # bytes; the largest, the GGUF cache, is ~0.5 KB a model file


def replace(path: Path, text: str) -> None:
    """Write `text` to a new file beside `path`, then rename it over `path`: a reader, or a
    crash, finds the old file or the new one, never half of one. The umask decides who may
    read it (llamad.service's 0077; a download unit's 0022, for every model unit). Raises
    OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    f = tmp.open("x")  # a new file or an error, never another's file or link
    try:
        with f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path | None, what: str, limit: int = READ_MAX) -> Any:
    """The JSON in `path`; None when there is none, it cannot be read, or it is damaged or
    longer than `limit` bytes (those two said in the log)."""
    if path is None:
        return None
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:  # missing, or not ours to read (a client command as another user)
        log.debug("no %s in %s: %s", what, path, e)
        return None
    try:
        if len(data) > limit:
            raise ValueError(f"longer than {limit} bytes")
        return json.loads(data)
    except ValueError as e:
        log.warning("ignoring %s in %s: %s", what, path, e)
        return None


def write_json(path: Path, body: object, what: str, indent: int | None = None) -> bool:
    """Save `body` as JSON (replace()); a failure is logged and answered False."""
    text = json.dumps(body, indent=indent, separators=None if indent else (",", ":"))
    try:
        replace(path, text)
    except OSError as e:
        log.warning("cannot save %s to %s: %s", what, path, e)
        return False
    return True
