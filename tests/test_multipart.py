"""The multipart scanner (http/multipart.py): the model field of real uploads, bounded cost
for hostile ones, and a fuzz test (hypothesis) that it never crashes, hangs or allocates
beyond the body it was given."""

from __future__ import annotations

import email.parser
import time
import tracemalloc
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamad.errors import BadRequest
from llamad.http import multipart
from llamad.http.multipart import Form

CT = "multipart/form-data; boundary=b"


async def aiohttp_form(fields: list[tuple[str, bytes, str | None]]) -> tuple[str, bytes]:
    """A body as aiohttp's client (and so the openai SDK's httpx, alike) writes it."""
    form = aiohttp.FormData()
    for name, value, filename in fields:
        if filename:
            form.add_field(name, value, filename=filename, content_type="audio/wav")
        else:
            form.add_field(name, value.decode())
    payload = form()

    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()

        async def write(self, chunk: bytes) -> None:
            self.data += chunk
    sink = Sink()
    await payload.write(sink)  # type: ignore[arg-type]
    return payload.content_type, bytes(sink.data)


async def test_the_model_field_of_real_forms() -> None:
    ct, body = await aiohttp_form([("file", b"RIFF" + bytes(range(256)) * 40, "a.wav"),
                                   ("model", "gemma-ä".encode(), None),
                                   ("language", b"en", None)])
    assert Form(body, ct, "model").field() == "gemma-ä"
    assert Form(body, ct, "language").field() == "en"
    assert Form(body, ct, "prompt").field() is None
    # A file part named like the field is not the field.
    ct, body = await aiohttp_form([("model", b"not this", "model.txt"), ("model", b"m", None)])
    assert Form(body, ct, "model").field() == "m"


def test_preamble_padding_and_empty_headers() -> None:
    body = (b"preamble\r\n--b \t\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n"
            b"--b\r\n\r\nheaderless\r\n"
            b"--b\r\ncontent-disposition: form-data; name=model\r\n\r\nm\r\n--b--\r\n")
    assert Form(body, CT, "model").field() == "m"


def test_bad_forms_are_one_sentence(subtests: Any) -> None:
    for what, ct, body in [
            ("no boundary", "multipart/form-data", b"--b\r\n\r\nx\r\n--b--"),
            ("no part", CT, b"nothing here"),
            ("unclosed part", CT, b"--b\r\nContent-Disposition: form-data; name=\"model\""
                                  b"\r\n\r\nm"),
            ("headers without end", CT, b"--b\r\n" + b"X: y\r\n" * 3000),
            ("bad boundary line", CT, b"--bxx\r\n\r\n\r\n--b--"),
            ("a huge value", CT, b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
                                 + b"m" * 70000 + b"\r\n--b--\r\n")]:
        with subtests.test(what), pytest.raises(BadRequest) as e:
            Form(body, ct, "model").field()
        assert e.value.code == "invalid_form" and "\n" not in e.value.message


def test_millions_of_tiny_parts_cost_next_to_nothing() -> None:
    """security-review-3 M2: 30 MiB of `--b\\r\\n\\r\\nx\\r\\n` cost email's parser ~1.1 GiB
    and ~45 s of CPU. Here: refused after MAX_PARTS parts, in milliseconds."""
    body = b"--b\r\n\r\nx\r\n" * 3_000_000 + b"--b--\r\n"
    tracemalloc.start()
    began = time.process_time()
    try:
        with pytest.raises(BadRequest, match="more than 256 parts"):
            Form(body, CT, "model").field()
        took = time.process_time() - began
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert took < 0.5 and peak < 1 << 20, (took, peak)


def test_a_big_file_is_searched_a_window_at_a_time() -> None:
    """30 MiB of file before the model field: found without copying the file, each
    search step short (the GIL changes hands between them on the scanning thread)."""
    file = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n"
    body = file + b"\0" * (30 << 20) + \
        b"\r\n--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--b--\r\n"
    form = Form(body, CT, "model")
    calls: list[float] = []
    find = form.buf.find

    class Timed(bytes):
        def find(self, *args: Any) -> int:
            began = time.perf_counter()
            try:
                return find(*args)
            finally:
                calls.append(time.perf_counter() - began)
    form.buf = Timed(body)
    tracemalloc.start()
    try:
        assert form.field() == "m"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and len(calls) >= 30 and max(calls) < 0.05, (peak, max(calls))


def email_field(ct: str, body: bytes, name: str) -> str | None:
    """The reference: the stdlib's email parser, as llamad used it before."""
    message = email.parser.BytesParser().parsebytes(f"Content-Type: {ct}\r\n\r\n".encode()
                                                     + body)
    for part in message.walk():
        if part is not message and part.get_param("name", header="content-disposition") \
                == name and part.get_filename() is None:
            value = part.get_payload(decode=True)
            return value.decode(errors="replace") if isinstance(value, bytes) else None
    return None


_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\"\\"), max_size=12)
_PART = st.tuples(st.sampled_from(["model", "file", "language", "x"]), _TEXT,
                  st.booleans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PART, max_size=8))
def test_fuzz_well_formed_forms_agree_with_the_email_parser(
        parts: list[tuple[str, str, bool]]) -> None:
    body = b"".join(
        b"--b\r\nContent-Disposition: form-data; name=\"" + name.encode() + b"\"" +
        (b"; filename=\"f\"" if is_file else b"") + b"\r\n\r\n" + value.encode() + b"\r\n"
        for name, value, is_file in parts) + b"--b--\r\n"
    assert Form(body, CT, "model").field() == email_field(CT, body, "model")


_PIECES = st.sampled_from([b"--b", b"--b--", b"\r\n", b"\r\n\r\n", b"--", b"-", b"b", b" ",
                           b"Content-Disposition: form-data; name=\"model\"", b"x", b"\xff",
                           b"; filename=\"f\"", b"name=model", b"\n", b"\0" * 64])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PIECES, max_size=60), st.binary(max_size=64))
def test_fuzz_any_bytes_end_in_a_value_or_one_refusal(pieces: list[bytes],
                                                      tail: bytes) -> None:
    """Never a crash, a hang or an allocation beyond the body: a field, None, or a
    BadRequest."""
    body = b"".join(pieces) + tail
    tracemalloc.start()
    began = time.process_time()
    try:
        try:
            value = Form(body, CT, "model").field()
            assert value is None or len(value.encode()) <= 3 * multipart.MAX_VALUE
        except BadRequest as e:
            assert e.code == "invalid_form"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.process_time() - began < 0.5
    assert peak < 64 * 1024 + 4 * len(body)
