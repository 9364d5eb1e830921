"""Sets the guest up once for all its tests (vmguest.py has what they share): the other
hosts' addresses, the rpc worker, llamad.socket on a second address, a peer, and llamad's
configuration; then waits for llamad to answer through its socket."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from vm.guest.vmguest import (
    CONF,
    ELSEWHERE,
    LLAMAD_CONF,
    PEER,
    PEER_PORT,
    PRESETS,
    WORKER,
    health,
    sh,
    wait_for,
)


def _network() -> None:
    """Other hosts' addresses on a dummy link (not loopback), and llamad's socket on one."""
    sh("ip link add vmnet0 type dummy && ip link set vmnet0 up")
    for address in (WORKER, PEER, ELSEWHERE):
        sh(f"ip addr add {address}/32 dev vmnet0")


def _worker() -> None:
    """The llamad-rpc-worker package's unit, as docs/scaling.md sets it up on a worker host:
    listening on its address, letting in the llamad host (its address as the worker sees
    it: the connection comes from the dummy link's first address)."""
    dropin = Path("/etc/systemd/system/llamad-rpc-worker.service.d/vm.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(f"[Service]\nEnvironment=RPC_HOST={WORKER} RPC_THREADS=2\n"
                      f"IPAddressAllow={WORKER}\n")
    sh("systemctl daemon-reload && systemctl start llamad-rpc-worker.service")


def _socket() -> None:
    """llamad.socket also on a non-loopback address, as docs/security.md tells admins."""
    dropin = Path("/etc/systemd/system/llamad.socket.d/vm.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(f"[Socket]\nListenStream={WORKER}:8080\n")
    sh("systemctl daemon-reload && systemctl restart llamad.socket")


class _Peer(BaseHTTPRequestHandler):
    """Another host's llamad as GET /v1/models shows it (tests/test_fleet.py's peer)."""

    def do_GET(self) -> None:  # http.server's name
        body = json.dumps({"object": "list", "data": [
            {"id": "peer-only", "object": "model", "owned_by": "llamad"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _peer() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((PEER, PEER_PORT), _Peer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="session", autouse=True)
def llamad() -> Iterator[None]:
    _network()
    _worker()
    _socket()
    peer = _peer()
    Path("/etc/llamad/presets.ini").write_text(PRESETS)
    CONF.write_text(LLAMAD_CONF)
    start = time.monotonic()
    try:
        wait_for("llamad to answer through llamad.socket", lambda: health() == 200, 300)
    except TimeoutError as e:  # every test would wait out its own timeouts
        print(sh("journalctl -b -o cat -n 40 -u llamad.service", check=False))
        pytest.exit(str(e), returncode=1)
    print(f"llamad answered after {time.monotonic() - start:.1f} s (socket activation)")
    yield
    peer.shutdown()
    print(sh("systemctl status --no-pager --lines=0 llamad.service 'llama-server@*'",
             check=False))
