"""Property tests (hypothesis) for the parsers of files others write: the GGUF header reader,
the preset parser and the API key-file parser. Whatever the bytes, each answers or refuses
with its own error (GGUFError, ConfigError), within a bounded time and memory; never another
exception, a hang or an allocation the input claims.

The settings are deterministic (`derandomize`) and bounded (FUZZ), so `make test` runs the
same examples each time in a few seconds.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ggufgen
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamad.catalog.argv import BY_KEY
from llamad.catalog.gguf_info import FileHeader, GGUFError, read_header
from llamad.catalog.presets import parse_presets
from llamad.errors import ConfigError
from llamad.http.keys import parse as parse_keys

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@pytest.fixture(scope="module")
def model(scratch: Path) -> bytes:
    """A small real GGUF file: a vocabulary, keys of several types, two tensors."""
    return ggufgen.write_model(scratch / "real.gguf").read_bytes()


def bounded(read: object) -> tuple[float, int]:
    """(CPU seconds, peak bytes allocated) of calling `read`."""
    tracemalloc.start()
    start = time.thread_time()
    try:
        read()  # type: ignore[operator]
    finally:
        cpu = time.thread_time() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return cpu, peak


def header_of(path: Path, data: bytes, size: int | None = None) -> FileHeader | None:
    path.write_bytes(data)
    if size is not None:
        os.truncate(path, size)  # sparse: the claims may be as big as they like
    try:
        return read_header(path)
    except GGUFError:
        return None


U64 = st.one_of(st.integers(0, 64), st.sampled_from([2**31, 2**32 - 1, 2**40, 2**62, 2**64 - 1]))


@FUZZ
@given(data=st.data())
def test_mutated_gguf_headers_are_read_or_refused(scratch: Path, model: bytes,
                                                  data: st.DataObject) -> None:
    """A real file with bytes changed, counts and lengths set to anything, cut short."""
    raw = bytearray(model)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, min(len(raw), 2048) - 8))
        if data.draw(st.booleans()):
            raw[at:at + 8] = struct.pack("<Q", data.draw(U64))
        else:
            raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    sparse = data.draw(st.sampled_from([None, None, 2**40]))
    blob = bytes(raw[:cut] if cut is not None else raw)
    cpu, peak = bounded(lambda: header_of(scratch / "m.gguf", blob, sparse))
    assert cpu < 2 and peak < 4 * MIB, (cpu, peak)


KEY = st.sampled_from([b"general.architecture", b"general.alignment", b"general.file_type",
                       b"llama.context_length", b"llama.block_count", b"x", b""])


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """A GGUF header built from parts: any counts, value types, array types and lengths."""
    out = [b"GGUF", struct.pack("<IQQ", draw(st.sampled_from([1, 2, 3, 4, 3 << 16])),
                                draw(U64), draw(U64))]
    for _ in range(draw(st.integers(0, 6))):
        key = draw(KEY)
        kind = draw(st.integers(0, 14))
        out += [struct.pack("<Q", len(key)), key, struct.pack("<I", kind)]
        if kind == 9:
            out.append(struct.pack("<IQ", draw(st.integers(0, 14)), draw(U64)))
        out.append(draw(st.binary(max_size=24)))
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from([b"blk.0.w", b"token_embd.weight", b"output.weight",
                                     b"blk.99999999999.w", b"x" * 70]))
        dims = draw(st.integers(0, 6))
        out += [struct.pack("<Q", len(name)), name, struct.pack("<I", dims),
                *(struct.pack("<q", draw(st.integers(-2, 2**40))) for _ in range(dims)),
                struct.pack("<IQ", draw(st.integers(0, 40)), draw(U64))]
    return b"".join(out) + draw(st.binary(max_size=64))


@FUZZ
@given(blob=headers(), sparse=st.sampled_from([None, 2**40]))
def test_built_gguf_headers_are_read_or_refused(scratch: Path, blob: bytes,
                                                sparse: int | None) -> None:
    cpu, peak = bounded(lambda: header_of(scratch / "b.gguf", blob, sparse))
    assert cpu < 2 and peak < 4 * MIB, (cpu, peak)


@FUZZ
@given(blob=st.binary(max_size=512))
def test_any_bytes_are_read_or_refused(scratch: Path, blob: bytes) -> None:
    header_of(scratch / "any.gguf", b"GGUF" + blob)
    header_of(scratch / "any.gguf", blob)


# llama-server's keys (a sample), and the keys llamad itself reads, as often as the rest.
KEY_NAMES = st.one_of(
    st.sampled_from(sorted(k for k in BY_KEY if not k.startswith("LLAMA_ARG"))[::7]),
    st.sampled_from(["model", "alias", "rpc", "hf-repo", "spec-draft-hf", "ttl", "pin",
                     "memory-max", "memory-high", "devices", "split", "stop-timeout",
                     "load-on-startup", "dedup-cache-models", "version", "nonsense"]))
VALUE = st.one_of(st.sampled_from(["1", "-1", "0", "nan", "inf", "-inf", "1e999", "true", "x:1",
                                   "10.0.0.1:5", "0,1", "-2", "8G", "75%", ""]),
                  st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=16))
PAIR = st.builds(lambda k, v: f"{k} = {v}", KEY_NAMES, VALUE)
LINE = st.one_of(  # mostly lines that parse, so that what they say is checked too
    PAIR, PAIR, PAIR, PAIR, PAIR, PAIR,
    st.builds(lambda n: f"[{n}]", st.one_of(st.sampled_from(["*", "m", "u/r:q4_k_m"]),
                                            st.text(max_size=12))),
    st.sampled_from(["", "; comment", "# comment", "  "]),
    st.text(max_size=20))


@FUZZ
@given(lines=st.lists(LINE, max_size=12))
def test_presets_parse_or_name_the_problem(lines: list[str]) -> None:
    text = "\n".join(lines)
    start = time.thread_time()
    try:
        presets = parse_presets(text, Path("/etc/llamad/presets.ini"))
    except ConfigError as e:
        assert e.message.startswith("/etc/llamad/presets.ini")
        return
    finally:
        assert time.thread_time() - start < 1
    for name, section in presets.sections.items():
        assert section.name == name


OWN = ["ttl", "stop-timeout", "pin", "split", "load-on-startup", "dedup-cache-models",
       "memory-max", "memory-high", "devices"]


@FUZZ
@given(pairs=st.lists(st.tuples(st.sampled_from(OWN), VALUE), min_size=1, max_size=4))
def test_llamads_own_preset_keys_take_only_sane_values(pairs: list[tuple[str, str]]) -> None:
    """What llamad itself acts on: durations finite and not negative (-1 for ttl aside),
    switches booleans, devices indices; else one sentence naming the key."""
    text = "[m]\n" + "".join(f"{k} = {v}\n" for k, v in pairs)
    try:
        extra = parse_presets(text).sections["m"].extra
    except ConfigError as e:
        assert "[m]" in e.message and "allowed:" in e.message
        return
    for key, value in extra.items():
        if key in ("ttl", "stop-timeout"):
            assert value is None or (isinstance(value, float) and 0 <= value < float("inf"))
        elif key in ("memory-max", "memory-high"):
            assert isinstance(value, str) and value
        elif key == "devices":
            assert isinstance(value, tuple) and all(d >= 0 for d in value)
        else:
            assert isinstance(value, bool)


@FUZZ
@given(lines=st.lists(st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, s: f"{k} {s}", st.text(min_size=1, max_size=10),
              st.sampled_from(["admin", "models=a,b", "models=", "admin admin", "x"]))),
    max_size=10))
def test_key_files_parse_or_name_the_line(lines: list[str]) -> None:
    path = Path("/etc/llamad/api-keys")
    try:
        keys = parse_keys("\n".join(lines), path)
    except ConfigError as e:
        assert e.message.startswith(str(path))
        return
    secrets = {line.split()[0].encode() for line in "\n".join(lines).splitlines()
               if line.split() and not line.split()[0].startswith("#")}
    assert keys and {k.secret for k in keys} == secrets
