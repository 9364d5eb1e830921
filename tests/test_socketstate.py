"""llamad.socket's state for check-config: the pure parts (tests/integration/
test_failure_reasons.py fails a real llamad.socket)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from llamad.systemd import socketstate


def test_a_listener_holds_its_address() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        assert not socketstate.taken(f"127.0.0.1:{port}")  # bound, not listening
        held.listen()
        assert socketstate.taken(f"127.0.0.1:{port}")
        assert socketstate.taken(f"0.0.0.0:{port}")  # a wildcard is asked on loopback
    assert not socketstate.taken(f"127.0.0.1:{port}")


# `systemctl show llamad.socket -p ActiveState -p Result -p Listen` as systemd 252 (Debian 12)
# prints it for a socket with four ListenStream= that failed: one Listen= line per address.
SHOWN_BY_252 = ("Listen=/run/t sp.sock (Stream)\nListen=127.0.0.1:44699 (Stream)\n"
                "Listen=[::1]:44700 (Stream)\nListen=/run/t2.sock (Stream)\n"
                "Listen=127.0.0.1:53 (Datagram)\nResult=resources\nActiveState=failed\n")


def test_every_listen_line_is_read() -> None:
    """Each address is a line of its own: reading the output as one dict kept only the last
    one, so a held TCP port followed by a UNIX socket went unnamed."""
    props, listen = socketstate.parse_show(SHOWN_BY_252)
    assert props == {"Result": "resources", "ActiveState": "failed"}
    assert socketstate._addresses(listen) == ["127.0.0.1:44699", "[::1]:44700"]


def test_a_held_address_is_named_whichever_line_it_is_on(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    monkeypatch.setattr(socketstate, "SYSTEMD_RUN", tmp_path, raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: SimpleNamespace(
        stdout=SHOWN_BY_252))
    monkeypatch.setattr(socketstate, "taken", lambda address: address == "127.0.0.1:44699")
    said = socketstate.problems()
    assert len(said) == 1 and "another program listens on 127.0.0.1:44699" in said[0], said
