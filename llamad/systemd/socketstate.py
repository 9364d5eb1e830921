"""Whether llamad.socket listens, as one sentence per problem, for `llamad check-config`.

The package starts llamad.socket on 127.0.0.1:8080, which is also llama-server's own
default port: where another program already listens there, the socket fails, apt's
install says only that a job failed, and a client sent to the port talks to that other
program instead of llamad.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

UNIT = "llamad.socket"
RESTART = f"then `systemctl restart {UNIT}`"


def problems() -> list[str]:
    """Why llamad.socket does not listen, where systemd runs it and it has failed."""
    if not Path("/run/systemd/system").is_dir():
        return []  # PID 1 is not systemd: nothing to ask
    try:
        out = subprocess.run(["systemctl", "show", UNIT, "-p", "ActiveState", "-p", "Result",
                              "-p", "Listen"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    props = dict(line.partition("=")[::2] for line in out.splitlines())
    if props.get("ActiveState") != "failed":
        return []
    held = [a for a in _addresses(props.get("Listen", "")) if taken(a)]
    if held:
        return [f"{UNIT} failed: another program listens on {a} (`ss -ltnp` names it); "
                f"stop it, or move llamad with `systemctl edit {UNIT}`, {RESTART}"
                for a in held]
    return [f"{UNIT} failed (result {props.get('Result', 'unknown')!r}); "
            f"`journalctl -u {UNIT}` says why; {RESTART}"]


def _addresses(listen: str) -> list[str]:
    """TCP addresses of `systemctl show -P Listen`: `127.0.0.1:8080 (Stream) ...`."""
    words = listen.split()
    return [a for a, kind in zip(words[::2], words[1::2], strict=False)
            if kind == "(Stream)" and not a.startswith(("/", "@"))]


def taken(address: str) -> bool:
    """Whether a program listens on HOST:PORT (an IPv6 host in brackets): a connection is
    accepted there. A wildcard host is asked on loopback."""
    host, _, port = address.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host.strip("[]"), host.strip("[]"))
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except (OSError, ValueError):
        return False
