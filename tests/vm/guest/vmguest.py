"""What the guest's tests share: llamad's configuration for the run, and calls to it and to
systemd. (conftest.py sets the guest up with it.)

The guest's side of the VM tier: llamad from its .deb on Debian 13's kernel and systemd.

Runs as root inside the VM (tests/vm/run.py boots it; guest/run starts pytest here), with
nothing but the standard library and pytest. llamad is the packaged one: llamad.socket
enabled by the package, llamad.service started by the first request, configured here once
for the whole session. The models are presets over the one Gemma 3 270M file.

The VM has no network card. The "other hosts" an RPC worker and a peer live on are
addresses of a dummy link inside the guest (192.0.2.0/24, TEST-NET-1): not loopback, so
IP address filters treat them as they would another machine.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

URL = "http://127.0.0.1:8080"
MODEL_FILE = "/srv/vm/models/gemma.gguf"
WORKER = "192.0.2.1"  # the rpc worker's address
PEER = "192.0.2.2"  # a peer llamad's address
ELSEWHERE = "192.0.2.3"  # an address nobody should reach
RPC_PORT = 50052
PEER_PORT = 8081
CONF = Path("/etc/llamad/llamad.conf")
# TCG emulates every instruction: a load takes 20-60 s, a short answer 10-30 s.
LOAD_TIMEOUT = 400

LLAMAD_CONF = f"""\
models-dir = /srv/vm/models
llama-server = /usr/local/bin/llama-server
models-preset = /etc/llamad/presets.ini
args = -t 2
memory-limit = estimate
memory-reserve-mb = 256
load-timeout = {LOAD_TIMEOUT}
liveness-timeout = 300
peers = http://{PEER}:{PEER_PORT}
allowed-hosts = {WORKER}
"""

# TCG runs Gemma 3 270M at about 0.5-2 s a token: prompts stay short, and no model runs
# llama-server's warmup (a decode at load) that no test needs.
PRESETS = f"""\
[*]
ctx-size = 1024
parallel = 1
warmup = false

; test_memory: memory-limit = estimate with every slot busy. A "long" prompt is one that
; fills an ubatch (64 tokens here rather than 512) over most of its slot's context, where
; the compute buffers are used as far as they go.
[busy]
model = {MODEL_FILE}
ctx-size = 512
parallel = 2
batch-size = 64
ubatch-size = 64

; test_oom: a model the kernel must kill (busy, beside it, must go on).
[tight]
model = {MODEL_FILE}
memory-max = 32M

; test_network: spread over an rpc worker on another address.
[remote]
model = {MODEL_FILE}
rpc = {WORKER}:{RPC_PORT}

; test_slice: about 300 MiB of anonymous memory each, in a KV cache that llama-server
; clears (so touches) at load: two of them over slice-memory-max can only end in an OOM
; kill, whatever the page cache gives back.
[heavy-a]
model = {MODEL_FILE}
ctx-size = 16384
swa-full = true

[heavy-b]
model = {MODEL_FILE}
ctx-size = 16384
swa-full = true
"""


def wait_for(what: str, probe: Callable[[], T | Literal[False] | None], timeout: float = 60,
             interval: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def sh(cmd: str, check: bool = True, timeout: float = 120) -> str:
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout,
                         check=False)
    if check and out.returncode:
        raise AssertionError(f"{cmd!r} failed ({out.returncode}): {out.stdout}{out.stderr}")
    return out.stdout


def http(method: str, path: str, body: Any = None, timeout: float = LOAD_TIMEOUT,
         base: str = URL) -> tuple[int, Any]:
    """(status, parsed JSON or text) of one request to llamad."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def complete(model: str, prompt: str = "Hi", max_tokens: int = 1,
             timeout: float = LOAD_TIMEOUT) -> tuple[int, Any]:
    """A completion without a chat template: the prompt's own tokens only."""
    return http("POST", "/v1/completions", {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=timeout)


def load(name: str) -> dict[str, Any]:
    """An explicit load, until the model is ready."""
    status, body = http("POST", "/models/load", {"model": name})
    assert status == 200, body
    found = wait_state(name, "ready", "failed")
    assert found["state"] == "ready", f"{name} failed: {found['reason']}"
    return found


def model(name: str) -> dict[str, Any]:
    """llamad's own object of GET /v1/models/{name}."""
    status, body = http("GET", f"/v1/models/{name}", timeout=60)
    assert status == 200, body
    return body["llamad"]  # type: ignore[no-any-return]


def wait_state(name: str, *states: str, timeout: float = LOAD_TIMEOUT) -> dict[str, Any]:
    return wait_for(f"{name} to be {'/'.join(states)}",
                    lambda: (d := model(name))["state"] in states and d, timeout)


def show(unit: str, prop: str) -> str:
    return sh(f"systemctl show -P {prop} {unit}").strip()


def cgroup(unit: str) -> Path:
    path = show(unit, "ControlGroup")
    assert path, f"{unit} has no cgroup"
    return Path("/sys/fs/cgroup" + path)


def events(unit_cgroup: Path, name: str = "memory.events") -> dict[str, int]:
    return {k: int(v) for k, v in
            (line.split() for line in (unit_cgroup / name).read_text().splitlines())}


def unload_all() -> None:
    """No model loaded, no page cache left: the next model's cgroup is charged for the
    file pages it touches (they would stay charged to whoever read them first)."""
    _, body = http("GET", "/v1/models?peers=no", timeout=60)
    for entry in body["data"]:
        if entry.get("llamad") and entry["llamad"]["state"] not in ("unloaded", "failed"):
            http("POST", "/models/unload", {"model": entry["id"]}, timeout=120)
    wait_for("every model unit to stop",
             lambda: not sh("systemctl list-units --no-legend 'llama-server@*'").strip(), 120)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def restart_llamad(conf: str) -> None:
    CONF.write_text(conf)
    sh("systemctl restart llamad.service", timeout=300)
    wait_for("llamad to answer", lambda: health() == 200, 300)


def health() -> int:
    try:
        return http("GET", "/health", timeout=10)[0]
    except OSError:
        return 0
