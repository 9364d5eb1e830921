"""The API key file: format, scopes, failing closed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from llamad.errors import ConfigError
from llamad.http.keys import Key, find, load, parse


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
