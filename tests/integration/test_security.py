"""Attacks on llamad from docs/security.md, each tried on the real box: hostile file names,
slow clients, keys, browsers, memory, local users."""

from __future__ import annotations

import os
from typing import Any

import aiohttp
import rig
from llamad_fixture import Factory, chat, models

# A file name that, written raw into a transient unit file, adds a command systemd runs as
# root when the unit stops after a daemon-reload. A file name holds no '/': `touch` is
# found on systemd's fixed search path, and its relative path lands in /, the working
# directory of system services.
MARKER = "llamad-pwned"
INJECTED = f"evil\n[Service]\nExecStopPost=+touch {MARKER}"
SAFE = ("50%-off", "br[ack]et")


async def test_hostile_file_names_never_reach_systemd_raw(llamad_factory: Factory,
                                                          assets: rig.Assets,
                                                          subtests: Any) -> None:
    d = llamad_factory(["gemma-a"])
    for name in (INJECTED, *SAFE):
        os.link(assets.model, d.models_dir / f"{name}.gguf")
    rig.wait_for("the catalog to take the new files",
                 lambda: set(SAFE) <= set(models(d.url)), timeout=30)
    listed = models(d.url)
    async with aiohttp.ClientSession() as s:
        answers = {name: await chat(s, d.url, name) for name in (INJECTED, *SAFE)}
    units = {name: m["llamad"]["unit"] for name, m in listed.items() if name != "gemma-a"}
    files = {name: d.box.run(["cat", f"/run/systemd/transient/{unit}"], check=False).stdout
             for name, unit in units.items()}
    # systemd reads the transient files back; then every model's unit is stopped (by
    # systemctl: llamad itself loses track of its units on a daemon-reload today).
    d.box.run(["systemctl", "daemon-reload"])
    shown = {name: d.show(unit, "Description") for name, unit in units.items()}
    d.box.run(["systemctl", "stop", *units.values()])

    rig.wait_for("the units to stop", lambda: not d.model_units(), timeout=60)
    with subtests.test("nothing injected ran"):
        assert d.box.run(["test", "-e", f"/{MARKER}"], check=False).returncode == 1
    with subtests.test("refused at scan time, one problem line naming the file"):
        assert INJECTED not in listed and answers[INJECTED][0] == 404, answers[INJECTED]
        log = d.log()
        assert f"{d.models_dir}/evil\\n[Service]\\nExecStopPost=+touch {MARKER}.gguf" in log
        assert not any(line.startswith(("[Service]", "ExecStopPost")) for line in
                       log.splitlines())
    for name in SAFE:
        with subtests.test("served safely", model=name):
            assert answers[name][0] == 200, answers[name]
            descriptions = [line for line in files[name].splitlines()
                            if line.startswith("Description=")]
            assert descriptions == [f"Description={name.replace('%', '%%')}"], files[name]
            assert "ExecStopPost" not in files[name]
            assert shown[name] == name


async def test_control_characters_from_presets_stop_at_the_systemd_boundary(
        llamad_factory: Factory) -> None:
    # A tab inside a preset value passes the INI parser; it must still never reach systemd.
    d = llamad_factory(["gemma-a"], preset="[gemma-a]\nchat-template = a\tb\n")
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, d.url, "gemma-a")
    assert status == 503, body
    message = body["error"]["message"]
    assert "refuses to send ExecStart=" in message and "control characters" in message
    assert d.model_units() == {}
