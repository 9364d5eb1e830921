"""systemd over D-Bus: the only module that imports pystemd.

Method calls run on one worker thread that owns its own bus connection,
because sd-bus is synchronous and not thread-safe. Signals arrive on a second
connection read from the event loop with `add_reader`, so nothing here blocks
the loop. Units are described by plain values (UnitSpec in, UnitStatus out).

The transient unit's properties are marshalled here with their D-Bus
signatures rather than through pystemd's own property table, which differs
between pystemd 0.11 (Debian 12) and later releases and lacks some we need.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pystemd.dbuslib import DBus, apply_signature, path_decode, path_encode

from llamad.safetext import unsafe

log = logging.getLogger("llamad.units")

SYSTEMD = b"org.freedesktop.systemd1"
MANAGER_PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
UNIT_IFACE = b"org.freedesktop.systemd1.Unit"
SERVICE_IFACE = b"org.freedesktop.systemd1.Service"
PROPS_IFACE = b"org.freedesktop.DBus.Properties"
UNIT_PREFIX = b"/org/freedesktop/systemd1/unit"
PATTERN = "llama-server@*.service"
MARKER = "LLAMAD_MANAGED=1"
USEC = 1_000_000

ChangeCallback = Callable[[str, dict[str, Any]], None]


class UnitError(Exception):
    """A D-Bus call to systemd failed; the message is systemd's own."""


@dataclass(frozen=True)
class UnitSpec:
    name: str
    description: str
    argv: tuple[str, ...]
    environment: tuple[str, ...] = ()
    slice: str = "llama-server.slice"
    user: str | None = None  # None: DynamicUser=yes
    restart_sec: float = 2.0
    start_limit_burst: int = 3
    start_limit_interval: float = 60.0
    stop_timeout: float = 10.0
    memory_max: int | None = None
    memory_high: int | None = None
    runtime_dir: str | None = None  # relative to /run, e.g. "llamad/gemma"
    devices: tuple[str, ...] = ()  # device nodes let through (GPUs)
    tcp: bool = False  # the backend listens on loopback TCP rather than a UNIX socket
    # (host directory, directory under /run in the unit): bind-mounted read-write when the
    # host directory exists; the unit's side is also one of its runtime directories, so it
    # exists (empty, dropped at stop) either way. The KV cache's save directory.
    binds: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class UnitStatus:
    name: str
    load_state: str = "not-found"
    active_state: str = "inactive"
    sub_state: str = "dead"
    result: str = ""
    main_pid: int = 0
    invocation_id: str = ""
    n_restarts: int = 0
    exit_code: str = ""  # "exited", "killed", "dumped"
    exit_status: int = 0
    memory_current: int | None = None
    environment: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ours(self) -> bool:
        return MARKER in self.environment

    def env(self, key: str) -> str | None:
        prefix = key + "="
        for item in self.environment:
            if item.startswith(prefix):
                return item[len(prefix):]
        return None


def transient_properties(spec: UnitSpec) -> list[tuple[str, bytes, Any]]:
    """(name, D-Bus signature, value) for StartTransientUnit; pure, for tests."""
    props: list[tuple[str, bytes, Any]] = [
        ("Description", b"s", spec.description),
        ("Type", b"s", "exec"),
        ("ExecStart", b"a(sasb)", [(spec.argv[0], list(spec.argv), False)]),
        ("Environment", b"as", [*spec.environment, MARKER]),
        ("Slice", b"s", spec.slice),
        ("Restart", b"s", "on-failure"),
        ("RestartUSec", b"t", int(spec.restart_sec * USEC)),
        ("StartLimitBurst", b"u", spec.start_limit_burst),
        ("StartLimitIntervalUSec", b"t", int(spec.start_limit_interval * USEC)),
        ("CollectMode", b"s", "inactive-or-failed"),
        ("TimeoutStopUSec", b"t", int(spec.stop_timeout * USEC)),
        ("KillMode", b"s", "control-group"),
        ("MemoryAccounting", b"b", True),
        ("NoNewPrivileges", b"b", True),
        ("ProtectSystem", b"s", "strict"),
        # read-only rather than hidden: models may live in a user's llama.cpp cache.
        ("ProtectHome", b"s", "read-only"),
        ("PrivateTmp", b"b", True),
        ("ProtectKernelTunables", b"b", True),
        ("ProtectKernelModules", b"b", True),
        ("ProtectControlGroups", b"b", True),
        ("RestrictSUIDSGID", b"b", True),
        ("LockPersonality", b"b", True),
        # Other users must be able to connect() to the backend's UNIX socket.
        ("UMask", b"u", 0o011),
        ("CapabilityBoundingSet", b"t", 0),
        ("PrivateUsers", b"b", True),
        ("ProtectProc", b"s", "invisible"),
        ("ProcSubset", b"s", "pid"),
        ("ProtectKernelLogs", b"b", True),
        ("ProtectClock", b"b", True),
        ("ProtectHostname", b"b", True),
        ("RestrictNamespaces", b"t", 0),  # 0: no namespace may be created
        ("RestrictRealtime", b"b", True),
        ("SystemCallArchitectures", b"as", ["native"]),
        ("SystemCallFilter", b"(bas)", (True, ["@system-service"])),
        ("SystemCallFilter", b"(bas)", (False, ["@privileged", "@resources"])),
        *_network(spec.tcp),
    ]
    if spec.user is None:
        props.append(("DynamicUser", b"b", True))
    else:
        props.append(("User", b"s", spec.user))
    if spec.devices:
        props += [("DevicePolicy", b"s", "closed"),
                  ("DeviceAllow", b"a(ss)", [(dev, "rw") for dev in spec.devices])]
    else:
        # CUDA may generate code at run time; CPU backends never need W+X memory.
        props += [("PrivateDevices", b"b", True), ("MemoryDenyWriteExecute", b"b", True)]
    runtime = [spec.runtime_dir] if spec.runtime_dir else []
    runtime += [inside.removeprefix("/run/") for _, inside in spec.binds]
    if runtime:
        props += [("RuntimeDirectory", b"as", runtime),
                  ("RuntimeDirectoryMode", b"u", 0o755)]
    if spec.binds:
        props.append(("BindPaths", b"a(ssbt)", [(host, inside, True, 0)
                                                for host, inside in spec.binds]))
    if spec.memory_max is not None:
        props.append(("MemoryMax", b"t", spec.memory_max))
    if spec.memory_high is not None:
        props.append(("MemoryHigh", b"t", spec.memory_high))
    return props


AF_INET, AF_INET6 = 2, 10
_LOOPBACK = [(AF_INET, [127, 0, 0, 0], 8), (AF_INET6, [0] * 15 + [1], 128)]
_ANY = [(AF_INET, [0] * 4, 0), (AF_INET6, [0] * 16, 0)]


def _network(tcp: bool) -> list[tuple[str, bytes, Any]]:
    """A UNIX-socket backend needs no network at all; a TCP one only loopback."""
    if not tcp:
        return [("PrivateNetwork", b"b", True),
                ("RestrictAddressFamilies", b"(bas)", (True, ["AF_UNIX"])),
                ("IPAddressDeny", b"a(iayu)", _ANY)]
    return [("RestrictAddressFamilies", b"(bas)", (True, ["AF_UNIX", "AF_INET", "AF_INET6"])),
            ("IPAddressDeny", b"a(iayu)", _ANY), ("IPAddressAllow", b"a(iayu)", _LOOPBACK)]


def _b(value: Any, what: str = "a value") -> Any:
    """pystemd wants bytes for strings, recursively. The last line of defence of safetext:
    no string with a control character reaches systemd, whatever path it came by."""
    if isinstance(value, str):
        why = unsafe(value)
        if why is not None:
            raise UnitError(f"llamad refuses to send {what} {value!r} to systemd: it {why}")
        return value.encode()
    if isinstance(value, list):
        return [_b(v, what) for v in value]
    if isinstance(value, tuple):
        return tuple(_b(v, what) for v in value)
    return value


def _s(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, list):
        return [_s(v) for v in value]
    return value


def _prop_array(props: Sequence[tuple[str, bytes, Any]]) -> list[Any]:
    """An a(sv) argument, each variant with its own signature."""
    args: list[Any] = [(ord("a"), b"(sv)")]
    for name, sig, value in props:
        args += [(ord("r"), b"sv"), (ord("s"), name.encode()), (ord("v"), sig)]
        args += apply_signature(sig, [_b(value, f"{name}=")])
        args += [(-1, None), (-1, None)]
    args.append((-1, None))
    return args


def _start_args(spec: UnitSpec) -> list[Any]:
    args: list[Any] = apply_signature(b"ss", [_b(spec.name, "a unit name"), b"fail"])
    args += _prop_array(transient_properties(spec))
    # No auxiliary units.
    args += [(ord("a"), b"(sa(sv))"), (-1, None)]
    return args


def unit_path(name: str) -> bytes:
    return bytes(path_encode(UNIT_PREFIX, name.encode()))


def status_from_props(name: str, props: dict[str, Any]) -> UnitStatus:
    memory = props.get("MemoryCurrent")
    return UnitStatus(
        name=name,
        load_state=props.get("LoadState", "not-found"),
        active_state=props.get("ActiveState", "inactive"),
        sub_state=props.get("SubState", "dead"),
        result=props.get("Result", ""),
        main_pid=int(props.get("MainPID", 0)),
        invocation_id=bytes(props.get("InvocationID", b"")).hex(),
        n_restarts=int(props.get("NRestarts", 0)),
        exit_code=_exit_code(int(props.get("ExecMainCode", 0))),
        exit_status=int(props.get("ExecMainStatus", 0)),
        # systemd reports "unknown" as the maximum uint64.
        memory_current=None if memory is None or memory >= 2**64 - 1 else int(memory),
        environment=tuple(props.get("Environment", ())),
    )


def _exit_code(code: int) -> str:
    # siginfo si_code values: CLD_EXITED=1, CLD_KILLED=2, CLD_DUMPED=3.
    return {1: "exited", 2: "killed", 3: "dumped"}.get(code, "")


class _Caller:
    """Blocking D-Bus calls on one dedicated thread with its own connection."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llamad-dbus")
        self._local = threading.local()

    def _bus(self) -> DBus:
        bus = getattr(self._local, "bus", None)
        if bus is None:
            bus = DBus()
            bus.open()
            self._local.bus = bus
        return bus

    async def call(self, path: bytes, iface: bytes, method: bytes, args: list[Any]) -> Any:
        def do() -> Any:
            try:
                return self._bus().call_method(SYSTEMD, path, iface, method, args).body
            except Exception as e:  # pystemd raises DBusError subclasses and others
                raise UnitError(_describe(e)) from e
        return await asyncio.get_running_loop().run_in_executor(self._pool, do)

    def close(self) -> None:
        # A call stuck in systemd must not hang llamad's exit.
        self._pool.shutdown(wait=False, cancel_futures=True)


def _describe(e: Exception) -> str:
    parts = [p.decode() if isinstance(p, bytes) else str(p) for p in e.args if p]
    return ": ".join(parts) or type(e).__name__


def _plain(method: Callable[[Any], None]) -> Callable[..., None]:
    def callback(msg: Any, error: Any = None, userdata: Any = None) -> None:
        method(msg)
    return callback


class UnitManager:
    """Start, stop and watch llama-server@ units; state changes go to `on_change`."""

    def __init__(self, on_change: ChangeCallback) -> None:
        self._on_change = on_change
        self._caller = _Caller()
        self._signals: DBus | None = None
        self._handled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._callbacks: list[Callable[..., None]] = []

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        bus = DBus()
        try:
            bus.open()
        except Exception as e:
            raise UnitError(f"cannot connect to systemd's system bus ({_describe(e)}); "
                            "llamad needs systemd as PID 1, or DBUS_SYSTEM_BUS_ADDRESS") from e
        # pystemd tags the callback with attributes (bound methods refuse) and
        # holds it without a reference, so keep plain functions alive here.
        self._callbacks = [_plain(self._on_props), _plain(self._on_removed)]
        bus.match_signal(SYSTEMD, None, PROPS_IFACE, b"PropertiesChanged", self._callbacks[0])
        bus.match_signal(SYSTEMD, MANAGER_PATH, MANAGER, b"UnitRemoved", self._callbacks[1])
        self._signals = bus
        self._loop.add_reader(bus.get_fd(), self._drain)
        # Without a subscriber systemd does not send unit signals at all.
        bus.call_method(SYSTEMD, MANAGER_PATH, MANAGER, b"Subscribe", [])
        self._drain()

    def close(self) -> None:
        if self._signals is not None and self._loop is not None:
            self._loop.remove_reader(self._signals.get_fd())
            self._signals.close()
            self._signals = None
        self._caller.close()

    def _drain(self) -> None:
        # sd_bus_process handles one message per call and hides whether it did
        # anything when a callback consumed it; the flag tells us.
        assert self._signals is not None
        for _ in range(1000):
            self._handled = False
            msg = self._signals.process()
            if msg.is_empty() and not self._handled:
                return

    def _on_props(self, msg: Any) -> None:
        self._handled = True
        msg.process_reply(True)
        path = bytes(msg.headers.get("Path", b""))
        if not path.startswith(UNIT_PREFIX + b"/llama_2dserver_40"):
            return
        name = bytes(path_decode(path, UNIT_PREFIX)).decode()
        _iface, changed, _invalidated = msg.body
        props = {_s(k): _s(v) for k, v in changed.items()}
        self._emit(name, props)

    def _on_removed(self, msg: Any) -> None:
        self._handled = True
        msg.process_reply(True)
        name = _s(msg.body[0])
        if name.startswith("llama-server@"):
            self._emit(name, {"ActiveState": "inactive", "LoadState": "not-found"})

    def _emit(self, name: str, props: dict[str, Any]) -> None:
        try:
            self._on_change(name, props)
        except Exception:  # a bug in a callback must not kill signal delivery
            log.exception("unit change handler failed for %s", name)

    async def start(self, spec: UnitSpec) -> None:
        """Start the transient unit, clearing a failed or lingering one of that name."""
        await self.reset_failed(spec.name)
        for _ in range(600):  # 30 s
            try:
                await self._start(spec)
                return
            except UnitError as e:
                # A stopped unit stays loaded until systemd garbage-collects it, and
                # a transient unit of that name can't be made before. Where cgroup
                # empty notifications are late (cgroup v1, containers) that can take
                # forever; a stop job on the dead unit makes systemd look again.
                if "UnitExists" not in str(e):
                    raise
                await self.stop(spec.name)
            await asyncio.sleep(0.05)
        await self._start(spec)

    async def _start(self, spec: UnitSpec) -> None:
        await self._caller.call(MANAGER_PATH, MANAGER, b"StartTransientUnit", _start_args(spec))

    async def stop(self, name: str) -> None:
        await self._caller.call(MANAGER_PATH, MANAGER, b"StopUnit",
                                apply_signature(b"ss", [name.encode(), b"replace"]))

    async def set_properties(self, name: str, props: Sequence[tuple[str, bytes, Any]]) -> None:
        """SetUnitProperties for this boot only (runtime), like `systemctl set-property
        --runtime`: llamad sets them again from its configuration on every start."""
        args = apply_signature(b"sb", [name.encode(), True]) + _prop_array(props)
        await self._caller.call(MANAGER_PATH, MANAGER, b"SetUnitProperties", args)

    async def reset_failed(self, name: str) -> None:
        try:
            await self._caller.call(MANAGER_PATH, MANAGER, b"ResetFailedUnit",
                                    apply_signature(b"s", [name.encode()]))
        except UnitError as e:
            if "not loaded" not in str(e) and "NoSuchUnit" not in str(e):
                raise

    async def status(self, name: str) -> UnitStatus:
        props: dict[str, Any] = {}
        for iface in (UNIT_IFACE, SERVICE_IFACE):
            body = await self._caller.call(unit_path(name), PROPS_IFACE, b"GetAll",
                                           apply_signature(b"s", [iface]))
            props.update({_s(k): _s(v) for k, v in body.items()})
        return status_from_props(name, props)

    async def list_ours(self) -> list[UnitStatus]:
        """Loaded llama-server@ units that carry llamad's marker."""
        body = await self._caller.call(MANAGER_PATH, MANAGER, b"ListUnitsByPatterns",
                                       apply_signature(b"asas", [[], [PATTERN.encode()]]))
        names: Sequence[str] = [_s(row[0]) for row in body]
        found = [await self.status(name) for name in names]
        return [s for s in found if s.ours]
