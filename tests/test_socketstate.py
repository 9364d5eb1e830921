"""llamad.socket's state for check-config: the pure parts (tests/integration/
test_failure_reasons.py fails a real llamad.socket)."""

from __future__ import annotations

import socket

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


def test_listen_addresses_as_systemctl_shows_them() -> None:
    listen = "127.0.0.1:8080 (Stream) [::1]:8081 (Stream) /run/x.sock (Stream) 127.0.0.1:53 " \
        "(Datagram)"
    assert socketstate._addresses(listen) == ["127.0.0.1:8080", "[::1]:8081"]
