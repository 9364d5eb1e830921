"""llamad's own way out: the addresses beyond loopback it must reach, let through its own
unit's IP filter.

The shipped llamad.service has `IPAddressDeny=any` and `IPAddressAllow=localhost`. Where
systemd enforces that (cgroup v2, with BPF) llamad reaches nothing but loopback: not the
llama.cpp RPC workers of a preset's `rpc` (rpcguard connects to them before a load) and not
`peers` (GET /v1/models asks them). So at start, and whenever the presets name a new worker,
llamad adds exactly those addresses to its unit's `IPAddressAllow=` (SetUnitProperties,
runtime only, like `systemctl set-property --runtime`). It never removes one: what an admin
allowed stays, and an address once needed stays allowed until reboot. A peer named by host
name cannot be allowed by address: llamad says which, once.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from llamad.systemd.units import UnitError, UnitManager

log = logging.getLogger("llamad.egress")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def peer_addresses(peers: Iterable[str]) -> tuple[list[str], list[str]]:
    """The peers' URLs split into (IP addresses, URLs naming a host)."""
    found, named = [], []
    for url in peers:
        host = urlsplit(url).hostname or ""
        try:
            found.append(str(ipaddress.ip_address(host)))
        except ValueError:
            named.append(url)
    return found, named


def networks(prefixes: Any) -> list[Network]:
    """IPAddressAllow=/IPAddressDeny= as D-Bus gives them: (family, address bytes, length)."""
    out = []
    for _family, raw, length in prefixes or ():
        address = ipaddress.ip_address(bytes(raw))
        out.append(ipaddress.ip_network(f"{address}/{length}", strict=False))
    return out


def blocked(addresses: Iterable[str], deny: list[Network], allow: list[Network]) -> list[str]:
    """Those of `addresses` the filter stops: denied and not allowed (allow wins)."""
    def within(address: str, nets: list[Network]) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip.version == n.version and ip in n for n in nets)
    return sorted({a for a in addresses if within(a, deny) and not within(a, allow)})


class Egress:
    """Lets llamad's own unit reach the addresses it is given; each is checked once."""

    def __init__(self, units: UnitManager) -> None:
        self._units = units
        self._seen: set[str] = set()
        self._warned = False

    async def allow(self, addresses: Iterable[str], named_peers: Iterable[str] = ()) -> None:
        new = set(addresses) - self._seen
        named = list(named_peers)
        if not new and not named:
            return
        try:
            unit, deny, allow = await self._units.own_ip_filter()
        except UnitError as e:  # not a service (a scope, a shell), or systemd said no
            log.debug("cannot read llamad's own IP filter: %s", e)
            return
        if deny and named and not self._warned:
            self._warned = True
            log.warning("%s lets llamad reach only the addresses it is given (IPAddressDeny=): "
                        "peers named by host name (%s) need theirs, and the name server's, "
                        "with `systemctl edit %s` (IPAddressAllow=ADDRESS)",
                        unit, ", ".join(named), unit)
        missing = blocked(new, networks(deny), networks(allow))
        self._seen |= new
        if not missing:
            return
        try:
            await self._units.allow_ip(unit, missing)
        except UnitError as e:
            self._seen -= set(missing)
            log.warning("cannot let %s reach %s (%s): add IPAddressAllow=%s with "
                        "`systemctl edit %s`", unit, ", ".join(missing), e, " ".join(missing),
                        unit)
            return
        log.info("%s: IPAddressAllow += %s (rpc workers and peers)", unit, " ".join(missing))
