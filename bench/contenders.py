"""The contenders, all in one throwaway systemd box with the real llama-server and Gemma.

- llamad: `llamad serve` as a Type=notify unit (the integration tests' fixture),
  models-max 1, the default UNIX-socket backend;
- direct: one llama-server started by hand as a transient unit, spoken to directly;
- router: llama.cpp's router mode, `llama-server --models-dir DIR --models-max 1`;
- bare: a llama-server process started from nothing (cold start only).

Every llama-server gets the same ARGS, so they differ only in what stands in front.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rig
from helpers.daemon import PYTHON, Llamad, sandbox_needs
from helpers.ports import free_port

from bench import ROOT

# 32 slots so the parallel section runs 32 streams at once; 512 tokens of context each.
# One thread: on this shared 2-core machine, two threads that wait for each other at every
# step stall whenever the client, llamad or another job takes one core (streams fell from
# 85 to 8-20 tokens/s); one thread just gets a fair share. llamad's own CPU per streamed
# token is reported separately, for machines where the model has every core.
# --swa-full: llamad's defaults give it to Gemma (its sliding window; kv-cache = auto, as
# the larger cache fits), so every contender gets it and all run the model alike.
ARGS = ("-c", "16384", "-np", "32", "-t", "1", "--swa-full")
MODELS = ("gemma-a", "gemma-b")
NICE = -5


def get_json(url: str, timeout: float = 30) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict[str, Any], timeout: float = 60) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@dataclass
class Setup:
    box: rig.Box
    assets: rig.Assets
    llamad: Llamad
    direct: str  # base URLs
    router: str

    @property
    def urls(self) -> dict[str, str]:
        return {"llamad": self.llamad.url, "direct": self.direct, "router": self.router}

    # -- model state, for the cold start and swap sections --------------------

    def router_state(self, model: str) -> str:
        data = get_json(self.router + "/models")["data"]
        return str(next(m for m in data if m["id"] == model)["status"]["value"])

    def llamad_state(self, model: str) -> str:
        data = get_json(self.llamad.url + "/v1/models")["data"]
        return str(next(m for m in data if m["id"] == model)["llamad"]["state"])

    def unload(self, who: str, model: str) -> None:
        """Unload and wait until the process is gone, so the next request starts cold."""
        if who == "llamad":
            if self.llamad_state(model) != "unloaded":
                post_json(self.llamad.url + "/models/unload", {"model": model})
            rig.wait_for(f"llamad to unload {model}",
                         lambda: self.llamad_state(model) == "unloaded", timeout=60)
        else:
            if self.router_state(model) != "unloaded":
                post_json(self.router + "/models/unload", {"model": model})
            rig.wait_for(f"the router to unload {model}",
                         lambda: self.router_state(model) == "unloaded", timeout=60)


def start_unit(box: rig.Box, unit: str, argv: list[str]) -> None:
    box.run(["systemd-run", f"--unit={unit}", "-p", "Type=exec", "--quiet", *argv])


def stop_unit(box: rig.Box, unit: str) -> None:
    box.run(["systemctl", "stop", unit], check=False)
    box.run(["systemctl", "reset-failed", unit], check=False)


@contextlib.contextmanager
def contenders() -> Iterator[Setup]:
    """Boot the box and start llamad, a direct llama-server and a router; tear all down."""
    reason = rig.missing_requirements()
    if reason:
        raise SystemExit(f"bench: {reason}")
    with rig.Box() as box:
        # This machine is shared with other jobs; nice -5 for the box (every unit and
        # llama-server in it inherits it from its PID 1) and for this client makes them
        # disturb the measurements less. All contenders get the same priority.
        os.setpriority(os.PRIO_PROCESS, box.pid, NICE)
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
        assets = rig.Assets(box.workdir)
        server = str(assets.llama_server)
        d = Llamad(box, assets, list(MODELS), args=" ".join(ARGS), **{"models-max": 1})
        d.port = free_port()
        d.url = f"http://127.0.0.1:{d.port}"
        direct_port, router_port = free_port(), free_port()
        router_dir = assets.models_dir("router-models", list(MODELS))
        try:
            d.start()
            start_unit(box, "bench-direct.service",
                       [server, "-m", str(assets.model), *ARGS, "--host", "127.0.0.1",
                        "--port", str(direct_port)])
            start_unit(box, "bench-router.service",
                       [server, "--models-dir", str(router_dir), "--models-max", "1", *ARGS,
                        "--host", "127.0.0.1", "--port", str(router_port)])
            setup = Setup(box, assets, d, f"http://127.0.0.1:{direct_port}",
                          f"http://127.0.0.1:{router_port}")
            for name, url in setup.urls.items():
                rig.wait_for(f"{name} to answer /health", lambda u=url: healthy(u), timeout=120)
            yield setup
        finally:
            stop_unit(box, "bench-router.service")
            stop_unit(box, "bench-direct.service")
            d.cleanup()


# -- bare start: a llama-server process started from nothing ------------------------

def bare_start_to_first_token(assets: rig.Assets, body: dict[str, Any]) -> float:
    """Seconds from spawning llama-server to the answer of a 1-token completion.

    The readiness poll is 5 ms, finer than any contender's, so this is the floor.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    proc = subprocess.Popen([str(assets.llama_server), "-m", str(assets.model), *ARGS,
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rig.wait_for("a bare llama-server to answer /health", lambda: healthy(url),
                     timeout=120, interval=0.005)
        post_json(url + "/v1/completions", body)
        return time.perf_counter() - start
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- footprint and scale: more llamads ------------------------------------------------

def extra_llamad(setup: Setup, models_dir: Path, **settings: Any) -> Llamad:
    """A second llamad over `models_dir` (nothing loaded), on a free port."""
    d = Llamad(setup.box, setup.assets, [], **{"models-dir": str(models_dir), **settings})
    d.port = free_port()
    d.url = f"http://127.0.0.1:{d.port}"
    return d


def listed(url: str, expect: int) -> None:
    """Fail unless llamad's GET /v1/models lists `expect` models (all were catalogued)."""
    count = len(get_json(url + "/v1/models", timeout=120)["data"])
    if count != expect:
        raise RuntimeError(f"{url} lists {count} models, not {expect}")


def main_pid_rss_mb(box: rig.Box, unit: str) -> float:
    pid = box.run(["systemctl", "show", "-P", "MainPID", unit]).stdout.strip()
    status = box.run(["cat", f"/proc/{pid}/status"]).stdout
    kib = next(int(line.split()[1]) for line in status.splitlines()
               if line.startswith("VmRSS:"))
    return kib / 1024


def catalog_tree(path: Path, count: int) -> Path:
    """`count` small real GGUF files (tests/helpers/ggufgen.py), one header each to read."""
    from helpers import ggufgen

    path.mkdir(parents=True, exist_ok=True)
    data = ggufgen.write_model(path.parent / f"{path.name}-template.gguf").read_bytes()
    # An hour old: llamad skips files modified within the last seconds (still being copied).
    old = time.time() - 3600
    for i in range(count):
        file = path / f"tiny-{i:05d}.gguf"
        file.write_bytes(data)
        os.utime(file, (old, old))
    os.chmod(path, 0o755)
    return path


SOCKET_UNIT = """[Unit]
Description=llamad benchmark socket
[Socket]
ListenStream=127.0.0.1:{port}
"""
SERVICE_UNIT = """[Unit]
Description=llamad benchmark, socket-activated
Requires={name}.socket
After={name}.socket
# Started and stopped once per round: no start limit.
StartLimitIntervalSec=0
[Service]
Type=notify
Environment=PYTHONUNBUFFERED=1
ExecStart={python} -m llamad serve --config {config}
{sandbox}"""
# The package's llamad.service but what runs and how it restarts: its sandbox.
NOT_SANDBOX = frozenset({"Type", "ExecStart", "ExecReload", "Environment", "Restart",
                         "RestartSec", "WatchdogSec"})


def shipped_sandbox(box: rig.Box, state: Path) -> str:
    """units/llamad.service's sandbox, as the package has it, for a llamad in `box` whose
    state directory is `state`."""
    service = (ROOT / "units" / "llamad.service").read_text().split("[Service]", 1)[1]
    lines = [line for line in service.splitlines() if line and not line.startswith("#")
             and line.partition("=")[0] not in NOT_SANDBOX]
    return "\n".join([*lines, *sandbox_needs(box, state)]) + "\n"


@contextlib.contextmanager
def socket_activated(setup: Setup, config: Path, name: str = "bench-llamad",
                     sandbox: str = "") -> Iterator[tuple[str, str]]:
    """A real NAME.socket + NAME.service in the box, the service with `sandbox`'s settings;
    yields (url, service name)."""
    port = free_port()
    units = Path("/etc/systemd/system")
    box = setup.box
    box.run(f"cat > {units}/{name}.socket", input=SOCKET_UNIT.format(port=port))
    box.run(f"cat > {units}/{name}.service", input=SERVICE_UNIT.format(
        name=name, python=PYTHON, config=config, sandbox=sandbox))
    box.run(f"systemctl daemon-reload && systemctl start {name}.socket")
    try:
        yield f"http://127.0.0.1:{port}", f"{name}.service"
    finally:
        box.run(f"systemctl stop {name}.socket {name}.service", check=False)
