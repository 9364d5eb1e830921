"""IP address filters, which systemd enforces with BPF on cgroup v2 only.

- llamad.service (IPAddressDeny=any, IPAddressAllow=localhost) still reaches what its
  configuration names beyond loopback: the rpc worker it probes before a load, and its
  peers (security-review-3 L8). llamad adds those addresses to its unit's IPAddressAllow=.
- An RPC model's unit reaches its worker and nothing else.
- Connections accepted on llamad.socket are not subject to llamad.service's filter.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from vm.guest.vmguest import (
    ELSEWHERE,
    PEER,
    PEER_PORT,
    RPC_PORT,
    WORKER,
    cgroup,
    http,
    load,
    model,
    sh,
    show,
)


def test_llamad_reaches_its_rpc_worker() -> None:
    print(f"llamad.service: IPAddressDeny={show('llamad.service', 'IPAddressDeny')} "
          f"IPAddressAllow={show('llamad.service', 'IPAddressAllow')}")
    # An explicit load: rpcguard probes the worker at once and fails the model if it does
    # not answer ("no connection within 2 s" where llamad's filter drops it); llama-server
    # then sends its share of the weights there.
    info = load("remote")
    assert info["rpc"]["workers"] == [f"{WORKER}:{RPC_PORT}"]


def test_llamad_reaches_its_peers() -> None:
    status, listing = http("GET", "/v1/models")
    assert status == 200
    assert listing["peers"] == [{"url": f"http://{PEER}:{PEER_PORT}", "models": 1}]
    assert "peer-only" in [e["id"] for e in listing["data"]]


@pytest.fixture
def listener() -> Iterator[tuple[str, int]]:
    """Something to reach on an address the unit was not given."""
    with socket.create_server((ELSEWHERE, 0)) as server:
        yield server.getsockname()[:2]


# Run inside a unit's cgroup (moved there before it reads its go): which connections the
# cgroup's BPF filter lets through. Everything else about the process is the test's. A
# dropped SYN is not an error to connect(): a blocked address times out.
PROBE = """
import errno, json, socket, sys
sys.stdin.readline()
out = {}
for target in json.loads(sys.argv[1]):
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        out[target] = "connected"
    except OSError as e:
        out[target] = errno.errorcode.get(e.errno, str(e))
print(json.dumps(out))
"""


def connects_from(unit_cgroup: Path, targets: list[str]) -> dict[str, str]:
    proc = subprocess.Popen([sys.executable, "-c", PROBE, json.dumps(targets)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        (unit_cgroup / "cgroup.procs").write_text(f"{proc.pid}\n")
        out, _ = proc.communicate("go\n", timeout=60)
    finally:
        proc.kill()
    return json.loads(out)  # type: ignore[no-any-return]


def test_rpc_model_unit_reaches_its_worker_and_nothing_else(
        listener: tuple[str, int]) -> None:
    info = model("remote")
    if info["state"] != "ready":
        info = load("remote")
    unit = info["unit"]
    print(f"{unit}: IPAddressDeny={show(unit, 'IPAddressDeny')} "
          f"IPAddressAllow={show(unit, 'IPAddressAllow')}")
    worker, other, door = f"{WORKER}:{RPC_PORT}", f"{listener[0]}:{listener[1]}", \
        "127.0.0.1:8080"
    # From outside any filter all three answer; from the unit's cgroup only its worker.
    assert connects_from(cgroup("llamad-vm-tests.service"), [other, door]) == {
        other: "connected", door: "connected"}
    assert connects_from(cgroup(unit), [worker, other, door]) == {
        worker: "connected", other: "timed out", door: "timed out"}


def test_llamad_socket_takes_connections_its_service_may_not_make() -> None:
    # ELSEWHERE is in no allow list: were llamad.service's filter applied to the sockets
    # llamad.socket hands it, this answer could not come back.
    out = sh(f"curl -sS --max-time 60 --interface {ELSEWHERE} -o /dev/null "
             f"-w '%{{http_code}}' http://{WORKER}:8080/health")
    assert out == "200"
    assert ELSEWHERE not in show("llamad.service", "IPAddressAllow")
