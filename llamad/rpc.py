"""llama.cpp's RPC workers of a model: who they are, and whether they answer.

A preset's `rpc = HOST:PORT,HOST:PORT` (llama-server's own `--rpc`) spreads the model's
weights, KV cache and compute over `ggml-rpc-server` processes on other hosts. llamad reads
the workers back out of the model's argv to let its unit reach exactly those addresses
(units.py), to count only the local share of its memory (memory.estimate_rpc) and to check
that the workers answer before a load (rpcguard.py). Pure, apart from `probe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llamad import memory

FLAG = "--rpc"
PROBE_TIMEOUT = 2.0  # seconds for a worker to accept a TCP connection


@dataclass(frozen=True, order=True)
class Worker:
    host: str  # an IP address, as ipaddress spells it
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse(value: str) -> tuple[Worker, ...]:
    """`10.0.0.7:50052,[fd00::7]:50052` -> workers; ValueError with a sentence if malformed.

    Hosts must be IP addresses: the model's unit may reach only its workers (its
    IPAddressAllow= firewall is by address), and name lookups are not allowed it either."""
    found = []
    for item in (v.strip() for v in value.split(",")):
        host, sep, port = item.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not item or not sep or not host:
            raise ValueError(f"{item!r} is not HOST:PORT")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{item!r}: the host must be an IP address (the model's unit may "
                             "reach only its workers' addresses, and cannot look up names)"
                             ) from None
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item!r}: the port must be a number from 1 to 65535")
        found.append(Worker(address.compressed, int(port)))
    return tuple(dict.fromkeys(found))


ALLOWED = "comma-separated HOST:PORT of ggml-rpc-server workers, hosts as IP addresses"


def workers(args: Sequence[str]) -> tuple[Worker, ...]:
    """The workers a llama-server argv names (every `--rpc`, as llama.cpp adds each);
    presets.py has checked the values, so a malformed one here is skipped."""
    found: list[Worker] = []
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag != FLAG:
            continue
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        try:
            found += parse(value)
        except ValueError:
            continue
    return tuple(dict.fromkeys(found))


def describe(info: memory.ModelInfo | None, args: Sequence[str]) -> dict[str, Any] | None:
    """GET /models' `rpc` object of a model with workers (None without): the workers, and
    its memory split as estimated; `need` and the scheduler count only the local share."""
    found = workers(args)
    if not found:
        return None
    est = memory.estimate_rpc(info, args) if info is not None else None
    return {"workers": [str(w) for w in found],
            "local": est.total.ram if est is not None else None,
            "remote": est.total.vram if est is not None else None}


def addresses(found: Iterable[Worker]) -> tuple[str, ...]:
    """The workers' IP addresses, each once, for the unit's IPAddressAllow=."""
    return tuple(dict.fromkeys(w.host for w in found))


def shared(a: Iterable[Worker], b: Iterable[Worker]) -> Worker | None:
    """A worker both lists name: one ggml-rpc-server serves one llama-server at a time."""
    common = sorted(set(a) & set(b))
    return common[0] if common else None


async def probe(found: Iterable[Worker], timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when every worker accepts a TCP connection within `timeout`, else a sentence
    naming the first that does not, and why.

    Only the kernel's handshake is awaited: ggml-rpc-server accepts one client at a time
    (listen backlog 1), so a worker serving a model would leave a real hello unanswered."""
    found = tuple(found)
    results = await asyncio.gather(*(_connect(w, timeout) for w in found))
    for worker, problem in zip(found, results, strict=True):
        if problem:
            return f"rpc worker {worker} does not answer ({problem})"
    return None


async def _connect(worker: Worker, timeout: float) -> str | None:
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(worker.host, worker.port), timeout)
    except TimeoutError:
        return f"no connection within {timeout:g} s"
    except OSError as e:  # asyncio words it "Connect call failed"; say what the kernel said
        return os.strerror(e.errno) if e.errno else str(e)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None
