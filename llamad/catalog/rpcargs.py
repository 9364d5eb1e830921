"""llama.cpp's RPC workers of a model: who they are, and whether they answer.

A preset's `rpc = HOST:PORT,HOST:PORT` (llama-server's own `--rpc`) spreads the model's
weights, KV cache and compute over `ggml-rpc-server` processes on other hosts. llamad reads
the workers back out of the model's argv to let its unit reach exactly those addresses
(unitspec.py), to count only the local share of its memory (memory/estimate.py) and to check
that the workers answer before a load (supervisor/guards/rpcguard.py). Pure.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from llamad.catalog import argv

FLAG = "--rpc"


@dataclass(frozen=True, order=True)
class Worker:
    """An rpc worker a model's --rpc names."""

    host: str  # an IP address, as ipaddress spells it
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse(value: str) -> tuple[Worker, ...]:
    """`10.0.0.7:50052,10.0.0.8:50052` -> workers; ValueError with a sentence if malformed.

    Hosts must be IP addresses: the model's unit may reach only its workers (its
    IPAddressAllow= firewall is by address), and name lookups are not allowed it either.
    llama-server gets the value as written and reads it as ggml-rpc does: split at commas,
    spaces kept, each endpoint split at its first colon and connected to over IPv4 alone
    (ggml-rpc's parse_endpoint and socket_t::connect); anything else aborts its load."""
    return tuple(dict.fromkeys(_worker(item) for item in value.split(",")))


def _worker(item: str) -> Worker:
    if item != item.strip():
        raise ValueError(f"{item!r}: no space around an address (llama-server keeps it, "
                         "and cannot resolve the host)")
    if item.count(":") > 1 or "[" in item:
        raise ValueError(f"{item!r}: the host must be an IPv4 address (llama.cpp's RPC "
                         "client connects over IPv4 only)")
    host, sep, port = item.partition(":")
    if not sep or not host:
        raise ValueError(f"{item!r} is not HOST:PORT")
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"{item!r}: the host must be an IP address (the model's unit may "
                         "reach only its workers' addresses, and cannot look up names)"
                         ) from None
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"{item!r}: the port must be a number from 1 to 65535")
    return Worker(address.compressed, int(port))


ALLOWED = "comma-separated HOST:PORT of ggml-rpc-server workers, hosts as IPv4 addresses"


def workers(args: Sequence[str]) -> tuple[Worker, ...]:
    """The workers a llama-server argv names (every `--rpc`, as llama.cpp adds each), read
    by flag arity (argv.walk): a file or model name in a value's place is never a flag.
    presets.py has checked the values, so a malformed one here is skipped."""
    found: list[Worker] = []
    for option in argv.walk(args):
        if option.name != FLAG or not option.values:
            continue
        try:
            found += parse(option.value)
        except ValueError:
            continue
    return tuple(dict.fromkeys(found))


def addresses(found: Iterable[Worker]) -> tuple[str, ...]:
    """The workers' IP addresses, each once, for the unit's IPAddressAllow=."""
    return tuple(dict.fromkeys(w.host for w in found))


def shared(a: Iterable[Worker], b: Iterable[Worker]) -> Worker | None:
    """A worker both lists name: one ggml-rpc-server serves one llama-server at a time."""
    common = sorted(set(a) & set(b))
    return common[0] if common else None
