"""`llamad serve` running inside the box as a transient unit, for the integration tests."""

from __future__ import annotations

import itertools
import json
import random
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import rig

PYTHON = Path(sys.prefix) / "bin" / "python"
_names = itertools.count(1)
Factory = Callable[..., "Llamad"]  # the llamad_factory fixture (conftest.py)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody on this machine listens on (the box shares the host's network)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class Llamad:
    """One llamad; started with systemd-run in the box, so it is a real Type=notify service."""

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

    def journal_cursor(self) -> str:
        shown = self.box.run(["journalctl", "-n", "0", "--show-cursor"]).stdout
        return shown.split("cursor: ")[-1].strip()

    def start(self) -> None:
        if not self.cursor:
            # Unit names repeat across tests in the one box: count from here on.
            self.cursor = self.journal_cursor()
        out = self.box.run(["systemd-run", f"--unit={self.unit}", "-p", "Type=notify",
                      "-p", "NotifyAccess=main", "-p", "WatchdogSec=10",
                      # As units/llamad.service does it.
                      "-p", f"ExecReload={PYTHON} -m llamad check-config --config {self.config}",
                      "-p", "ExecReload=/bin/kill -HUP $MAINPID",
                      *(f"--property={p}" for p in self.properties),
                      "--setenv=PYTHONUNBUFFERED=1", *self.command,
                      "serve", "--config", str(self.config),
                      "--listen", f"{self.host}:{self.port}"], timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"llamad did not start: {out.stderr}\n{self.log()[-3000:]}")

    def stop(self) -> None:
        self.box.run(["systemctl", "stop", self.unit], check=False)
        self.box.run(["systemctl", "reset-failed", self.unit], check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def show(self, unit: str, prop: str) -> str:
        return self.box.run(["systemctl", "show", "-P", prop, unit]).stdout.strip()

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

    def cleanup(self) -> None:
        self.stop()
        for unit in self.model_units():
            self.box.run(["systemctl", "stop", unit], check=False)
        rig.wait_for("model units to stop", lambda: not self.model_units(), timeout=60)


async def chat(session: aiohttp.ClientSession, url: str, model: str, text: str = "Hi",
               max_tokens: int = 8, headers: dict[str, str] | None = None,
               **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, **extra}
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        return r.status, json.loads(await r.read())


async def stream(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int = 64,
                 on_event: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
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


