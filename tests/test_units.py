"""Static checks of the shipped unit, sysusers and tmpfiles files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "units"
UNIT_FILES = ("llamad.socket", "llamad.service", "llama-server.slice",
              "llamad-rpc-worker.service")


def parse(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists; keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for k, v in parse(path).get(section, []) if k == key]


def one(path: Path, section: str, key: str) -> str:
    found = values(path, section, key)
    assert len(found) == 1, f"{path.name}: [{section}] {key}= set {len(found)} times"
    return found[0]


@pytest.fixture
def verifiable(tmp_path: Path) -> Path:
    """The units in a directory of their own, ExecStart pointing at a real binary.

    verify insists that ExecStart= exists, and /usr/bin/llamad is only there
    once the package is installed (the package test verifies the real thing).
    """
    for name in UNIT_FILES:
        text = (UNITS / name).read_text().replace("/usr/bin/llamad", sys.executable)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_systemd_analyze_verify_is_clean(verifiable: Path) -> None:
    out = subprocess.run(["systemd-analyze", "verify", *UNIT_FILES], cwd=verifiable,
                         capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values, so any output is a failure.
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_service_exposure_is_at_most_2(verifiable: Path) -> None:
    # The threshold is on systemd's 0-100 scale: 20 is the "2.0" it prints.
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20",
                          "--no-pager", str(verifiable / "llamad.service")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Overall exposure level for llamad.service: 1." in out.stdout


def test_no_template_unit_for_model_servers() -> None:
    # A llama-server@.service on disk would take precedence over the transient
    # units llamad creates and make StartTransientUnit fail.
    found = [p for p in ROOT.rglob("llama-server@*")
             if not {".git", ".venv"} & set(p.relative_to(ROOT).parts)]
    assert found == []


def test_socket_listens_on_loopback_only() -> None:
    assert values(UNITS / "llamad.socket", "Socket", "ListenStream") == ["127.0.0.1:8080"]


def test_crash_loop_cannot_close_the_socket() -> None:
    service, socket = UNITS / "llamad.service", UNITS / "llamad.socket"
    # A start limit hit fails the socket too ("service-start-limit-hit"), so
    # there must be none; the restart delay keeps the loop slow instead.
    assert one(service, "Unit", "StartLimitIntervalSec") == "0"
    assert one(service, "Service", "Restart") == "on-failure"
    assert one(service, "Service", "RestartSec") == "2s"
    # The trigger limit stays on, as PID 1's guard against busy loops, and is
    # far above what a 2s restart pace can produce.
    assert one(socket, "Socket", "TriggerLimitIntervalSec") == "2s"
    assert int(one(socket, "Socket", "TriggerLimitBurst")) >= 10


def test_service_is_socket_activated_notify_with_watchdog() -> None:
    service = UNITS / "llamad.service"
    assert one(service, "Service", "Type") == "notify"
    assert one(service, "Service", "WatchdogSec") == "30s"
    assert one(service, "Unit", "Requires") == "llamad.socket"
    assert one(service, "Service", "ExecStart") == "/usr/bin/llamad serve"
    # Only the socket is enabled; the service starts on the first connection.
    assert "Install" not in parse(service)
    assert one(UNITS / "llamad.socket", "Install", "WantedBy") == "sockets.target"


def test_service_has_no_capabilities_and_a_sandbox() -> None:
    service = UNITS / "llamad.service"
    assert one(service, "Service", "CapabilityBoundingSet") == ""
    for key in ("NoNewPrivileges", "PrivateUsers", "PrivateTmp", "ProtectKernelTunables",
                "ProtectControlGroups", "MemoryDenyWriteExecute", "RestrictSUIDSGID"):
        assert one(service, "Service", key) == "yes", key
    assert one(service, "Service", "ProtectSystem") == "strict"
    assert one(service, "Service", "RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"


def test_backend_sockets_survive_a_llamad_restart() -> None:
    # Each model unit owns /run/llamad/<instance>; if /run/llamad were this
    # service's RuntimeDirectory, stopping llamad would delete live sockets.
    assert values(UNITS / "llamad.service", "Service", "RuntimeDirectory") == []
    tmpfiles = (UNITS / "llamad.tmpfiles").read_text().splitlines()
    assert "d /run/llamad 0755 root root -" in tmpfiles


def test_models_dir_group_exists() -> None:
    tmpfiles = [line.split() for line in (UNITS / "llamad.tmpfiles").read_text().splitlines()
                if line and not line.startswith("#")]
    models = [entry for entry in tmpfiles if entry[1] == "/var/lib/llamad/models"]
    assert models == [["d", "/var/lib/llamad/models", "2775", "root", "llamad", "-"]]
    sysusers = [line.split() for line in (UNITS / "llamad.sysusers").read_text().splitlines()
                if line and not line.startswith("#")]
    assert ["g", "llamad", "-"] in sysusers


def test_package_installs_every_unit_file() -> None:
    rules = (ROOT / "packaging" / "debian" / "rules").read_text()
    for name in (*UNIT_FILES, "llamad.sysusers", "llamad.tmpfiles"):
        assert f"units/{name}" in rules, name


def test_service_bounds_memory_and_reloads_its_keys() -> None:
    service = UNITS / "llamad.service"
    # Sized for the default max-bodies-mb (256): docs/security.md, etc/llamad.conf.
    assert one(service, "Service", "MemoryMax") == "1G"
    # Far above max-connections + max-requests (etc/llamad.conf).
    assert int(one(service, "Service", "LimitNOFILE")) >= 16384
    # A broken key file fails `systemctl reload` with its reason before SIGHUP is sent.
    assert values(service, "Service", "ExecReload") == [
        "/usr/bin/llamad check-config", "/bin/kill -HUP $MAINPID"]


def test_rpc_worker_is_sandboxed_and_on_loopback_until_configured(verifiable: Path) -> None:
    worker = UNITS / "llamad-rpc-worker.service"
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=15",
                          "--no-pager", str(verifiable / worker.name)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert one(worker, "Service", "DynamicUser") == "yes"
    assert one(worker, "Service", "CapabilityBoundingSet") == ""
    assert one(worker, "Service", "IPAddressDeny") == "any"
    assert values(worker, "Service", "IPAddressAllow") == ["localhost"]
    assert "RPC_HOST=127.0.0.1 " in values(worker, "Service", "Environment")[0]
    assert '--host "$$RPC_HOST"' in one(worker, "Service", "ExecStart")
    rules = (ROOT / "packaging" / "debian" / "rules").read_text()
    assert "--no-enable --no-start llamad-rpc-worker.service" in rules


def test_model_unit_paths_are_named_in_one_place() -> None:
    from pystemd.dbuslib import path_encode

    from llamad.systemd.bus import unit_path
    from llamad.systemd.unitname import UNIT_PATH_PREFIX, bus_label, unit_name

    for name in ("gemma-a", "a/b:Q4_K_M", "ü.x", "x" * 200):
        unit = unit_name(name)
        assert unit_path(unit).decode().startswith(UNIT_PATH_PREFIX)
        assert "/org/freedesktop/systemd1/unit/" + bus_label(unit) == bytes(
            path_encode(b"/org/freedesktop/systemd1/unit", unit.encode())).decode()
