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
SYSTEMD_RUN = Path("/run/systemd/system")  # there when PID 1 is systemd


def problems() -> list[str]:
    """Why llamad.socket does not listen, where systemd runs it and it has failed."""
    if not SYSTEMD_RUN.is_dir():
        return []  # PID 1 is not systemd: nothing to ask
    try:
        out = subprocess.run(["systemctl", "show", UNIT, "-p", "ActiveState", "-p", "Result",
                              "-p", "Listen"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    props, listen = parse_show(out)
    if props.get("ActiveState") != "failed":
        return []
    held = [a for a in _addresses(listen) if taken(a)]
    if held:
        return [f"{UNIT} failed: another program listens on {a} (`ss -ltnp` names it); "
                f"stop it, or move llamad with `systemctl edit {UNIT}`, {RESTART}"
                for a in held]
    return [f"{UNIT} failed (result {props.get('Result', 'unknown')!r}); "
            f"`journalctl -u {UNIT}` says why; {RESTART}"]


def parse_show(out: str) -> tuple[dict[str, str], list[str]]:
    """`systemctl show`'s KEY=VALUE lines: the single-valued properties, and the Listen=
    values, which come one line per address (systemd 252), not as one line."""
    props: dict[str, str] = {}
    listen: list[str] = []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key == "Listen":
            listen.append(value)
        else:
            props[key] = value
    return props, listen


def _addresses(listen: list[str]) -> list[str]:
    """The TCP addresses among Listen= values (`127.0.0.1:8080 (Stream)`); split at the
    last ` (`: a UNIX socket's path may hold spaces."""
    found = []
    for value in listen:
        address, _, kind = value.rpartition(" (")
        if kind == "Stream)" and not address.startswith(("/", "@")):
            found.append(address)
    return found


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
