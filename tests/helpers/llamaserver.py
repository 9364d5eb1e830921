"""The pinned llama-server, started by hand (no systemd) on loopback, for tests that need
the real thing: what it sends, when it hangs up, what it allocates and logs."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import rig

from helpers.ports import free_port


class Server:
    """A llama-server being run by `started()`; its whole log once it has stopped."""

    def __init__(self, port: int, proc: subprocess.Popen[Any], out: IO[str]) -> None:
        self.port, self.proc, self._out = port, proc, out
        self.log = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        wait_ready(self.port, self.proc)

    def logged(self) -> str:
        """The log so far."""
        self._out.seek(0)
        return self._out.read()

    def peak_rss(self) -> int:
        """Its peak resident memory so far (VmHWM), in bytes."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
        assert hwm, status
        return int(hwm.group(1)) * 1024


@contextlib.contextmanager
def started(*args: str, model: Path = rig.GEMMA) -> Iterator[Server]:
    """llama-server with `model` and `args` (fitting off: the tests give the memory
    arguments themselves), stopped on leaving; not waited for."""
    port = free_port()
    with tempfile.TemporaryFile("w+") as out:
        server = Server(port, subprocess.Popen(
            [str(rig.LLAMA_SERVER), "-m", str(model), "--host", "127.0.0.1", "--port",
             str(port), "-fit", "off", *args], stdout=out, stderr=subprocess.STDOUT), out)
        try:
            yield server
        finally:
            server.proc.terminate()
            server.proc.wait(30)
            server.log = server.logged()


@contextlib.contextmanager
def running(*args: str) -> Iterator[str]:
    """A llama-server on loopback with `args`, ready; its backend address (`tcp:HOST:PORT`,
    as Backend takes it)."""
    with started(*args) as server:
        server.wait_ready()
        yield f"tcp:127.0.0.1:{server.port}"


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


MIB = 1024**2


@dataclass(frozen=True)
class Measured:
    """What llama-server allocated, as its log (-lv 4) and /proc tell, in bytes."""

    kv: int  # llama.cpp's own KV cache size, summed over its caches, recurrent state too
    compute: int  # its compute buffer
    output: int  # its output (logits) buffer
    peak_rss: int  # VmHWM once ready
    projector: int  # its projector's compute buffer (--mmproj), else 0
    model: int = 0  # its model buffers on the CPU (the weights, read or mapped)


def measured(args: list[str], model: Path = rig.GEMMA) -> Measured:
    """Start llama-server with `args`, wait until it is ready, stop it: what it allocated."""
    with started("-t", "2", "-lv", "4", *args, model=model) as server:
        server.wait_ready()
        peak = server.peak_rss()
    log = server.log
    kv = re.findall(r"llama_kv_cache: size = +([\d.]+) MiB", log)
    kv += re.findall(r"llama_memory_recurrent: size = +([\d.]+) MiB", log)
    compute = re.findall(r"sched_reserve: +CPU compute buffer size = +([\d.]+) MiB", log)
    projector = re.findall(r"reserve_compute_meta: +CPU compute buffer size = +([\d.]+) MiB",
                           log)
    output = re.findall(r"CPU +output buffer size = +([\d.]+) MiB", log)
    weights = re.findall(r"load_tensors: +CPU(?:_Mapped)? model buffer size = +([\d.]+) MiB",
                         log)
    assert kv and compute and output, log[-2000:]
    return Measured(int(sum(float(x) for x in kv) * MIB), int(float(compute[-1]) * MIB),
                    int(float(output[-1]) * MIB), peak,
                    int(float(projector[-1]) * MIB) if projector else 0,
                    int(sum(float(x) for x in weights) * MIB))


def complete_tokens(url: str, prompt: list[int], **extra: Any) -> dict[str, Any]:
    """llama-server's /completion of a prompt of token ids, one token asked for, its cache
    used: the answer (its `timings` say what was taken from the cache)."""
    body = json.dumps({"prompt": prompt, "n_predict": 1, "cache_prompt": True, **extra})
    req = urllib.request.Request(url + "/completion", body.encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        out: dict[str, Any] = json.loads(r.read())
        return out
