"""llamad follows systemd's own view of the model units: through a daemon-reload, a
daemon-reexec, a restart of the bus, and a unit stopped behind llamad's back."""

from __future__ import annotations

import asyncio
import subprocess
import time

import aiohttp
import pytest
import rig
from helpers.daemon import Factory, Llamad, chat, state, wait_state

from llamad.systemd.unitname import unit_name

UNIT = "llama-server@gemma-a.service"
FAULTS = {
    "daemon-reload": "systemctl daemon-reload",
    "daemon-reexec": "systemctl daemon-reexec",
    "restart-dbus": "systemctl restart dbus",
    "stop-behind-llamads-back": f"systemctl stop {UNIT}",
}


def agrees(d: Llamad) -> bool:
    """llamad's state of gemma-a is the one systemd shows."""
    systemd = d.show(UNIT, "ActiveState")
    ours = state(d.url, "gemma-a")
    return (systemd, ours) in (("active", "ready"), ("inactive", "unloaded"),
                               ("failed", "failed"))


@pytest.mark.parametrize("fault", FAULTS)
async def test_llamad_ends_in_systemds_state(llamad_factory: Factory, fault: str) -> None:
    d = llamad_factory(["gemma-a"])
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
        began = time.monotonic()
        d.box.run(FAULTS[fault])
        d.box.wait_running(timeout=60)
        await asyncio.to_thread(rig.wait_for, "llamad to agree with systemd",
                                lambda: agrees(d), timeout=15)
        print(f"{fault}: llamad agrees with systemd {time.monotonic() - began:.1f}s after it")
        if fault != "stop-behind-llamads-back":
            # Nothing diverged, so nothing is repaired: a daemon-reload's UnitRemoved
            # signals, or a lost bus, are not taken for units gone.
            assert "reconcile: model" not in d.log(), d.log()[-3000:]
        # No stuck slot: an explicit load works, and the model answers.
        async with s.post(d.url + "/models/load", json={"model": "gemma-a"}) as r:
            assert r.status == 200, await r.text()
        await asyncio.to_thread(wait_state, d.url, "gemma-a", "ready", 60)
        status, body = await chat(s, d.url, "gemma-a")
        assert status == 200, body
        # No ghost units: systemd runs exactly what llamad believes loaded.
        assert d.model_units() == {UNIT: "active"}
        # Signals flow again: an unload settles without reconcile's help.
        mark = d.log().count("reconcile:")
        async with s.post(d.url + "/models/unload", json={"model": "gemma-a"}) as r:
            assert r.status == 200
        await asyncio.to_thread(wait_state, d.url, "gemma-a", "unloaded", 30)
    assert d.log().count("reconcile:") == mark, d.log()[-3000:]
    assert d.model_units() == {}


async def test_a_signal_missed_while_the_bus_was_down_is_repaired(
        llamad_factory: Factory) -> None:
    """The unit stops while the system bus is down: no signal ever tells llamad, which must
    find out from systemd's own view once the bus is back (without reconcile it would keep
    the model ready, on a backend that is gone, for ever)."""
    d = llamad_factory(["gemma-a"])
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
        d.box.run(f"systemctl stop dbus.socket dbus.service && systemctl stop {UNIT} && "
                  "systemctl start dbus.socket dbus.service")
        began = time.monotonic()
        await asyncio.to_thread(rig.wait_for, "llamad to see the unit gone",
                                lambda: state(d.url, "gemma-a") == "unloaded", timeout=20)
        print(f"missed stop: llamad unloaded {time.monotonic() - began:.1f}s after the bus")
        assert "reconcile: model gemma-a is ready in llamad but no unit in systemd" in d.log()
        # No stuck slot: the next request loads it again.
        status, body = await chat(s, d.url, "gemma-a")
        assert status == 200, body
    assert d.model_units() == {UNIT: "active"}


async def test_a_load_during_daemon_reexec_starts_the_model(llamad_factory: Factory) -> None:
    """systemd leaves the bus while it re-executes: a start sent then gets no answer
    ("recipient disconnected"), which is no refusal. llamad asks again, without starting
    the unit twice."""
    d = llamad_factory(["gemma-a"])
    async with aiohttp.ClientSession() as s:
        for delay in (0.0, 0.02, 0.05):
            reexec = subprocess.Popen(["nsenter", "-t", str(d.box.pid), "-a",
                                       "systemctl", "daemon-reexec"])
            # The fault's timing, not a wait: the load lands at three moments of the
            # re-exec (what follows waits for its outcome).
            await asyncio.sleep(delay)
            async with s.post(d.url + "/models/load", json={"model": "gemma-a"}) as r:
                assert r.status == 200, await r.text()
            assert reexec.wait(timeout=60) == 0
            await asyncio.to_thread(rig.wait_for, "gemma-a to be ready or failed",
                                    lambda: state(d.url, "gemma-a") in ("ready", "failed"), 60)
            assert state(d.url, "gemma-a") == "ready", d.log()[-3000:]
            async with s.post(d.url + "/models/unload", json={"model": "gemma-a"}) as r:
                assert r.status == 200
            await asyncio.to_thread(wait_state, d.url, "gemma-a", "unloaded", 30)
    assert d.starts("gemma-a") == 3


# Ollama's names hold ':'; a file's name may hold what unit files escape or expand.
ODD_NAMES = ["gemma:a", "gemma %n $HOME 'q' \\b;x \"d\" `c` !x *y? {z} &w #v =u"]


@pytest.mark.parametrize("name", ODD_NAMES)
async def test_a_daemon_reload_keeps_an_odd_named_model_unit_as_llamad_made_it(
        llamad_factory: Factory, name: str) -> None:
    """systemd keeps a transient unit as a file and reads it back at every daemon-reload,
    which every `apt install` of a package with units does. In that file a path list
    (RuntimeDirectory=, BindPaths=) is split at ':', which Ollama's names (`gemma3:270m`)
    hold: read back, the model's directory was `gemma` plus a symlink, and the unit came
    back from its next crash without the socket llamad reaches it on. systemd 252 also
    reads ExecStart='s '$' and ';' back escaped: the model's path was another one."""
    d = llamad_factory([name])
    unit = unit_name(name)

    def made() -> dict[str, str]:  # ExecStart's argv, not how the process is doing
        return {p: d.show(unit, p).partition(" ; ignore_errors=")[0]
                for p in ("RuntimeDirectory", "BindPaths", "ExecStart", "Environment")}

    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, name))[0] == 200
        before = made()
        assert before["RuntimeDirectory"] and before["BindPaths"]  # else this tests nothing
        cursor = d.journal_cursor()
        d.box.run("systemctl daemon-reload")
        d.box.wait_running(timeout=60)
        assert made() == before
        said = d.box.journal("-u", "init.scope", "-u", unit, f"--after-cursor={cursor}")
        assert "ignoring" not in said, said
        # A crash after the reload: systemd restarts the unit from what it read back.
        d.box.run(["systemctl", "kill", "--signal=SIGKILL", unit])
        await asyncio.to_thread(rig.wait_for, "the unit to be restarted",
                                lambda: d.show(unit, "NRestarts") == "1", timeout=60)
        await asyncio.to_thread(wait_state, d.url, name, "ready", 60)
        status, body = await chat(s, d.url, name)
        assert status == 200, body
