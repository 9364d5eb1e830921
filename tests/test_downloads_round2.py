"""Downloads as their clients see them, checked against the peers: Ollama's /api/pull (its
CLI and ollama-python key a bar by digest) and the downloader's messages to systemd. The
unit and the hub are faked at their boundaries: a Download is fed the StatusText lines
llamad's poll reads (supervisor/downloads.py), the downloader (catalog/fetch.py) sends to
a notify socket of the test's own."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import ollama as ollama_client
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers.fakehub import FakeHub, blob

from llamad.api import downloads
from llamad.catalog import hfcache, hub
from llamad.catalog.catalog import Snapshot
from llamad.config import Config
from llamad.http import limits, middleware
from llamad.supervisor import downloads as supervisor_downloads
from llamad.supervisor.downloads import Download
from llamad.systemd.units import UNIT_IFACE

COMMIT = "c" * 40
MODEL, MMPROJ = "m-Q4_K_M.gguf", "mmproj-F16.gguf"
NOTIFY_MAX = 4096  # systemd's NOTIFY_BUFFER_MAX (PIPE_BUF): a longer message is ignored


def polled() -> list[dict[str, Any]]:
    """What llamad's poll (every 0.25 s) read of a download of a model and its projector:
    the model's last look was part-way through it (the rest, its hash check and the whole
    small projector came between two looks), then the end."""
    plan = {"phase": "downloading", "model": "u/v:Q4_K_M", "commit": COMMIT,
            "preset": False, "total": 3200, "files": [MODEL, MMPROJ]}
    model = {**plan, "file": MODEL, "oid": "a" * 64, "file_total": 3000,
             "url": "http://hub/u/v/resolve/m", "file_done": 2000, "done": 2000}
    done = {**model, "phase": "done", "file": MMPROJ, "oid": "b" * 64, "file_total": 200,
            "url": "http://hub/u/v/resolve/p", "file_done": 200, "done": 3200}
    return [plan, model, done]


class Replayed:
    """Downloads.start where the unit has run: the Download its poll left."""

    async def start(self, name: hub.Name) -> Download:
        d = Download(name, "llamad-download@x.service")
        for status in polled():
            d.take(status)
        d.state = "finished"
        return d


@pytest.fixture
async def ollama() -> AsyncIterator[ollama_client.AsyncClient]:
    lim = limits.Limits(Config.default())
    app = web.Application(middlewares=[lim.middleware, middleware.error_middleware])
    app[limits.LIMITS] = lim
    app.on_cleanup.append(lim.close)
    downloads.add_routes(app)
    app[downloads.DOWNLOADS] = Replayed()
    async with TestClient(TestServer(app)) as client, \
            ollama_client.AsyncClient(host=str(client.make_url(""))) as ask:
        yield ask


async def test_a_file_finished_between_two_looks_ends_complete(
        ollama: ollama_client.AsyncClient) -> None:
    """Ollama's CLI leaves each digest's bar where its last line put it: a model file seen
    last at 2000 of 3000 bytes stayed a bar at 66% under "success". The downloader goes on
    to the next file only once one is verified and in place, and "done" ends them all."""
    lines = [p.model_dump(exclude_none=True) async for p in
             await ollama.pull("hf.co/u/v:Q4_K_M", stream=True)]
    last = {line["digest"]: line for line in lines if "digest" in line}
    assert {d: (line["completed"], line["total"]) for d, line in last.items()} == {
        "sha256:" + "a" * 64: (3000, 3000), "sha256:" + "b" * 64: (200, 200)}
    assert lines[-1] == {"status": "success"}


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


def drained(sock: socket.socket, proc: subprocess.Popen[str],
            until: Callable[[bytes], bool] = lambda _: False) -> list[bytes]:
    """The messages `proc` sends until it ends (or one is `until`), read as they come: a
    full socket queue would block its sender, as systemd's never does."""
    out: list[bytes] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ended = proc.poll() is not None
        select.select([sock], [], [], 0.1)
        while True:
            try:
                out.append(sock.recv(1 << 20))
            except BlockingIOError:
                break
            if until(out[-1]):
                return out
        if ended:
            return out
    raise TimeoutError("the downloader did not end within 120 s")


def downloader(fake: FakeHub, cache: Path, name: str, notify: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "MODEL_ENDPOINT"}
    env["NOTIFY_SOCKET"] = str(notify)
    return subprocess.Popen([sys.executable, "-m", "llamad.catalog.fetch", "--cache",
                             str(cache), "--endpoint", fake.url, name], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_model_of_many_shards_still_tells_systemd_it_is_ready(
        tmp_path: Path, notify: socket.socket) -> None:
    """systemd ignores a notify message longer than PIPE_BUF (4096 bytes): a plan whose
    STATUS= listed 80 shards by name never reached it, READY=1 with it, and the unit's
    start timed out. Every message fits; the status still says the model and its size."""
    shards = {f"Q4_K_M/Some-Long-Model-Name-Instruct-Q4_K_M-{n:05d}-of-00080.gguf":
              blob(64, n) for n in range(1, 81)}
    cache = tmp_path / "hub"
    cache.mkdir()
    with FakeHub() as fake:
        fake.add("org/big", dict(shards))
        proc = downloader(fake, cache, "org/big:Q4_K_M", tmp_path / "notify")
        messages = drained(notify, proc)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert max(len(m) for m in messages) <= NOTIFY_MAX
    ready = [m.decode() for m in messages if b"READY=1" in m.splitlines()]
    assert len(ready) == 1
    plan = json.loads(ready[0].split("STATUS=", 1)[1])
    assert plan["model"] == "org/big:Q4_K_M" and plan["total"] == 80 * 64
    assert [m for m, _, _ in hfcache.discover(cache)] == ["org/big:Q4_K_M"]


class Restarting:
    """systemd's view of a download unit, one look (GetAll of the unit) after another, as
    systemd 252 showed it for a downloader that exited 75 (the network failed RETRIES times)
    after READY=1: auto-restart keeps its status text; the restarted process, unable to
    reach the hub, exits 75 before READY with a status of its own that has no plan; the
    next attempt plans, fetches and ends. StartLimitBurst= allows those restarts."""

    def __init__(self) -> None:
        plan = polled()[0]
        fetching = polled()[1]
        offline = {"phase": "failed", "error": "cannot reach the hub at http://hub/"}
        self.looks: list[tuple[str, str, dict[str, Any] | None]] = [
            ("gone", "", None), ("activating", "start", {}), ("active", "running", plan),
            ("active", "running", fetching), ("activating", "auto-restart", fetching),
            ("activating", "start", {}), ("activating", "auto-restart", offline),
            ("activating", "start", {}), ("active", "running", plan),
            ("active", "exited", polled()[2])]
        self.at = -1
        self.stopped: list[str] = []
        self.started: list[str] = []

    async def properties(self, unit: str, iface: bytes) -> dict[str, Any]:
        if iface == UNIT_IFACE:
            self.at = min(self.at + 1, len(self.looks) - 1)
            active, sub, _ = self.looks[self.at]
            if active == "gone":
                return {"LoadState": "not-found"}
            return {"LoadState": "loaded", "ActiveState": active, "SubState": sub, "Job": (0, "/")}
        status = self.looks[self.at][2]
        return {"StatusText": json.dumps(status) if status else ""}

    async def start_transient(self, unit: str, props: Any) -> None:
        self.started.append(unit)

    async def stop(self, unit: str) -> None:
        self.stopped.append(unit)

    async def reset_failed(self, unit: str) -> None:
        pass


async def test_a_download_lives_through_systemds_restarts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart that cannot reach the hub yet is one of the restarts systemd was told to
    make (Restart=on-failure, StartLimitBurst=5), not the end: llamad stopped the unit as
    failed at once, and the pull failed although the next attempt would have finished."""
    monkeypatch.setattr(supervisor_downloads, "POLL", 0.01)
    units = Restarting()
    config = dataclasses.replace(Config.default(), llama_cache=True, llama_cache_dir=tmp_path)

    async def rescan() -> None:
        pass

    async def journal(unit: str) -> str:
        return ""
    dl = supervisor_downloads.Downloads(config, units, rescan,  # type: ignore[arg-type]
                                        lambda: Snapshot(models={}), journal)
    d = await dl.start(hub.Name("u/v", "Q4_K_M"))
    while not d.ended:
        await d.wait(30)
    assert (d.state, d.error) == ("finished", "")
    assert units.at == len(units.looks) - 1 and units.started == [d.unit]
    assert units.stopped == [d.unit]  # once, when it had ended


def test_a_file_waited_for_is_told_by_its_own_id(tmp_path: Path, notify: socket.socket) -> None:
    """Waiting for a file another download is fetching (its part file locked), the status
    named it with the previous file's hash, size and address: /api/pull showed a second
    line of the model's digest for the projector, and kept it if the other placed it."""
    model, projector = blob(3000, 1), blob(2000, 2)
    cache = tmp_path / "hub"
    part = cache / "models--u--v" / "blobs" / (hashlib.sha256(projector).hexdigest()
                                               + hub.PARTIAL)
    part.parent.mkdir(parents=True)
    with FakeHub() as fake, open(part, "wb") as other:
        fake.add("u/v", {MODEL: model, MMPROJ: projector})
        fcntl.flock(other, fcntl.LOCK_EX)  # the other download's
        proc = downloader(fake, cache, "u/v:Q4_K_M", tmp_path / "notify")
        waiting = drained(notify, proc, lambda m: b'"phase":"waiting"' in m)[-1]
        fcntl.flock(other, fcntl.LOCK_UN)
        drained(notify, proc)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    status = json.loads(waiting.decode().split("STATUS=", 1)[1])
    assert (status["file"], status["oid"], status["file_total"]) == (
        MMPROJ, hashlib.sha256(projector).hexdigest(), 2000)
    assert status["url"].endswith("/" + MMPROJ) and status["file_done"] == 0
