"""egress.py: which addresses llamad lets its own unit reach, and what it asks systemd.

Enforcement itself needs cgroup v2 (BPF): tests/vm/guest/test_network.py shows it on a real
kernel. Here systemd is a stand-in holding the unit's IPAddressDeny=/IPAddressAllow= as D-Bus
gives them."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import pytest
from helpers.ggufgen import write_model

from llamad.catalog.rpcargs import workers
from llamad.config import Config
from llamad.systemd.egress import Egress, blocked, networks, peer_addresses
from llamad.systemd.units import UnitError

ANY = [(2, [0, 0, 0, 0], 0), (10, [0] * 16, 0)]
LOCALHOST = [(2, [127, 0, 0, 0], 8), (10, [0] * 15 + [1], 128)]


def test_peer_addresses_split_ips_from_names() -> None:
    assert peer_addresses(["http://10.0.0.3:8080", "https://[fd00::7]:8443",
                           "http://gpu-box:8080"]) == (
        ["10.0.0.3", "fd00::7"], ["http://gpu-box:8080"])


def test_blocked_is_denied_and_not_allowed() -> None:
    deny, allow = networks(ANY), networks([*LOCALHOST, (2, b"\x0a\x00\x00\x00", 24)])
    assert blocked(["127.0.0.2", "::1", "10.0.0.9", "10.0.1.1", "fd00::7"], deny, allow) == [
        "10.0.1.1", "fd00::7"]
    assert blocked(["10.0.1.1"], [], allow) == []  # no filter: nothing to open
    assert networks(None) == []
    assert networks([(2, bytes([192, 0, 2, 1]), 32)]) == [ipaddress.ip_network("192.0.2.1/32")]


class Systemd:
    """UnitManager's two calls Egress makes, over one unit's filter."""

    def __init__(self, deny: Any = ANY, refuse: bool = False) -> None:
        self.deny, self.allow = deny, list(LOCALHOST)
        self.refuse = refuse
        self.calls: list[list[str]] = []

    async def own_ip_filter(self) -> tuple[str, Any, Any]:
        return "llamad.service", self.deny, self.allow

    async def allow_ip(self, name: str, addresses: list[str]) -> None:
        assert name == "llamad.service"
        if self.refuse:
            raise UnitError("Access denied")
        self.calls.append(addresses)
        self.allow += [(2, list(ipaddress.ip_address(a).packed), 32) for a in addresses]


async def test_adds_only_what_the_filter_blocks_once(caplog: pytest.LogCaptureFixture) -> None:
    systemd = Systemd()
    egress = Egress(systemd)  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, "llamad.egress")
    await egress.allow(["10.0.0.7", "127.0.0.5", "10.0.0.3"])
    await egress.allow(["10.0.0.7", "10.0.0.8"])
    assert systemd.calls == [["10.0.0.3", "10.0.0.7"], ["10.0.0.8"]]
    assert "IPAddressAllow += 10.0.0.3 10.0.0.7" in caplog.text


async def test_no_filter_no_call_and_a_refusal_says_the_drop_in(
        caplog: pytest.LogCaptureFixture) -> None:
    systemd = Systemd(deny=[])
    await Egress(systemd).allow(["10.0.0.7"])  # type: ignore[arg-type]
    assert systemd.calls == []
    refused = Egress(Systemd(refuse=True))  # type: ignore[arg-type]
    await refused.allow(["10.0.0.7"], ["http://gpu-box:8080"])
    assert "IPAddressAllow=10.0.0.7 with `systemctl edit llamad.service`" in caplog.text
    assert "peers named by host name (http://gpu-box:8080)" in caplog.text


def test_reachable_names_workers_and_peers(tmp_path: Any) -> None:
    from llamad.app import reachable
    from llamad.catalog.catalog import Catalog

    presets = tmp_path / "presets.ini"
    model = write_model(tmp_path / "m.gguf")
    presets.write_text(f"[big]\nmodel = {model}\nrpc = 10.0.0.7:50052,10.0.0.8:50052\n")
    config = Config.default(models_dirs=(), models_preset=presets, llama_cache=False,
                            peers=("http://10.0.0.3:8080", "http://gpu-box:8080"))
    snapshot = Catalog(config, settle=0).rescan()
    assert [str(w) for m in snapshot.models.values() for w in workers(m.settings.args)] == [
        "10.0.0.7:50052", "10.0.0.8:50052"]
    assert reachable(config, snapshot) == (["10.0.0.3", "10.0.0.7", "10.0.0.8"],
                                           ["http://gpu-box:8080"])
