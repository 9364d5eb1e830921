"""The request body scanner against Python's own JSON parser, and its bounds."""

from __future__ import annotations

import asyncio
import codecs
import io
import json
import random
import time
import tracemalloc
from typing import Any

import pytest
from helpers.watch import eventually
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamad.errors import BadRequest
from llamad.http import body as bodies
from llamad.http.body import MAX_DEPTH, WANTED, Scanner, parse_keep_alive
from llamad.http.limits import LIMITS


def scan(body: bytes) -> dict[str, Any]:
    s = Scanner(body)
    assert s.step(time.monotonic() + 60)
    return s.fields


def reference(body: bytes) -> dict[str, Any] | None:
    """What a strict parser says: the WANTED fields, or None when the body is refused."""
    def no_constants(name: str) -> None:
        raise ValueError(name)
    try:
        # RFC 8259 lets a parser ignore a leading byte order mark; llama-server's does.
        data = json.loads(body.decode("utf-8-sig"), parse_constant=no_constants)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or _depth(data) > MAX_DEPTH:
        return None
    if any(k in WANTED and len(json.dumps(v)) > 60_000 for k, v in data.items()):
        return None  # decoded values are at most 64 KiB of JSON
    return {k: v for k, v in data.items() if k in WANTED}


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([0, -1, 7, 10**30, 1.5, -2.5e-7, 3e300])
    if kind == 1:
        return rng.choice([True, False, None])
    if kind in (2, 3, 4, 5):
        return "".join(rng.choice('ab "\\\n\tü€\u2028/') for _ in range(rng.randrange(12)))
    if kind in (6, 7):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.choice(["model", "stream", "keep_alive", "x", "messages", "mod\\u0065l"]):
            _random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


MUTATIONS = [b"", b",", b"]", b"}", b"{", b"[", b'"', b"\\", b":", b"\x00", b"\n", b"NaN",
             b"Infinity", b"-", b"0", b"01", b".", b"e", b"tru", b"\xff", b"\xc3", b" "]


def test_agrees_with_a_strict_parser() -> None:
    rng = random.Random(1)
    checked = refused = 0
    for _ in range(4000):
        doc = {k: _random_value(rng, 1) for k in rng.sample(
            ["model", "stream", "keep_alive", "messages", "x"], rng.randrange(1, 5))}
        text = json.dumps(doc, ensure_ascii=rng.random() < 0.5,
                          indent=rng.choice([None, 1])).encode()
        if rng.random() < 0.6:
            at = rng.randrange(len(text) + 1)
            cut = rng.randrange(3)
            text = text[:at] + rng.choice(MUTATIONS) + text[at + cut:]
        want = reference(text)
        try:
            got: dict[str, Any] | None = scan(text)
        except BadRequest:
            got = None
        assert got == want, text
        checked += 1
        refused += want is None
    assert refused > 500 and checked - refused > 1500


@pytest.mark.parametrize("body", [
    b'{"model": "a", "keep_alive": NaN}', b'{"keep_alive": Infinity}', b'{"a": -Infinity}',
    b"[" * 100 + b"]" * 100, b'{"a": ' + b"[" * 600 + b"]" * 600 + b"}",
    b'{"model": "caf\xe9"}', b"\xef\xbb\xbf", b'{"a": 1} x', b'{"a": "\x01"}', b"",
    b'{"a": 01}', b'{"a": [1,]}', b'{"a": {"b": 1,}}', b'{"a" 1}', b"{'a': 1}",
])
def test_refused(body: bytes) -> None:
    with pytest.raises(BadRequest) as e:
        scan(body)
    assert e.value.status == 400 and e.value.code == "invalid_json"


def test_wanted_fields_only() -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 100_000,
                                     "model": "inner"}],
                       "model": "gemma", "stream": True, "keep_alive": "5m",
                       "numbers": list(range(50_000))}).encode()
    assert scan(body) == {"model": "gemma", "stream": True, "keep_alive": "5m"}
    assert scan(b'{"mod\\u0065l": "b", "model": "c"}') == {"model": "c"}
    assert scan(b'{"model": {"deep": [1, 2]}}') == {"model": {"deep": [1, 2]}}
    with pytest.raises(BadRequest, match="longer than"):
        scan(b'{"model": "' + b"m" * 70_000 + b'"}')


def _escaped(key: str) -> bytes:
    """`key` as JSON text with every character a \\u escape, as llama-server decodes it."""
    return b'"' + "".join(f"\\u{ord(c):04x}" for c in key).encode() + b'"'


def test_numbers_that_become_memory_are_bounded_however_spelled() -> None:
    """Each of BOUNDED is refused past its bound, its key written plainly or wholly in
    escapes, whether a small body's fields come from json.loads or a big one's from the
    Scanner; `logprobs` is n_probs' alias, and as OpenAI's chat flag (true) no number."""
    wanted = frozenset((*WANTED, *bodies.BOUNDED))
    for key, (most, _) in bodies.BOUNDED.items():
        for spelled in (json.dumps(key).encode(), _escaped(key)):
            body = b'{"model": "m", ' + spelled + b": " + str(most + 1).encode() + b"}"
            big = body.replace(b'"m",', b'"m", "prompt": "' + b"x" * bodies.INLINE + b'",')
            scanner = Scanner(big, wanted)
            assert scanner.step(time.monotonic() + 60)
            for fields in (bodies._quick(body, wanted), scanner.fields):
                assert fields is not None
                with pytest.raises(BadRequest, match=f"{key} {most + 1} is too large"):
                    bodies.check_bounds(fields)
            bodies.check_bounds({key: most})
    bodies.check_bounds({"logprobs": True, "top_logprobs": 20})


def test_a_large_body_takes_many_bounded_steps() -> None:
    """With its time always up, a step does one bounded piece of work (at most 256 KiB of a
    string, 256 small array items, 32 tokens or 1 MiB of UTF-8) and returns: so each step
    between two yields to the event loop is short, whatever the body holds."""
    for body in (json.dumps({"model": "m", "prompt": "word " * 2_000_000}).encode(),
                 json.dumps({"model": "m", "input": list(range(1_000_000))}).encode(),
                 json.dumps({"model": "m", "x": [[i, "ab"] for i in range(200_000)]}).encode()):
        s = Scanner(body)
        steps = 1
        while not s.step(0.0):
            steps += 1
        assert s.fields == {"model": "m"}
        assert steps > len(body) // (1 << 20), (len(body), steps)
        assert steps < len(body) // 64, (len(body), steps)


def test_keep_alive_values() -> None:
    assert parse_keep_alive(5) == 5.0 and parse_keep_alive("-1") == -1.0
    # Up to Go's largest duration (as Go writes it), Ollama's type for keep_alive.
    assert parse_keep_alive("2562047h47m16.854775807s") == pytest.approx(2**63 / 1e9)
    for bad in (float("nan"), float("inf"), "9" * 400 + "h", 1e12, "2562048h"):
        with pytest.raises(BadRequest):
            parse_keep_alive(bad)


async def test_read_json_small_and_big(subtests: Any) -> None:
    """Through aiohttp: a small body is checked on the loop, a big one on the thread."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from helpers import guarded

    from llamad.http.body import read_json

    async def handle(request: web.Request) -> web.Response:
        body, fields = await read_json(request, "pinned")
        with pytest.raises(LookupError, match=r"read_json\(request, 'other'\)"):
            fields.get("other")  # never decoded: asking is a bug, and says so
        return web.json_response({"fields": fields.values, "size": len(body)})

    app = guarded.body_checking(handle)
    lim = app[LIMITS]
    async with TestClient(TestServer(app)) as client:
        for size in (10, 1 << 20):
            with subtests.test(size=size):
                body = json.dumps({"model": "m", "stream": True, "x": "y" * size,
                                   "pinned": False}).encode()
                r = await client.post("/", data=io.BytesIO(body))
                assert await r.json() == {"fields": {"model": "m", "stream": True,
                                                     "pinned": False}, "size": len(body)}
        r = await client.post("/", data=io.BytesIO(b'{"model": "m", "x": [' + b"1," * 100_000
                                                   + b"]}"))
        assert r.status == 400  # the trailing comma, found on the thread
        assert lim.body_bytes == 0


async def test_a_client_gone_mid_body_is_no_error_of_llamads() -> None:
    """A client that closes before its body is complete: client_gone, not a traceback."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer
    from helpers import guarded

    from llamad.errors import LlamadError
    from llamad.http.body import read_json

    outcome: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def handle(request: web.Request) -> web.Response:
        try:
            await read_json(request)
        except BaseException as e:  # whatever it is, the test shows it
            outcome.set_result(e)
            raise
        return web.json_response({})

    app = guarded.body_checking(handle)
    lim = app[LIMITS]
    async with TestServer(app) as server:
        _, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": \"m\", \"x\": \"")
        await writer.drain()
        writer.close()
        e = await asyncio.wait_for(outcome, 10)
        # aiohttp 3.8 cancels the handler instead; 3.9 and later raise in the read.
        if not isinstance(e, asyncio.CancelledError):
            assert isinstance(e, LlamadError) and e.code == "client_gone", repr(e)
        # Released as the middleware unwinds.
        await eventually("the body's bytes to be released", lambda: lim.body_bytes == 0)


# -- fuzzing (hypothesis): the scanner meets bodies nobody wrote by hand ----------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                          allow_infinity=False) |
    st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.sampled_from(["model", "stream", "keep_alive", "x", "mod\u0065l", ""]) |
        st.text(max_size=6), inner, max_size=5),
    max_leaves=30)
_BODY = st.tuples(st.dictionaries(st.sampled_from([*WANTED, "messages", "x"]), _JSON,
                                  max_size=5),
                  st.booleans(), st.sampled_from([None, 0, 2]),
                  st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(MUTATIONS),
                                     st.integers(0, 2)), max_size=3))


def _fuzzed(doc: dict[str, Any], ascii_only: bool, indent: int | None,
            mutations: list[tuple[int, bytes, int]]) -> bytes:
    text = json.dumps(doc, ensure_ascii=ascii_only, indent=indent).encode()
    for at, piece, cut in mutations:
        at %= len(text) + 1
        text = text[:at] + piece + text[at + cut:]
    return text


def _bounded_scan(body: bytes) -> tuple[dict[str, Any] | None, float, int]:
    """The scanner's verdict, its CPU seconds and its peak allocation."""
    tracemalloc.start()
    began = time.process_time()
    try:
        try:
            got: dict[str, Any] | None = scan(body)
        except BadRequest as e:
            assert e.status == 400
            got = None
        return got, time.process_time() - began, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_BODY)
def test_fuzz_agrees_with_a_strict_parser(case: tuple[Any, ...]) -> None:
    body = _fuzzed(*case)
    got, took, peak = _bounded_scan(body)
    assert got == reference(body), body
    assert took < 1.0 and peak < 4 * len(body) + 256 * 1024, (took, peak, len(body))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from([*MUTATIONS, b'"model"', b'{"model":', b"[1,2,3]", b"{}",
                                 b'"\\u00e9"', b"\\u", b"1e999", b"-0.0e-0"]), max_size=200),
       st.binary(max_size=32))
def test_fuzz_any_bytes_end_in_fields_or_one_refusal(pieces: list[bytes], tail: bytes) -> None:
    """Never a crash (only BadRequest), a hang or an allocation out of proportion."""
    body = b"".join(pieces) + tail
    got, took, peak = _bounded_scan(body)
    assert got == reference(body)
    assert took < 1.0 and peak < 4 * len(body) + 256 * 1024, (took, peak, len(body))


JSONS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "stream", "keep_alive", "x", "mo\\u0064el"]),
                       JSONS, max_size=4), st.binary(max_size=3), st.integers(0, 200))
def test_the_quick_read_of_a_small_body_agrees_with_the_scanner(
        fields: dict[str, object], junk: bytes, where: int) -> None:
    """Wherever json.loads takes a small body (body._quick), the Scanner finds it valid
    with the same fields; a body it does not take goes to the Scanner."""
    text = json.dumps(fields).encode().replace(b"\\\\u0064", b"\\u0064")
    for candidate in (text, text[:where] + junk + text[where:]):
        quick = bodies._quick(candidate, frozenset(WANTED))
        if quick is None:
            continue
        s = Scanner(candidate)
        assert s.step(time.monotonic() + 60) and s.fields == quick, candidate


def test_a_leading_byte_order_mark_is_read_past_as_llama_server_does() -> None:
    """Notepad and PowerShell save JSON with a UTF-8 BOM; llama-server (nlohmann's
    parser) and router mode take such a body, so llamad answered 400 to a request
    llama-server serves. Only at the very start: anywhere else it is no JSON."""
    bom = codecs.BOM_UTF8
    small = bom + b'{"model": "m", "stream": true}'
    assert bodies._quick(small, frozenset(WANTED)) == {"model": "m", "stream": True}
    assert scan(small) == {"model": "m", "stream": True}
    big = bom + json.dumps({"model": "m", "x": "y" * 100_000}).encode()
    assert bodies._quick(big, frozenset(WANTED)) is None and scan(big) == {"model": "m"}
    for misplaced in (b" " + small, bom + bom + small[3:], b'{"model": ' + bom + b'"m"}'):
        with pytest.raises(BadRequest):
            scan(misplaced)


def test_a_string_of_many_escapes_in_a_row_is_valid() -> None:
    """The Scanner reads a string 64 pieces at a time; a run of more escapes than that (40
    characters beyond the BMP are 80 escapes) goes on to the next piece, not an error."""
    text = "\U00010000" * 40
    assert scan(json.dumps({"model": text}).encode()) == {"model": text}
