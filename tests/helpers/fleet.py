"""Several llamad hosts behind HAProxy, for tests and benchmarks (issue #15, part 2).

Each llamad runs in a box of its own, on a loopback address of its own (one box per host:
two llamads in one box would share its model units). HAProxy runs on this machine with
the configuration `llamad haproxy-config` prints. `Traffic` keeps requests going through
HAProxy and records each one, to count what fails while a host goes away.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import rig

from helpers.daemon import Llamad, wait_http
from helpers.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def join(hosts: list[Llamad], grace: float) -> None:
    """Make each llamad a peer of the others, draining `grace` seconds on SIGTERM; start them."""
    for d in hosts:
        peers = ", ".join(o.url for o in hosts if o is not d)
        with d.config.open("a") as f:
            f.write(f"peers = {peers}\nshutdown-grace = {grace:g}\n")
    for d in hosts:
        d.start()
    for d in hosts:
        wait_http(d.url)


class Haproxy:
    """haproxy -db (foreground) on 127.0.0.1 with `llamad haproxy-config`'s output."""

    def __init__(self, workdir: Path, hosts: list[Llamad], place: dict[str, Llamad]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "llamad", "haproxy-config",
                *(f"{d.host}:{d.port}" for d in hosts), "--listen", f"127.0.0.1:{self.port}",
                *(f"--place={m}={d.host}:{d.port}" for m, d in place.items())]
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(subprocess.run(argv, check=True, capture_output=True,
                                              text=True, cwd=ROOT).stdout)
        self.log = workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Haproxy:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT)
        rig.wait_for("HAProxy to listen", self._listens, timeout=10)
        return self

    def _listens(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited: {self.log.read_text()}")
        try:
            with urlopen(self.url + "/health"):
                return True
        except OSError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def urlopen(url: str) -> Any:
    import urllib.request
    return urllib.request.urlopen(url, timeout=5)


@dataclass
class Sent:
    at: float  # when it was sent (time.monotonic())
    took: float
    status: int  # 0: no HTTP answer at all
    host: str  # X-Llamad-Host: the llamad that answered


async def ask(session: aiohttp.ClientSession, url: str, model: str) -> Sent:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    began = time.monotonic()
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            await r.read()
            return Sent(began, time.monotonic() - began, r.status,
                        r.headers.get("X-Llamad-Host", ""))
    except aiohttp.ClientError:
        return Sent(began, time.monotonic() - began, 0, "")


@dataclass
class Traffic:
    """`clients` loops sending small chat requests for `model` until stopped, on a thread."""

    url: str
    model: str
    clients: int = 2
    sent: list[Sent] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Traffic:
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=120)

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._client(session) for _ in range(self.clients)))

    async def _client(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            self.sent.append(await ask(session, self.url, self.model))

    def served_by(self, host: str, since: float) -> int:
        return sum(1 for s in list(self.sent) if s.at >= since and s.status == 200
                   and s.host == host)

    def failed(self) -> list[Sent]:
        return [s for s in self.sent if s.status != 200]
