"""What llamad reads of a request body: a few top-level fields, without building the rest.

A body may be max-body-mb of JSON (a long document, a base64 image). json.loads would build
every object in it (a 32 MiB body became ~770 MiB of Python objects) and hold the event
loop for seconds; in a thread it would too, as it never lets go of the GIL. Instead the
body is checked against JSON's grammar (RFC 8259, strictly: no NaN, no control characters
in strings, UTF-8, at most MAX_DEPTH levels) in short steps of regular-expression matches,
and only the top-level values llamad needs (WANTED, and what a handler asks for) are
decoded; llama-server parses the
whole body itself. A small body is checked on the event loop, a big one on a thread of its
own, between whose short steps the GIL changes hands.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import re
import time
from typing import Any

from aiohttp import web

from llamad.config import DURATION_MAX
from llamad.errors import BadRequest, LlamadError
from llamad.http import limits
from llamad.http.record import CLIENT_GONE

# The top-level fields every read_json decodes; a handler names any other it needs.
WANTED = ("model", "keep_alive", "stream")
MAX_DEPTH = 512
WANTED_MAX = 65536  # bytes of a wanted value's JSON text
STEP_SECONDS = 0.002  # work on the event loop before a body goes to the scanning thread
# Work on the scanning thread for one body before the bodies queued behind it get theirs:
# a body built to be slow to check (25 MiB of [[0]] items took 28 s) must not hold up
# every other big body meanwhile.
SLICE_SECONDS = 0.05
INLINE = 65536  # bodies up to this size are checked on the loop at once
SWITCH_INTERVAL = 0.001  # sys.setswitchinterval for llamad serve
UTF8_STEP = 1 << 20
# RFC 8259 lets a parser ignore a byte order mark at the start, and llama-server's does:
# bodies saved by Notepad or PowerShell begin with one.
BOM = b"\xef\xbb\xbf"

# Numbers llama-server takes up to 2^31 - 1 and turns into memory for one request: each
# penalty window is a zeroed ring of that many tokens (8 GiB at the top), n_probs (OpenAI's
# top_logprobs) that many candidates for every token of the answer (the whole 262k
# vocabulary: 52 MB of JSON for two tokens; `logprobs` is its alias, a number in /completion
# and OpenAI's legacy completions). No model's context is longer than 2^24 tokens, and a
# window longer than the context does no more; OpenAI allows 20 candidates.
BOUNDED = {"repeat_last_n": (1 << 24, "tokens, more than any model's context"),
           "dry_penalty_last_n": (1 << 24, "tokens, more than any model's context"),
           "n_probs": (100, "candidates a token"), "top_logprobs": (100, "candidates a token"),
           "logprobs": (100, "candidates a token")}

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                   "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float | None:
    """Seconds of a Go duration ("5m", "1h30m", "5m0s" as Ollama's own client sends it,
    "-1m"), or of a bare number; None if it is neither."""
    text = text.strip()
    sign, digits = (-1.0, text[1:]) if text[:1] == "-" else (1.0, text.removeprefix("+"))
    try:
        return sign * float(digits)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(digits):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return sign * total if pos and pos == len(digits) else None


def parse_keep_alive(value: object) -> float | None:
    """Ollama's keep_alive: seconds, or a duration ("5m", "1h30m"); negative keeps the
    model loaded."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("keep_alive must be a duration like \"5m\" or a number of seconds")
    seconds = float(value) if isinstance(value, int | float) else _duration(str(value))
    if seconds is None:
        raise BadRequest(f"keep_alive {value!r} is not a duration like \"5m\", \"30s\" or 0")
    if not math.isfinite(seconds) or seconds > DURATION_MAX:
        raise BadRequest(f"keep_alive {value!r} is out of range: at most 292 years "
                         f"({DURATION_MAX:.0f} seconds); a negative value keeps the model "
                         "loaded for good")
    return -1.0 if seconds < 0 else seconds


def check_bounds(fields: Fields | dict[str, Any]) -> None:
    """Refuse a number of BOUNDED past its bound, before anything loads."""
    for key, (most, what) in BOUNDED.items():
        value = fields.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > most:
            raise BadRequest(f"{key} {value!r} is too large: at most {most} {what}")


async def read_body(request: web.Request) -> bytearray:
    """The whole body, within max-body-mb, receive-timeout and, with all others held,
    max-bodies-mb.

    Grown in place as it arrives, so a body is held once, never joined from pieces at the
    end (a 32 MiB copy that would hold the loop)."""
    lim = limits.of(request)
    size = request.content_length
    lim.hold_body(request, size or 0)
    buf = bytearray()  # grown by realloc, which moves no pages: no 32 MiB copy or memset

    async def receive() -> None:
        since_yield = 0
        while chunk := await request.content.readany():
            if size is None or len(buf) + len(chunk) > size:  # chunked, or more than it said
                lim.hold_body(request, len(chunk))
            buf.extend(chunk)
            since_yield += len(chunk)
            if since_yield > UTF8_STEP:  # all may be buffered already: readany won't wait
                since_yield = 0
                await asyncio.sleep(0)
    left = lim.body_deadline(request) - asyncio.get_running_loop().time()
    try:
        await asyncio.wait_for(receive(), max(left, 0.001))
    except TimeoutError:
        raise limits.too_slow(lim.timeout) from None  # 408, and the connection is closed
    except ConnectionResetError:
        # The client went away mid-body (aiohttp 3.9+; 3.8 cancels the handler instead):
        # no one reads an answer, and it is no fault of llamad's to log as one.
        raise LlamadError("the client closed the connection before its body arrived",
                          status=CLIENT_GONE, code="client_gone") from None
    return buf


class Fields:
    """The top-level fields of a body that read_json was asked for (those present).

    Asking for any other is a bug, and says so: llamad never decoded it."""

    def __init__(self, values: dict[str, Any], wanted: frozenset[str]) -> None:
        self.values = values
        self.wanted = wanted

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self.wanted:
            raise LookupError(f"the body's {key!r} was not decoded: name it in "
                              f"read_json(request, {key!r})")
        return self.values.get(key, default)


async def read_json(request: web.Request, *also: str) -> tuple[bytearray, Fields]:
    """The body as received, and its top-level fields WANTED plus `also`; each value's
    JSON text may be at most WANTED_MAX bytes."""
    body = await read_body(request)
    wanted = frozenset((*WANTED, *also))
    if (quick := _quick(body, wanted)) is not None:
        return body, Fields(quick, wanted)
    scan = Scanner(body, wanted)
    if scan.step(math.inf if len(body) <= INLINE else time.monotonic() + STEP_SECONDS):
        return body, Fields(scan.fields, scan.wanted)
    # A big body is checked on llamad's one scanning thread, a slice at a time, taking turns
    # with the others. Its steps are short Python and regular-expression calls, so the GIL
    # changes hands every few milliseconds and the event loop, asleep in its poll most of
    # the time, answers at once when woken.
    try:
        while not await asyncio.get_running_loop().run_in_executor(
                limits.of(request).scanner, scan.slice, SLICE_SECONDS):
            pass
    except asyncio.CancelledError:
        scan.abandoned = True  # the client left: stop checking its body
        raise
    return body, Fields(scan.fields, scan.wanted)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_LONG_DIGITS = re.compile(rb"[0-9]{1001}")


def _quick(body: bytes | bytearray, wanted: frozenset[str]) -> dict[str, Any] | None:
    """The wanted top-level fields of a small body, by json.loads (in C: a tenth of a small
    request's time went to the Scanner's steps), where the Scanner would find the body
    valid too: at most WANTED_MAX bytes (so no value is longer), no deeper than
    MAX_DEPTH, no number of over 1,000 digits, no NaN, UTF-8, an object. None: the
    Scanner decides, and words any error."""
    if len(body) > WANTED_MAX or body.count(b"[") + body.count(b"{") > MAX_DEPTH \
            or _LONG_DIGITS.search(body):
        return None
    try:
        value = json.loads(body.decode().removeprefix("\ufeff"), parse_constant=_no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError too
        return None
    if not isinstance(value, dict):
        return None
    return {key: value[key] for key in wanted if key in value}


_WS = rb"[ \t\r\n]*"
_ESCAPE = rb'\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})'
_ESCAPE_AT = re.compile(_ESCAPE)
# At most 256 KiB per match, so no single step holds the loop long.
_STRING_PART = re.compile(rb'(?:[^"\\\x00-\x1f]{1,4096}|' + _ESCAPE + rb"){0,64}")
_NUMBER = rb"-?(?:0|[1-9][0-9]{0,999})(?:\.[0-9]{1,1000})?(?:[eE][+-]?[0-9]{1,1000})?"
_SHORT_STRING = rb'"(?:[^"\\\x00-\x1f]|' + _ESCAPE + rb'){0,64}"'
_SHORT_NUMBER = rb"-?(?:0|[1-9][0-9]{0,19})(?:\.[0-9]{1,20})?(?:[eE][+-]?[0-9]{1,4})?"
_NUMBER_OR_LITERAL = re.compile(rb"(?>" + _NUMBER + rb"|true|false|null)(?![0-9A-Za-z.+-])")
# Bulk steps over what most bodies are made of: runs of small items (numbers, short
# strings, and flat arrays or objects of them, as in token lists or embeddings) in arrays
# and in objects below the top, up to 64 items per match so that no match takes long.
# Anything else goes through the general steps above. No possessive quantifier on a
# group: Python 3.11.2 (Debian 12) matches some of those wrongly.
_SCALAR = rb"(?>" + _SHORT_NUMBER + rb"|true|false|null|" + _SHORT_STRING + rb")"
_SEP = _WS + rb"," + _WS
_PAIR = _SHORT_STRING + _WS + rb":" + _WS + _SCALAR
_ITEM = (rb"(?>" + _SCALAR + rb"|\[" + _WS + rb"(?:" + _SCALAR + rb"(?:" + _SEP + _SCALAR +
         rb"){0,255})?" + _WS + rb"\]|\{" + _WS + rb"(?:" + _PAIR + rb"(?:" + _SEP + _PAIR +
         rb"){0,255})?" + _WS + rb"\})")
_ARRAY_RUN = re.compile(rb"(?:" + _WS + _ITEM + _SEP + rb"){1,64}")
_PAIR_RUN = re.compile(rb"(?:" + _WS + _SHORT_STRING + _WS + rb":" + _WS + _ITEM + _SEP +
                       rb"){1,64}")
# The same at the top, for keys without escapes: a run is skipped only if no wanted key's
# text is in it (a value that spells one sends the run through the general steps). 28 MiB
# of top-level keys took 15 s of the one scanning thread, which every big body waits for.
_TOP_PAIR_RUN = re.compile(rb"(?:" + _WS + rb'"[^"\\\x00-\x1f]{0,64}"' + _WS + rb":" + _WS +
                           _ITEM + _SEP + rb"){1,64}")
_SPACE = re.compile(_WS)
OPEN = {ord("{"): ord("}"), ord("["): ord("]")}


class Scanner:
    """Checks one JSON body step by step; `fields` holds the `wanted` top-level values.

    `expect` is what comes next: a value, a key, ':' or, after a value, ',' or a closing
    bracket ('next'); 'string' while inside one (`role` says whether a key or a value).
    `fresh` means a container was just opened, so it may close at once.
    """

    def __init__(self, body: bytes | bytearray, wanted: frozenset[str] = frozenset(WANTED)
                 ) -> None:
        self.buf = body
        self.wanted = wanted
        self.pos = len(BOM) if body[:len(BOM)] == BOM else 0
        self.fields: dict[str, Any] = {}
        self.stack: list[int] = []  # the opening bracket of each open container
        self.expect = "value"
        self.fresh = False
        self.role = "value"
        self.value_start = 0  # where the current top-level value began
        self.key_start = 0  # where the current key began
        self.key: str | None = None  # the wanted top-level key whose value comes next
        # The longest JSON text a wanted key can have: each character may be written as
        # an escape, 12 bytes for one outside the BMP (llama-server decodes them all).
        self.key_max = 2 + 12 * max(map(len, wanted), default=0)
        self.quoted = [json.dumps(key).encode() for key in wanted]
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.checked = 0  # bytes known to be UTF-8
        self.done = False
        self.abandoned = False

    def fail(self, what: str) -> BadRequest:
        return BadRequest(f"the request body is not valid JSON: {what} at byte {self.pos}",
                          code="invalid_json")

    def slice(self, seconds: float) -> bool:
        """step() for `seconds` from now."""
        return self.step(time.monotonic() + seconds)

    def step(self, deadline: float) -> bool:
        """Work until done (True) or past the deadline (False); raises BadRequest."""
        while self.checked < len(self.buf) and not self.abandoned:
            end = min(len(self.buf), self.checked + UTF8_STEP)
            try:
                self.utf8.decode(self.buf[self.checked:end], end == len(self.buf))
            except UnicodeDecodeError as e:
                raise BadRequest("the request body is not UTF-8 text (at byte "
                                 f"{self.checked + e.start})", code="invalid_json") from None
            self.checked = end
            if time.monotonic() > deadline:
                return False
        while not self.done and not self.abandoned:
            self.token()
            if time.monotonic() > deadline:
                return False
        return True

    def token(self) -> None:
        if self.expect == "string":
            self._string_part()
            return
        self.pos = _SPACE.match(self.buf, self.pos).end()  # type: ignore[union-attr]
        if self.pos >= len(self.buf):
            if self.stack or self.expect != "next":
                raise self.fail("the body ends early")
            self.done = True
            return
        if not self.stack and self.expect == "next":
            raise self.fail("more follows the JSON value")
        char = self.buf[self.pos]
        if self.fresh and char == OPEN.get(self.stack[-1]):
            self._close(char)
            return
        self.fresh = False
        {"value": self._value, "key": self._key, "colon": self._colon,
         "next": self._next}[self.expect](char)

    def _value(self, char: int) -> None:
        if not self.stack and char != ord("{"):
            raise BadRequest("the request body must be a JSON object", code="invalid_json")
        if len(self.stack) == 1:
            self.value_start = self.pos
        if char in OPEN:
            if len(self.stack) >= MAX_DEPTH:
                raise self.fail(f"nested deeper than {MAX_DEPTH} levels")
            self.stack.append(char)
            self.pos += 1
            self.fresh = True
            self.expect = "key" if char == ord("{") else "value"
            self._runs()
        elif char == ord('"'):
            self._open_string("value")
        elif m := _NUMBER_OR_LITERAL.match(self.buf, self.pos):
            self.pos = m.end()
            self._after_value()
        else:
            raise self.fail("a value was expected")

    def _runs(self) -> None:
        """Skip small scalars in bulk where they are all an array or object holds, and
        top-level pairs of them that hold no wanted key."""
        if len(self.stack) == 1:
            m = _TOP_PAIR_RUN.match(self.buf, self.pos)
            if m is None or any(self.buf.find(q, m.start(), m.end()) >= 0 for q in self.quoted):
                return
        else:
            run = _ARRAY_RUN if self.stack[-1] == ord("[") else _PAIR_RUN
            if not (m := run.match(self.buf, self.pos)):
                return
        self.pos = m.end()
        self.fresh = False

    def _open_string(self, role: str) -> None:
        self.role, self.expect = role, "string"
        if role == "key":
            self.key_start = self.pos
        self.pos += 1

    def _string_part(self) -> None:
        self.pos = _STRING_PART.match(self.buf, self.pos).end()  # type: ignore[union-attr]
        if self.pos >= len(self.buf):
            raise self.fail("a string is not closed")
        char = self.buf[self.pos]
        if char != ord('"'):
            if char < 0x20 or (char == ord("\\") and not _ESCAPE_AT.match(self.buf, self.pos)):
                raise self.fail("a bad escape or a control character in a string")
            return  # a long string (or a long run of escapes): more of it next time
        self.pos += 1
        if self.role == "value":
            self._after_value()
            return
        if len(self.stack) == 1 and self.pos - self.key_start <= self.key_max:
            key = json.loads(self.buf[self.key_start:self.pos])
            self.key = key if key in self.wanted else None
        self.expect = "colon"

    def _after_value(self) -> None:
        if len(self.stack) == 1:
            if self.key is not None:
                self._keep(self.key, self.buf[self.value_start:self.pos])
            self.key = None
        self.expect = "next"

    def _keep(self, key: str, text: bytes | bytearray) -> None:
        if len(text) > WANTED_MAX:
            raise BadRequest(f"the value of {key!r} is longer than {WANTED_MAX} bytes")
        self.fields[key] = json.loads(text)

    def _key(self, char: int) -> None:
        if char != ord('"'):
            raise self.fail("a key in double quotes was expected")
        self._open_string("key")

    def _colon(self, char: int) -> None:
        if char != ord(":"):
            raise self.fail("':' was expected")
        self.pos += 1
        self.expect = "value"

    def _next(self, char: int) -> None:
        if char != ord(","):
            self._close(char)
            return
        self.pos += 1
        self.expect = "key" if self.stack[-1] == ord("{") else "value"
        self._runs()

    def _close(self, char: int) -> None:
        if not self.stack or OPEN[self.stack[-1]] != char:
            raise self.fail("',' or a closing bracket was expected")
        self.stack.pop()
        self.pos += 1
        self.fresh = False
        self._after_value()
