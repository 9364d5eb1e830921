"""Host names and origins as browsers send them."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamad.config import Config, load_config
from llamad.errors import ConfigError
from llamad.http.browsers import host_name, is_loopback


@pytest.mark.parametrize(("header", "name"), [
    ("localhost:8080", "localhost"), ("LocalHost", "localhost"), ("[::1]:8080", "::1"),
    ("127.0.0.1", "127.0.0.1"), ("llm.example.org.:443", "llm.example.org"), ("::1", "::1")])
def test_host_name(header: str, name: str) -> None:
    assert host_name(header) == name


def test_loopback() -> None:
    for name in ("localhost", "ui.localhost", "127.0.0.1", "127.8.9.10", "::1"):
        assert is_loopback(name), name
    for name in ("localhost.example.org", "10.0.0.1", "0.0.0.0", "example", "127.0.0.1.nip.io"):
        assert not is_loopback(name), name


def test_cors_origins_are_origins(tmp_path: Path) -> None:
    conf = tmp_path / "llamad.conf"
    conf.write_text("cors-origins = https://ui.example.org, http://127.0.0.1:3000\n"
                    "allowed-hosts = LLM.example.org.\n")
    c = load_config(conf)
    assert c.cors_origins == ("https://ui.example.org", "http://127.0.0.1:3000")
    assert c.allowed_hosts == ("llm.example.org",)
    conf.write_text("cors-origins = ui.example.org/path\n")
    with pytest.raises(ConfigError, match=r"cors-origins = 'ui\.example\.org/path' is invalid"):
        load_config(conf)
    assert Config.default().cors_origins == () and Config.default().allowed_hosts == ()
