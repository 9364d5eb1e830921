"""The one field llamad reads of a multipart/form-data upload (its `model`), found without
parsing the rest.

email's parser built a message object for every part of the whole body: 1 MiB of tiny
parts cost 33 MiB and 1.4 s, so one 30 MiB upload took llamad past its MemoryMax. Here the
body, already read and counted (body.read_body), is searched for part boundaries with
bytes.find, a window at a time; only each part's headers (at most MAX_HEAD bytes) and the
wanted value (at most MAX_VALUE) are copied out, and at most MAX_PARTS parts are looked at.
llama-server parses the whole form itself. A big body is searched on the scanning thread;
each window is a short C call, between which the GIL goes back to the event loop.
"""

from __future__ import annotations

import asyncio
import email.message

from aiohttp import web

from llamad.errors import BadRequest
from llamad.http import limits
from llamad.http.body import INLINE, read_body

MAX_PARTS = 256  # parts looked at before the field; a real upload has a handful
MAX_HEAD = 8192  # bytes of one part's header lines
MAX_VALUE = 65536  # bytes of the field's value
WINDOW = 1 << 20  # bytes searched by one call


def boundary(content_type: str) -> bytes:
    """The boundary of a multipart Content-Type (RFC 2046: 1 to 70 characters)."""
    header = email.message.Message()
    header["Content-Type"] = content_type
    value = header.get_param("boundary")
    if not isinstance(value, str) or not 0 < len(value) <= 70 or not value.isascii():
        raise BadRequest("the multipart form names no usable boundary", code="invalid_form")
    return value.encode("ascii")


class Form:
    """One body, searched for the first text field called `name` (no filename)."""

    def __init__(self, body: bytes | bytearray, content_type: str, name: str) -> None:
        self.buf = body
        self.dash = b"--" + boundary(content_type)
        self.name = name
        self.abandoned = False  # the client left: stop searching

    def find(self, sub: bytes, start: int, limit: int | None = None) -> int:
        """bytes.find a window at a time, so no one call holds the GIL for long."""
        end = len(self.buf) if limit is None else min(len(self.buf), limit)
        while start < end and not self.abandoned:
            at = self.buf.find(sub, start, min(end, start + WINDOW + len(sub)))
            if at >= 0:
                return at
            start += WINDOW
        return -1

    def field(self) -> str | None:
        """The field's value; None if the form has no such field."""
        pos = 0
        if not self.buf.startswith(self.dash):  # after a preamble
            pos = self.find(b"\r\n" + self.dash, 0) + 2
            if pos < 2:
                raise _bad("it holds no part")
        for _ in range(MAX_PARTS):
            pos += len(self.dash)
            if self.buf[pos:pos + 2] == b"--":
                return None  # the closing delimiter: no such field
            while self.buf[pos:pos + 1] in (b" ", b"\t"):  # transport padding
                pos += 1
            if self.buf[pos:pos + 2] != b"\r\n":
                raise _bad(f"a boundary line is not ended at byte {pos}")
            head_end = pos if self.buf[pos + 2:pos + 4] == b"\r\n" else \
                self.find(b"\r\n\r\n", pos, pos + MAX_HEAD)
            if head_end < 0:
                raise _bad(f"a part's headers do not end within {MAX_HEAD} bytes")
            start = head_end + 4
            end = self.find(b"\r\n" + self.dash, start)
            if end < 0:
                raise _bad("a part is not closed by the boundary")
            if self._wanted(self.buf[pos + 2:head_end]):
                if end - start > MAX_VALUE:
                    raise _bad(f"its {self.name!r} field is longer than {MAX_VALUE} bytes")
                return self.buf[start:end].decode(errors="replace")
            pos = end + 2
        raise _bad(f"more than {MAX_PARTS} parts come before its {self.name!r} field")

    def _wanted(self, head: bytes | bytearray) -> bool:
        """Whether a part's header lines make it the text field wanted."""
        part = email.message.Message()
        for line in bytes(head).decode("latin-1").split("\r\n"):
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() == "content-disposition":
                part["Content-Disposition"] = value.strip()
        return part.get_param("name", header="content-disposition") == self.name \
            and part.get_filename() is None


def _bad(why: str) -> BadRequest:
    return BadRequest(f"the multipart form cannot be read: {why}", code="invalid_form")


async def read_field(request: web.Request, name: str) -> tuple[bytearray, str | None]:
    """The body as received, and its text field `name` (None if absent)."""
    body = await read_body(request)
    form = Form(body, request.headers.get("Content-Type", ""), name)
    if len(body) <= INLINE:
        return body, form.field()
    try:
        value: str | None = await asyncio.get_running_loop().run_in_executor(
            limits.of(request).scanner, form.field)
    except asyncio.CancelledError:
        form.abandoned = True
        raise
    return body, value
