"""The rig itself: a real llama-server as a transient unit in the box, driven from the host."""

from __future__ import annotations

import json
import os
import urllib.request

import rig
from pystemd.dbuslib import DBus
from pystemd.systemd1 import Manager, Unit

UNIT = b"llama-server@gemma-a.service"
PORT = 18181


def _http(path: str, body: dict[str, object] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}",
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def _unit(bus: DBus) -> Unit:
    unit = Unit(UNIT, bus=bus)
    unit.load()
    return unit


def test_transient_llama_server_in_the_box(box: rig.Box, assets: rig.Assets) -> None:
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = box.bus_address
    with DBus() as bus:
        manager = Manager(bus=bus)
        manager.load()
        argv = [str(assets.llama_server).encode(), b"-m", str(assets.model).encode(),
                b"--host", b"127.0.0.1", b"--port", str(PORT).encode(), b"-c", b"2048"]
        manager.Manager.StartTransientUnit(UNIT, b"fail", {
            b"Description": b"gemma-a", b"ExecStart": [(argv[0], argv, False)],
            b"Restart": b"on-failure", b"RestartUSec": 200_000, b"DynamicUser": True,
            b"ProtectSystem": b"strict", b"CollectMode": b"inactive-or-failed"})

        assert rig.wait_for("/health to answer 200", lambda: _http("/health")[0] == 200,
                            timeout=60)
        status, body = _http("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8})
        assert status == 200
        answer = json.loads(body)["choices"][0]["message"]["content"]
        assert answer.strip()

        log = box.journal("-u", "llama-server@*")
        assert f"listening on http://127.0.0.1:{PORT}" in log, log[-2000:]

        unit = _unit(bus)
        pid = unit.Service.MainPID
        assert pid > 0 and unit.Service.NRestarts == 0
        box.run(["kill", "-9", str(pid)])
        rig.wait_for("systemd to restart the unit",
                     lambda: _unit(bus).Service.NRestarts == 1 and
                     _unit(bus).Unit.ActiveState == b"active", timeout=30)
        assert _unit(bus).Service.MainPID != pid
        assert rig.wait_for("/health after the restart", lambda: _http("/health")[0] == 200,
                            timeout=60)

        manager.Manager.StopUnit(UNIT, b"replace")
        rig.wait_for("the unit to be gone",
                     lambda: _unit(bus).Unit.LoadState == b"not-found", timeout=30)
    listed = box.run(["systemctl", "list-units", "--all", "--no-legend", "llama-server@*"])
    assert listed.stdout.strip() == ""
