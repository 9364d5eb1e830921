"""`llamad serve` running inside the box, as a transient unit or socket-activated, for the
integration tests (which get it from the `llamad_factory` fixture) and the benchmarks."""

from __future__ import annotations

import itertools
import json
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import rig

from helpers.ports import free_port
from llamad.systemd import downloadunit
from llamad.systemd.unitname import TTL_TIMER_PATTERN

PYTHON = Path(sys.prefix) / "bin" / "python"
_names = itertools.count(1)
Factory = Callable[..., "Llamad"]  # the llamad_factory fixture (integration/conftest.py)
# The shipped units/llamad.service's sandbox, as far as it bears on files: root without
# capabilities, other users' files seen as nobody's, the file system read-only but the
# state directory (Llamad.sandbox() adds that).
SANDBOX = ("CapabilityBoundingSet=", "SupplementaryGroups=llamad-backend",
           "NoNewPrivileges=yes", "PrivateUsers=yes",
           "ProtectSystem=strict", "ProtectHome=read-only", "PrivateTmp=yes", "UMask=0077")


def sandbox_needs(box: rig.Box, state: Path) -> list[str]:
    """What a llamad in the shipped unit's sandbox needs in the box beside the sandbox: the
    group it names, its state directory writable, its code where PrivateTmp= hides it."""
    # units/llamad.sysusers makes the group where the package is installed.
    box.run("getent group llamad-backend || groupadd -r llamad-backend")
    needs = [f"ReadWritePaths={state}"]
    # A clone under /tmp or /var/tmp: PrivateTmp= would hide llamad's python and code.
    hidden = downloadunit.hidden_code([("PrivateTmp", b"b", True)])
    if hidden:
        needs.append("BindReadOnlyPaths=" + " ".join(hidden))
    return needs


class Llamad:
    """One llamad in the box, a real Type=notify service: `start()` runs it with systemd-run,
    `listen()` has systemd listen on its port and start it at the first connection."""

    def __init__(self, box: rig.Box, assets: rig.Assets, models: list[str],
                 preset: str = "", host: str = "127.0.0.1", **settings: Any) -> None:
        self.box = box
        self.n = next(_names)
        self.host = host  # a loopback address of its own plays another machine
        self.port = free_port(host)
        self.unit = f"llamad-test-{self.n}.service"
        self.dir = box.workdir / f"llamad-{self.n}"
        self.dir.mkdir(mode=0o755)
        self.models_dir = assets.models_dir(f"models-{self.n}", models)
        conf = {"models-dir": str(self.models_dir), "llama-server": str(assets.llama_server),
                # One thread: two that meet at a barrier every step stall whenever the
                # machine preempts one (0.7 tokens/s at load 15 on 2 cores, 10 with -t 1).
                "args": "-c 4096 -np 4 -t 1", "llama-cache": "no",
                "tcp-port-base": random.randrange(20000, 30000, 100),
                # Each llamad learns and caches on its own.
                "state-dir": str(self.dir / "state"),
                "restart-sec": 0.5, **settings}
        if preset:
            (self.dir / "presets.ini").write_text(preset)
            conf["models-preset"] = str(self.dir / "presets.ini")
        self.config = self.dir / "llamad.conf"
        self.config.write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
        self.url = f"http://{host}:{self.port}"
        self.cursor = ""
        self.command = [str(PYTHON), "-m", "llamad"]  # bench/bodies.py runs other code
        self.properties: list[str] = []  # more unit properties, e.g. LimitNOFILE=100
        self.socket = ""  # the socket unit, once listen() made one
        # Log messages the test expects a traceback after (Python's own, not llamad's).
        self.tracebacks_after: tuple[str, ...] = ()

    def journal_cursor(self) -> str:
        shown = self.box.run(["journalctl", "-n", "0", "--show-cursor"]).stdout
        return shown.split("cursor: ")[-1].strip()

    def sandbox(self) -> None:
        """Run in the shipped unit's sandbox (SANDBOX), the state directory writable."""
        state = self.dir / "state"
        state.mkdir(mode=0o755, exist_ok=True)
        self.properties += [*SANDBOX, *sandbox_needs(self.box, state)]

    def _service(self) -> list[str]:
        """The properties of llamad's unit, as units/llamad.service has them (but its
        sandbox), then the test's own."""
        return ["Type=notify", "NotifyAccess=main", "WatchdogSec=10",
                f"ExecReload={PYTHON} -m llamad check-config --config {self.config}",
                "ExecReload=/bin/kill -HUP $MAINPID", "Environment=PYTHONUNBUFFERED=1",
                *self.properties]

    def _count_from_here(self) -> None:
        if not self.cursor:
            # Unit names repeat across tests in the one box: count from here on.
            self.cursor = self.journal_cursor()

    def start(self) -> None:
        self._count_from_here()
        out = self.box.run(["systemd-run", f"--unit={self.unit}",
                            *(f"--property={p}" for p in self._service()), *self.command,
                            "serve", "--config", str(self.config),
                            "--listen", f"{self.host}:{self.port}"], timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"llamad did not start: {out.stderr}\n{self.log()[-3000:]}")

    def listen(self) -> None:
        """As llamad.socket and llamad.service: systemd listens on the port and starts
        llamad at the first connection (and again after it exits)."""
        self._count_from_here()
        self.socket = self.unit.removesuffix(".service") + ".socket"
        self.box.run(["tee", f"/etc/systemd/system/{self.socket}"],
                     input=f"[Socket]\nListenStream={self.host}:{self.port}\n")
        self.box.run(["tee", f"/etc/systemd/system/{self.unit}"], input="[Service]\n" + "".join(
            f"{p}\n" for p in self._service()) + f"ExecStart={' '.join(self.command)} serve "
            f"--config {self.config}\n")
        self.box.run(["systemctl", "daemon-reload"])
        self.box.run(["systemctl", "start", self.socket])

    def stop(self) -> None:
        """Stop llamad (and its socket: no connection starts it again)."""
        try:
            self.box.run(["systemctl", "stop", *filter(None, [self.socket]), self.unit],
                         check=False)
        except subprocess.TimeoutExpired:
            said = self.log()
            at = said.rfind("stopping takes long")  # what it waits for (app.stop_is_slow)
            raise TimeoutError(f"{self.unit} did not stop within 60 s: "
                               f"{said[at:at + 6000] if at >= 0 else said[-6000:]}") from None
        self.box.run(["systemctl", "reset-failed", self.unit], check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def show(self, unit: str, prop: str) -> str:
        return self.box.run(["systemctl", "show", "-P", prop, unit]).stdout.strip()

    def memory_of(self, field: str, unit: str | None = None) -> int:
        """A memory figure of /proc/PID/status (VmRSS, VmHWM) of the unit's main process,
        in bytes: llamad's own unless a unit is named."""
        pid = self.show(unit or self.unit, "MainPID")
        status = self.box.run(["cat", f"/proc/{pid}/status"]).stdout
        line = next(line for line in status.splitlines() if line.startswith(f"{field}:"))
        return int(line.split()[1]) * 1024

    def model_units(self) -> dict[str, str]:
        """Model units that are not stopped (a stopped one lingers briefly before GC)."""
        out = self.box.run(["systemctl", "list-units", "--all", "--no-legend", "--plain",
                            "llama-server@*"]).stdout
        rows = [line.split() for line in out.splitlines() if line.strip()]
        # A description with a newline in it (tests of hostile names) adds short rows.
        return {row[0]: row[2] for row in rows
                if len(row) > 2 and row[0].startswith("llama-server@") and row[2] != "inactive"}

    def starts(self, model: str) -> int:
        """How often systemd started this model's unit during this llamad's life."""
        log = self.box.journal("-u", f"llama-server@{model}.service",
                               f"--after-cursor={self.cursor}")
        return log.count(f"Started llama-server@{model}.service")

    def log(self) -> str:
        return self.box.journal("-u", self.unit, f"--after-cursor={self.cursor}")

    def unexpected_tracebacks(self) -> str:
        """llamad's log less each traceback that follows a message in `tracebacks_after`;
        "Traceback" in it is a bug (an illegal state change raises one, for instance)."""
        log = self.log()
        for message in self.tracebacks_after:
            log = re.sub(re.escape(message) + r".*\nTraceback \(most recent call last\):\n"
                         r"(?:\s.*\n)*.*\n?", "", log)
        return tracebacks(log)

    def cleanup(self) -> None:
        self.stop()
        if self.socket:
            self.box.run(["rm", "-f", f"/etc/systemd/system/{self.socket}",
                          f"/etc/systemd/system/{self.unit}"])
            self.box.run(["systemctl", "daemon-reload"])
        # A model's TTL left to systemd (idle-ttl) would stop a later test's model.
        self.box.run(["systemctl", "stop", TTL_TIMER_PATTERN], check=False)
        for unit in self.model_units():
            self.box.run(["systemctl", "stop", unit], check=False)
        rig.wait_for("model units to stop", lambda: not self.model_units(), timeout=60)


def tracebacks(log: str, before: int = 4, after: int = 40) -> str:
    """Each traceback in `log` with the lines before it, or '': what a failure should
    show, where the log's tail may have moved far past it."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if "Traceback" in line]
    return "\n...\n".join("\n".join(lines[max(0, i - before):i + after]) for i in starts)


async def chat(session: aiohttp.ClientSession, url: str, model: str, text: str = "Hi",
               max_tokens: int = 8, headers: dict[str, str] | None = None,
               **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, **extra}
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        return r.status, json.loads(await r.read())


async def stream(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int = 64,
                 on_event: Callable[[int], object] | None = None) -> list[dict[str, Any]]:
    """Every SSE data event of a streamed chat completion, [DONE] as {'done': True};
    `on_event(n)` is called after the n-th event arrives."""
    body = {"model": model, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": max_tokens, "stream": True,
            # llama-server's own option: generate exactly max_tokens, for predictable timing.
            "ignore_eos": True}
    events: list[dict[str, Any]] = []
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        assert r.headers.get("X-Accel-Buffering") == "no"
        async for line in r.content:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                events.append({"done": True} if data == b"[DONE]" else json.loads(data))
                if on_event is not None:
                    on_event(len(events))
    return events


def request_log(d: Llamad, *match: str) -> list[dict[str, Any]]:
    """The request log's journal entries (their fields) of llamad's current run, those
    matching journalctl's `match`es, e.g. MODEL=gemma-a."""
    # This run of the unit (journalctl's --after-cursor skips one entry too many when
    # the cursor's own entry does not match).
    run = "_SYSTEMD_INVOCATION_ID=" + d.show(d.unit, "InvocationID")
    out = d.box.run(["journalctl", "-u", d.unit, "-o", "json", run, *match],
                    check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wait_http(url: str, timeout: float = 30, want: int | None = 200) -> None:
    """Wait until /health answers `want` (None: anything at all)."""
    import urllib.error
    import urllib.request

    def up() -> bool:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        except OSError:
            return False
        return want is None or status == want
    rig.wait_for(f"{url} to answer" + (f" {want}" if want else ""), up, timeout=timeout)


def models(url: str) -> dict[str, dict[str, Any]]:
    import urllib.request
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return {m["id"]: m for m in json.loads(r.read())["data"]}


def state(url: str, model: str) -> str:
    return str(models(url)[model]["llamad"]["state"])


def wait_state(url: str, model: str, want: str, timeout: float = 60) -> None:
    rig.wait_for(f"{model} to be {want}", lambda: state(url, model) == want, timeout=timeout)


