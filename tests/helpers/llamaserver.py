"""The pinned llama-server with the bundled Gemma, started by hand (no systemd) for tests
that need the real HTTP side: what it sends, and when it hangs up."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from typing import Any

import rig

from helpers.ports import free_port


@contextlib.contextmanager
def running(*args: str) -> Iterator[str]:
    """A llama-server on loopback with `args`, ready; its backend address (`tcp:HOST:PORT`,
    as Backend takes it)."""
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [str(rig.LLAMA_SERVER), "-m", str(rig.GEMMA), "--host", "127.0.0.1", "--port",
             str(port), "-fit", "off", *args], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(port, proc)
            yield f"tcp:127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(30)


def wait_ready(port: int, proc: subprocess.Popen[Any]) -> None:
    """Until the llama-server `proc` on `port` answers /health; fails if it exits."""
    def ready() -> bool:
        assert proc.poll() is None, "llama-server exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False
    rig.wait_for("llama-server to be ready", ready, timeout=120, interval=0.2)
