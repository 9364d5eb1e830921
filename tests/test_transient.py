"""The transient unit's properties, marshalled through pystemd exactly as llamad sends them."""

from __future__ import annotations

import dataclasses
from typing import Any

from pystemd.dbuslib import apply_signature

from llamad.systemd.bus import transient_args
from llamad.systemd.units import UnitSpec, status_from_props, transient_properties

SPEC = UnitSpec(name="llama-server@m.service", description="m",
                argv=("/usr/bin/llama-server", "-m", "/models/m.gguf"),
                environment=("LLAMAD_MODEL=m",), runtime_dir="llamad/m", memory_max=2 << 30)


def _props(spec: UnitSpec) -> dict[str, Any]:
    return {name: value for name, _sig, value in transient_properties(spec)}


def test_every_property_marshals() -> None:
    args = transient_args(SPEC.name, transient_properties(SPEC))
    # name, mode, then the a(sv) array opened and closed, then the empty aux array.
    assert args[:2] == apply_signature(b"ss", [b"llama-server@m.service", b"fail"])
    assert args[-2:] == [(ord("a"), b"(sa(sv))"), (-1, None)]


def test_what_the_unit_promises(subtests: Any) -> None:
    props = _props(SPEC)
    for key, want in [("Slice", "llama-server.slice"), ("Restart", "on-failure"),
                      ("CollectMode", "inactive-or-failed"), ("KillMode", "control-group"),
                      ("DynamicUser", True), ("ProtectSystem", "strict"), ("PrivateTmp", True),
                      ("NoNewPrivileges", True), ("MemoryMax", 2 << 30),
                      ("RuntimeDirectory", ["llamad/m"]), ("PrivateNetwork", True),
                      ("PrivateDevices", True)]:
        with subtests.test(key=key):
            assert props[key] == want
    assert "LLAMAD_MANAGED=1" in props["Environment"]
    assert props["ExecStart"] == [(SPEC.argv[0], list(SPEC.argv), False)]


def test_gpu_and_tcp_variants() -> None:
    spec = UnitSpec(name="x", description="x", argv=("/bin/true",),
                    devices=("/dev/nvidia0", "/dev/nvidiactl"), tcp=True, user="llama")
    props = _props(spec)
    assert props["DeviceAllow"] == [("/dev/nvidia0", "rw"), ("/dev/nvidiactl", "rw")]
    assert "PrivateDevices" not in props and "MemoryDenyWriteExecute" not in props
    assert "PrivateNetwork" not in props and props["User"] == "llama"
    assert "DynamicUser" not in props


def test_status_from_systemd_properties() -> None:
    st = status_from_props("u", {"ActiveState": "active", "MainPID": 42, "NRestarts": 1,
                                 "InvocationID": bytes(range(16)), "ExecMainCode": 2,
                                 "ExecMainStatus": 9, "MemoryCurrent": 2**64 - 1,
                                 "Environment": ["LLAMAD_MANAGED=1", "LLAMAD_MODEL=a=b"]})
    assert st.ours and st.env("LLAMAD_MODEL") == "a=b" and st.env("NOPE") is None
    assert st.exit_code == "killed" and st.memory_current is None
    assert st.invocation_id == bytes(range(16)).hex()


def test_only_llamad_reaches_the_backend_socket() -> None:
    props = _props(SPEC)
    # The socket (0770) and its directory (0750) belong to the backend group, whose only
    # member is llamad.service; the unit sees nothing else of /run.
    assert props["Group"] == "llamad-backend" and props["UMask"] == 0o007
    assert props["RuntimeDirectoryMode"] == 0o750
    assert props["TemporaryFileSystem"] == [("/run", "ro")]
    assert props["BindPaths"] == [("/run/llamad/m", "/run/llamad/m", False, 0x4000)]


def test_stop_timeout_0_kills_at_once_before_and_after_a_daemon_reload() -> None:
    """stop-timeout = 0: no time to exit. Sent as 0 µs, systemd would SIGKILL at once until
    a daemon-reload, then read the unit file's TimeoutStopUSec=0 as no timeout at all (a
    stop that may hang for ever). 1 µs means the same before and after."""
    assert _props(dataclasses.replace(SPEC, stop_timeout=0.0))["TimeoutStopUSec"] == 1
    assert _props(dataclasses.replace(SPEC, stop_timeout=2.5))["TimeoutStopUSec"] == 2_500_000
