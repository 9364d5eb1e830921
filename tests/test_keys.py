"""The API key file: format, scopes, failing closed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from llamad.errors import ConfigError
from llamad.http.keys import Key, find, load, load_peer_key, parse


def test_scopes(tmp_path: Path) -> None:
    keys = parse("# comment\n\nplain\nboss admin\n  narrow models=a,b \n", tmp_path / "k")
    assert keys == (Key(b"plain"), Key(b"boss", admin=True),
                    Key(b"narrow", models=frozenset({"a", "b"})))
    assert find(keys, "boss") == Key(b"boss", admin=True)
    assert find(keys, "bos") is None and find(keys, "") is None and find(keys, "plain ") is None
    narrow = keys[2]
    assert narrow.may_use("a") and not narrow.may_use("c") and narrow.may_use("x", ("b",))


def test_fails_closed(tmp_path: Path, subtests: Any) -> None:
    path = tmp_path / "keys"
    for text, words in [("# only a comment\n", "holds no key"), ("", "holds no key"),
                        ("k admin extra\n", ":1: after the key"), ("k models=\n", ":1:"),
                        ("k\nk admin\n", ":2: this key appears")]:
        with subtests.test(text=text):
            path.write_text(text)
            with pytest.raises(ConfigError, match=words) as e:
                load(path)
            assert str(path) in e.value.message and "\n" not in e.value.message
            assert "k admin" not in e.value.message  # keys are never echoed
    with pytest.raises(ConfigError, match=r"cannot be read \(No such file or directory\)"):
        load(tmp_path / "missing")
    with pytest.raises(ConfigError, match="cannot be read"):
        load(tmp_path)


def test_warns_when_others_may_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys"
    path.write_text("k\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        load(path)
        assert not caplog.records
        path.chmod(0o640)
        load(path)
    assert "readable by group or others (mode 0640)" in caplog.text


async def test_a_key_that_is_not_utf8_is_a_wrong_key(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """security-review-3 L4: raw bytes in the header (aiohttp hands them over as surrogates)
    gave every unauthenticated client a 500 and a traceback in the journal."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from llamad.http import keys, middleware

    (tmp_path / "keys").write_text("k\n")
    app = web.Application(middlewares=[middleware.error_middleware,
                                       keys.middleware(keys.Keyring(tmp_path / "keys"))])

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({})
    app.router.add_get("/v1/models", ok)
    async with TestServer(app) as server:
        for header in (b"Authorization: Bearer \xff\xfe", b"x-api-key: k\xe9",
                       b"Authorization: Bearer k\x80"):
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + header +
                         b"\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
            assert b'"code": "invalid_api_key"' in answer
            # Both headers a client may use are named (Anthropic's SDKs send x-api-key).
            assert b"(Authorization: Bearer KEY, or x-api-key: KEY)" in answer
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text


def test_the_peer_key_file(tmp_path: Path) -> None:
    path = tmp_path / "peer"
    path.write_text("  s3cret \n")
    path.chmod(0o600)
    assert load_peer_key(path) == "s3cret"
    for text in ("", "a b\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match="exactly one key"):
            load_peer_key(path)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_peer_key(tmp_path / "absent")


def test_keep_alive_is_an_admins_say() -> None:
    """Without keys every client is admin; with keys another key's keep_alive is ignored,
    not refused (Continue sends one with every request)."""
    from aiohttp.test_utils import make_mocked_request

    from llamad.http.keys import REQUEST_KEY, admins_say

    request = make_mocked_request("POST", "/api/chat")
    assert admins_say(request, 0.0) == 0.0
    request[REQUEST_KEY] = Key(b"k", admin=True)
    assert admins_say(request, -1.0) == -1.0
    request[REQUEST_KEY] = Key(b"k")
    assert admins_say(request, 0.0) is None
