"""What llamad notes about each request to a model, for the request log and the metrics.

The `observe` middleware gives every request a Record. The proxy names the model once it
is resolved (a request that names no known model is not recorded), the wait for the model
notes when its backend was acquired, and `TapResponse`, the response a model's streamed
answer goes through, notes the first byte and the token counts in the answer's
usage/timings as they pass. Never the prompt or the answer itself. When the request ends
the record goes to every sink (metrics, the journal).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from llamad.errors import LlamadError

log = logging.getLogger("llamad.record")

CLIENT_GONE = 499  # nginx's code for a client that closed the connection first
# Token counts as llama-server writes them: OpenAI usage, Anthropic/Responses usage,
# llama.cpp timings. A key can only match outside JSON strings, where quotes are bare.
_COUNTS = re.compile(rb'"(prompt_tokens|input_tokens|prompt_n|completion_tokens|output_tokens'
                     rb'|predicted_n)"\s*:\s*(\d+)')
_PROMPT = (b"prompt_tokens", b"input_tokens", b"prompt_n")
_COMPLETION = (b"completion_tokens", b"output_tokens", b"predicted_n")
_CARRY = 64  # bytes kept from one chunk to the next, for a key cut in two
# A streamed answer's last event (OpenAI's, Anthropic's), at the start of a line: a JSON
# string cannot hold a raw newline, so the model's own text never matches.
_END = re.compile(rb"(?:\A|\n)(?:data: \[DONE\]|event: message_stop)")


@dataclass
class Record:
    """One request as the request log and the metrics see it; filled in as it goes."""

    method: str
    path: str
    started: float = field(default_factory=time.monotonic)
    model: str = ""
    stream: bool = False
    status: int = 0
    code: str = ""  # llamad's error code, when llamad refused or failed the request
    acquired: float | None = None  # the model's backend was ready for the request
    first_byte: float | None = None  # of the model's answer, to the client
    ended: float | None = None
    counts: dict[bytes, int] = field(default_factory=dict)
    complete: bool = False  # the answer's last event has passed
    _carry: bytes = b""

    def see(self, data: bytes) -> None:
        """A piece of the model's answer on its way to the client."""
        if self.first_byte is None:
            self.first_byte = time.monotonic()
        text = self._carry + data
        for m in _COUNTS.finditer(text):
            self.counts[m.group(1)] = int(m.group(2))  # the last one seen is the total
        self.complete = self.complete or _END.search(text) is not None
        self._carry = text[-_CARRY:]

    def settle(self, status: int, code: str = "") -> None:
        """The outcome, unless one was noted already."""
        if not self.status:
            self.status, self.code = status, code

    @property
    def prompt_tokens(self) -> int | None:
        return _first(self.counts, _PROMPT)

    @property
    def completion_tokens(self) -> int | None:
        return _first(self.counts, _COMPLETION)

    def ms(self, until: float | None) -> int | None:
        """Milliseconds from the request's arrival until `until`."""
        return None if until is None else round((until - self.started) * 1000)


def _first(counts: dict[bytes, int], keys: tuple[bytes, ...]) -> int | None:
    return next((counts[k] for k in keys if k in counts), None)


RECORD: Any = web.RequestKey("record", Record) if hasattr(web, "RequestKey") else "record"


def of(request: web.Request) -> Record:
    """The request's record; a loose one where no middleware made it (tests)."""
    found: Record | None = request.get(RECORD)
    if found is None:
        found = request[RECORD] = Record(request.method, request.path)
    return found


class TapResponse(web.StreamResponse):
    """A streamed answer that the request's record sees pass."""

    def __init__(self, record: Record) -> None:
        super().__init__()
        self.record = record

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.record.see(bytes(data))
        await super().write(data)
        if self.record.complete:
            # The client has the whole answer: one that hangs up now, before the backend
            # has ended the stream (the openai client may), still got what it asked for.
            self.record.settle(self.status)

    async def write_own(self, data: bytes) -> None:
        """llamad's own bytes (progress comments, errors): not part of the model's answer."""
        await super().write(data)

    async def comment(self, text: str) -> None:
        """An SSE comment line, which clients ignore."""
        await self.write_own(b": " + text.encode() + b"\n\n")


Sink = Callable[[Record], None]


def middleware(sinks: Sequence[Sink]) -> Any:
    """Gives each request a Record and hands it to `sinks` once the request has ended."""

    @web.middleware
    async def observe(request: web.Request, handler: Any) -> web.StreamResponse:
        rec = Record(request.method, request.path)
        request[RECORD] = rec
        try:
            resp: web.StreamResponse = await handler(request)
        except LlamadError as e:
            rec.settle(e.status, e.code)
            raise
        except web.HTTPException as e:
            rec.settle(e.status)
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            rec.settle(CLIENT_GONE, "client_gone")
            raise
        except Exception:
            rec.settle(500, "internal_error")
            raise
        else:
            rec.settle(resp.status)
            # Only a model's answer is recorded: scanning llamad's own (GET /v1/models of
            # 10,000 models is 12 MB) took 120 ms for nothing.
            if rec.model and isinstance(resp, web.Response) and isinstance(resp.body, bytes):
                rec.see(resp.body)
            return resp
        finally:
            if rec.model:
                rec.ended = time.monotonic()
                _hand_over(rec, sinks)
    return observe


def _hand_over(rec: Record, sinks: Sequence[Sink]) -> None:
    for sink in sinks:
        try:
            sink(rec)
        except Exception:  # a broken sink must not fail the request or the others
            log.exception("recording a request failed")
