"""Ports on loopback: a free one to listen on, or one where connections are refused."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody on this machine listens on now (the box shares the host's network)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def refused_url(host: str = "127.0.0.1") -> Iterator[str]:
    """The URL of a port held bound, never listening, while the block runs: a connection
    to it is refused, and nobody else can take the port meanwhile."""
    with socket.socket() as s:
        s.bind((host, 0))
        yield f"http://{host}:{s.getsockname()[1]}"
