"""Hostile files in the models directory, tried on a llamad in the box (docs/security.md,
"Hostile model files"): what a member of group `llamad` may leave there can neither stop
llamad's start, nor blow up its memory, nor open a model's sandbox, nor make llamad connect
anywhere, nor capture root's names, nor tell root-only bytes. tests/test_hostile_files.py
pins the same at the catalog."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import rig
from helpers import ggufgen
from helpers.daemon import Factory, Llamad, chat, models

MIB = 1024 * 1024


class Listener:
    """A TCP port on loopback that counts who connects (the box shares the host's network)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    found = Listener()
    yield found
    found.sock.close()


def aged(*paths: Path) -> None:
    """Older than the settle window, so the first scan reads them at once."""
    then = time.time() - 60
    for p in paths:
        os.utime(p, (then, then), follow_symlinks=False)


def hostile(d: Llamad, assets: rig.Assets, port: int) -> dict[str, str]:
    """Fill d's models directory: file or link name -> words of its one problem line."""
    m = d.models_dir
    said = ggufgen.write_bombs(m)  # 2^40 tensors in 4.8 MB, a sparse 2^62 string array ...
    ggufgen.write_model(m / "evil-00001-of-00002.gguf", split=(1, 2))
    os.mkfifo(m / "evil-00002-of-00002.gguf")  # once held the scan, and llamad's start
    os.symlink("/dev/zero", m / "zero.gguf")
    os.symlink(m / "gone.gguf", m / "dangling.gguf")
    os.symlink(m / "loop.gguf", m / "loop.gguf")
    os.symlink(m / "loop", m / "loop")  # once ended every scan with ELOOP
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(m / "socket.gguf"))
    # Links a user made to what only root may read (L3): a file, and a directory's names.
    secret = d.dir / "secret"
    secret.mkdir(mode=0o700)
    (secret / "shadow").write_bytes(b"root:$6$topsecret$hash\n")
    ggufgen.write_model(secret / "Hidden" / "private-name.gguf")
    for name, target in (("shadow.gguf", secret / "shadow"), ("Hidden", secret / "Hidden")):
        os.symlink(target, m / name)
        os.lchown(m / name, 65534, 65534)
    os.link(assets.model, m / "chat.gguf")  # a file named like root's alias of gemma-a (L2)
    os.link(assets.model, m / f"--rpc=127.0.0.1:{port}.gguf")  # a name as a flag (M1)
    aged(*m.rglob("*"), *secret.rglob("*"))
    return {**said, "evil-00002-of-00002.gguf": "is a FIFO, not a regular file",
            "zero.gguf": "is a character device", "dangling.gguf": "is a broken symbolic link",
            "loop.gguf": "is a symbolic link loop", "socket.gguf": "is a socket",
            "shadow.gguf": "is a link made by a user other than root",
            "Hidden": "is a link made by a user other than root",
            "chat.gguf": "is an alias of preset [gemma-a], which wins",
            f"--rpc=127.0.0.1:{port}.gguf": "starts with '-', which llama-server would take"}


async def test_hostile_files_cannot_stop_slow_or_fool_a_restarted_llamad(
        llamad_factory: Factory, assets: rig.Assets, listener: Listener,
        subtests: Any) -> None:
    # A preset value that reads like a flag: root's, but read by arity it stays a value.
    preset = f"[gemma-a]\nalias = chat\nreverse-prompt = --rpc=127.0.0.1:{listener.port}\n"
    d = llamad_factory(["gemma-a"], preset=preset)
    d.stop()
    said = hostile(d, assets, listener.port)
    d.cursor = d.journal_cursor()
    start = time.monotonic()
    d.start()
    listed = models(d.url)
    answered = time.monotonic() - start
    async with aiohttp.ClientSession() as s:
        chats = {name: await chat(s, d.url, name)
                 for name in ("gemma-a", "chat", f"--rpc=127.0.0.1:{listener.port}")}
    log = d.log()
    with subtests.test("a restarted llamad answers within 10 s, its peak memory bounded"):
        assert answered < 10, answered
        assert d.memory_of("VmHWM") < 150 * MIB, d.memory_of("VmHWM")
    with subtests.test("other models serve; root's alias wins"):
        assert sorted(listed) == ["gemma-a"], sorted(listed)
        assert listed["gemma-a"]["aliases"] == ["chat"]
        assert chats["gemma-a"][0] == 200 and chats["chat"][0] == 200, chats
    with subtests.test("one problem line per bad file"):
        for name, words in said.items():
            lines = [line for line in log.splitlines() if f"{d.models_dir}/{name} " in line
                     or f"{d.models_dir}/{name}:" in line]
            assert len(lines) == 1 and words in lines[0], (name, lines)
    with subtests.test("no root-only bytes or names told"):
        assert "topsecret" not in log and "private-name" not in log
    with subtests.test("names never flags: no sandbox opened, nothing connected"):
        assert chats[f"--rpc=127.0.0.1:{listener.port}"][0] == 404
        unit = listed["gemma-a"]["llamad"]["unit"]
        assert d.show(unit, "PrivateNetwork") == "yes"
        assert d.show(unit, "RestrictAddressFamilies") == "AF_UNIX"
        assert d.show(unit, "IPAddressAllow") == ""
        assert listener.connections == 0


def status_of(url: str) -> tuple[int, dict[str, Any], str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read()), ""
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers.get("Retry-After", "")


def test_a_slow_first_scan_does_not_hold_ready(llamad_factory: Factory) -> None:
    """Files that take a scan long (each within its budget) no longer keep llamad from
    starting: READY comes at once, requests wait for the scan up to queue-timeout, then 503."""
    d = llamad_factory(["gemma-a"], **{"queue-timeout": 1})
    d.stop()
    for n in range(12):  # ~0.8 s of CPU each: most strings a header may hold
        with open(d.models_dir / f"slow-{n:02d}.gguf", "wb") as f:
            ggufgen.write_strings(f, 7_000_000)
    aged(*d.models_dir.iterdir())
    d.cursor = d.journal_cursor()
    start = time.monotonic()
    d.start()
    ready = time.monotonic() - start
    early = status_of(d.url + "/v1/models")
    rig.wait_for("the first scan", lambda: status_of(d.url + "/v1/models")[0] == 200,
                 timeout=180)
    assert ready < 6, ready
    assert early[0] == 503 and early[1]["error"]["code"] == "catalog_scanning", early
    assert early[2] == "2"
    assert "gemma-a" in models(d.url)
    assert "adopting their units failed" not in d.log()
