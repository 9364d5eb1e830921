"""`systemd-analyze security` on this systemd (Debian 13's), for the figures docs/security.md
gives: llamad.service at most 2.0, a model's unit at most 1.0."""

from __future__ import annotations

import re

from vm.guest.vmguest import load, model, sh


def exposure(unit: str) -> float:
    out = sh(f"systemd-analyze security --no-pager {unit}", check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert found, out[-2000:]
    return float(found.group(1))


def test_exposure_figures() -> None:
    plain = model("busy")
    unit = (plain if plain["state"] == "ready" else load("busy"))["unit"]
    figures = {"llamad.service": exposure("llamad.service"), unit: exposure(unit)}
    remote = model("remote")
    if remote["state"] == "ready":  # the network a model over rpc workers must have
        figures[remote["unit"]] = exposure(remote["unit"])
    figures["llamad-rpc-worker.service"] = exposure("llamad-rpc-worker.service")
    print("systemd-analyze security:", ", ".join(f"{u} {x}" for u, x in figures.items()),
          "| systemd", sh("systemctl --version").split()[1])
    assert figures["llamad.service"] <= 2.0
    assert figures[unit] <= 1.0
