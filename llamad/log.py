"""Logging setup and die(): one sentence for the user, an optional hint, a non-zero exit."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

from llamad import redact
from llamad.safetext import one_line, readable

log = logging.getLogger("llamad")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    # Under systemd stderr goes to the journal, which adds its own timestamps.
    journal = os.environ.get("JOURNAL_STREAM")
    fmt = "%(message)s" if journal else "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_clean)
    logging.getLogger("aiohttp.server").addFilter(client_faults)


def client_faults(record: logging.LogRecord) -> bool:
    """A request aiohttp could not parse is the client's fault: one line, not an error
    with a traceback, each of whose lines would be a journal entry (any client could then
    push llamad's own lines past journald's rate limit)."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None:
        return True
    from aiohttp.http_exceptions import HttpProcessingError  # loaded: aiohttp logged this
    if isinstance(exc, HttpProcessingError):
        first = (str(exc.message).splitlines() or [""])[0].rstrip(":")
        record.msg, record.args = f"refused a malformed HTTP request: {first}", None
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
    return True


def _clean(record: logging.LogRecord) -> bool:
    """A message is one journal entry: a newline in a model name must not forge a second
    one (tracebacks, added after the message, keep theirs); and no secret shows."""
    message = record.getMessage()
    shown = redact.text(readable(message))
    if shown != message:
        record.msg, record.args = shown, None
    return True


def die(message: str, hint: str | None = None, status: int = 1) -> NoReturn:
    """One sentence on stderr, escaped: it may quote a server, a model's log or a file name,
    none of which may drive the terminal."""
    print(f"llamad: {one_line(redact.text(message))}", file=sys.stderr)
    if hint:
        print(f"llamad: hint: {one_line(hint)}", file=sys.stderr)
    raise SystemExit(status)
