"""systemd's side of the models: the units llamad starts (UnitSpec in, UnitStatus out),
their transient properties, and UnitManager to start, stop, list and watch them.
How the calls and signals travel (pystemd, the bus, reconnecting) is bus.py's."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llamad.systemd import bus
from llamad.systemd.bus import Props, UnitError
from llamad.systemd.unitmemory import UnitMemory, known_bytes
from llamad.systemd.unitname import (
    SLICE,
    TTL_TIMER_PATTERN,
    UNIT_PATH_PREFIX,
    UNIT_PATTERN,
    is_model_unit,
    ttl_units,
    unit_of_ttl_timer,
)

__all__ = ["UnitError"]

log = logging.getLogger("llamad.units")

UNIT_IFACE = b"org.freedesktop.systemd1.Unit"
SERVICE_IFACE = b"org.freedesktop.systemd1.Service"
TIMER_IFACE = b"org.freedesktop.systemd1.Timer"
TRUE = "/bin/true"
MANAGED = "LLAMAD_MANAGED=1"  # every model unit llamad starts carries it (Markers)
REMOVED = "UnitRemoved"  # the key on_change gets for systemd's UnitRemoved signal
# The group of model units and their sockets; llamad.service is its one member
# (SupplementaryGroups=, units/llamad.sysusers).
BACKEND_GROUP = "llamad-backend"
MS_REC = 0x4000
USEC = 1_000_000

ChangeCallback = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class UnitSpec:
    """A model's transient unit, as llamad asks systemd for it."""

    name: str
    description: str
    argv: tuple[str, ...]
    environment: tuple[str, ...] = ()
    slice: str = SLICE
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
    # (host directory, directory below runtime_dir in the unit, as /run/...): bind-mounted
    # read-write when the host directory exists; the unit's side is also one of its runtime
    # directories, so it exists (empty, dropped at stop) either way. Ignored without
    # runtime_dir. The KV cache's save directory.
    binds: tuple[tuple[str, str], ...] = ()
    remote: tuple[str, ...] = ()  # IP addresses it must reach: its llama.cpp RPC workers
    markers: Markers | None = None  # how llamad knows the unit again (None: MANAGED only)


@dataclass(frozen=True)
class Markers:
    """How llamad knows a model unit again after a restart (adoption): written into the unit's
    Environment= when it starts (`environment`, the one writer), read back from systemd
    (`UnitStatus.markers`, the one reader)."""

    model: str  # the model's id, exactly (the unit's name may be escaped and hashed)
    backend: str  # the address its llama-server listens on
    args: str  # a digest of its argv: a unit started with other arguments is stale
    # What fitting added to its argv (memory/fit.py), space-separated, and why; None: nothing
    # was chosen. The llamad that adopts the unit rebuilds the argv with it.
    fit: str | None = None
    fit_reason: str = ""

    def environment(self) -> tuple[str, ...]:
        fit = () if self.fit is None else (f"LLAMAD_FIT={self.fit}",
                                            f"LLAMAD_FIT_REASON={self.fit_reason}")
        return (MANAGED, f"LLAMAD_MODEL={self.model}", f"LLAMAD_BACKEND={self.backend}",
                f"LLAMAD_ARGS={self.args}", *fit)


@dataclass(frozen=True)
class UnitStatus:
    """A unit as systemd shows it, in the properties llamad reads."""

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
    memory_peak: int | None = None  # systemd 256+ (cgroup v2's memory.peak)
    environment: tuple[str, ...] = field(default_factory=tuple)
    job: int = 0  # id of a queued or running job (start, stop, restart); 0 = none

    @property
    def ours(self) -> bool:
        return MANAGED in self.environment

    @property
    def coming_up(self) -> bool:
        """Running, or on its way: active, activating or reloading, or inactive with a job
        queued (a start, or a restart systemd has queued, not begun yet)."""
        return bool(self.job) or self.active_state in ("active", "activating", "reloading")

    @property
    def markers(self) -> Markers | None:
        """What llamad recorded in the unit when it started it; None: not llamad's."""
        if not self.ours:
            return None
        return Markers(self.env("LLAMAD_MODEL") or "", self.env("LLAMAD_BACKEND") or "",
                       self.env("LLAMAD_ARGS") or "", self.env("LLAMAD_FIT"),
                       self.env("LLAMAD_FIT_REASON") or "")

    def env(self, key: str) -> str | None:
        prefix = key + "="
        for item in self.environment:
            if item.startswith(prefix):
                return item[len(prefix):]
        return None


def environment(spec: UnitSpec) -> tuple[str, ...]:
    """The unit's Environment=: the spec's own, then llamad's markers."""
    return (*spec.environment, *(spec.markers.environment() if spec.markers else (MANAGED,)))


# What every unit llamad starts has (model units, downloads): no privileges, nothing of the
# system writable, the kernel's knobs and other processes out of sight. Each adds its own
# users, network and writable paths.
SANDBOX: list[tuple[str, bytes, Any]] = [
    ("NoNewPrivileges", b"b", True),
    ("CapabilityBoundingSet", b"t", 0),
    ("ProtectSystem", b"s", "strict"),
    # read-only rather than hidden: models may live in a user's llama.cpp cache.
    ("ProtectHome", b"s", "read-only"),
    ("PrivateTmp", b"b", True),
    ("ProtectKernelTunables", b"b", True),
    ("ProtectKernelModules", b"b", True),
    ("ProtectKernelLogs", b"b", True),
    ("ProtectControlGroups", b"b", True),
    ("ProtectClock", b"b", True),
    ("ProtectHostname", b"b", True),
    ("ProtectProc", b"s", "invisible"),
    ("ProcSubset", b"s", "pid"),
    ("RestrictNamespaces", b"t", 0),  # 0: no namespace may be created
    ("RestrictRealtime", b"b", True),
    ("RestrictSUIDSGID", b"b", True),
    ("LockPersonality", b"b", True),
    ("SystemCallArchitectures", b"as", ["native"]),
    ("SystemCallFilter", b"(bas)", (True, ["@system-service"])),
    ("SystemCallFilter", b"(bas)", (False, ["@privileged", "@resources"])),
]


def transient_properties(spec: UnitSpec) -> list[tuple[str, bytes, Any]]:
    """(name, D-Bus signature, value) for StartTransientUnit; pure, for tests."""
    props: list[tuple[str, bytes, Any]] = [
        ("Description", b"s", spec.description),
        ("Type", b"s", "exec"),
        ("ExecStart", b"a(sasb)", [(spec.argv[0], list(spec.argv), False)]),
        ("Environment", b"as", list(environment(spec))),
        ("Slice", b"s", spec.slice),
        ("Restart", b"s", "on-failure"),
        ("RestartUSec", b"t", int(spec.restart_sec * USEC)),
        ("StartLimitBurst", b"u", spec.start_limit_burst),
        ("StartLimitIntervalUSec", b"t", int(spec.start_limit_interval * USEC)),
        ("CollectMode", b"s", "inactive-or-failed"),
        # At least 1 µs: systemd reads a unit file's TimeoutStopUSec=0 as no timeout, so 0
        # would kill at once until a daemon-reload and then let a stop hang for ever.
        ("TimeoutStopUSec", b"t", max(1, int(spec.stop_timeout * USEC))),
        ("KillMode", b"s", "control-group"),
        ("MemoryAccounting", b"b", True),
        *SANDBOX,
        # Only llamad may connect() to the backend's socket (docs/security.md): the unit
        # runs in BACKEND_GROUP, whose members llamad alone is, so the socket must be
        # group-writable (0770); other users get nothing.
        ("Group", b"s", BACKEND_GROUP),
        ("UMask", b"u", 0o007),
        # Nothing of /run but its own directory (bound in below): no other model's socket,
        # no system bus.
        ("TemporaryFileSystem", b"a(ss)", [("/run", "ro")]),
        ("PrivateUsers", b"b", True),
        *_network(spec.tcp, spec.remote),
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
    if spec.runtime_dir:
        run = f"/run/{spec.runtime_dir}"
        inner = [inside.removeprefix("/run/") for _, inside in spec.binds]
        props += [("RuntimeDirectory", b"as", [spec.runtime_dir, *inner]),
                  ("RuntimeDirectoryMode", b"u", 0o750),
                  ("BindPaths", b"a(ssbt)", [(run, run, False, MS_REC),
                                             *((host, inside, True, 0)
                                               for host, inside in spec.binds)])]
    if spec.memory_max is not None:
        props.append(("MemoryMax", b"t", spec.memory_max))
    if spec.memory_high is not None:
        props.append(("MemoryHigh", b"t", spec.memory_high))
    return props


AF_INET, AF_INET6 = 2, 10
_LOOPBACK = [(AF_INET, [127, 0, 0, 0], 8), (AF_INET6, [0] * 15 + [1], 128)]
_ANY = [(AF_INET, [0] * 4, 0), (AF_INET6, [0] * 16, 0)]


def _network(tcp: bool, remote: tuple[str, ...] = ()) -> list[tuple[str, bytes, Any]]:
    """A UNIX-socket backend needs no network at all; a TCP one only loopback. A model
    with RPC workers needs the host's network (not a private one) to reach them, and its
    firewall lets through exactly their addresses (besides loopback for a TCP backend)."""
    if not tcp and not remote:
        return [("PrivateNetwork", b"b", True),
                ("RestrictAddressFamilies", b"(bas)", (True, ["AF_UNIX"])),
                ("IPAddressDeny", b"a(iayu)", _ANY)]
    allow = [*(_LOOPBACK if tcp else []), *(_host_prefix(a) for a in remote)]
    return [("RestrictAddressFamilies", b"(bas)", (True, ["AF_UNIX", "AF_INET", "AF_INET6"])),
            ("IPAddressDeny", b"a(iayu)", _ANY), ("IPAddressAllow", b"a(iayu)", allow)]


def _host_prefix(text: str) -> tuple[int, list[int], int]:
    """One address as IPAddressAllow= takes it: (family, bytes, prefix length)."""
    address = ipaddress.ip_address(text)
    family = AF_INET if address.version == 4 else AF_INET6
    return (family, list(address.packed), address.max_prefixlen)


def status_from_props(name: str, props: dict[str, Any]) -> UnitStatus:
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
        memory_current=known_bytes(props.get("MemoryCurrent")),
        memory_peak=known_bytes(props.get("MemoryPeak")),
        environment=tuple(props.get("Environment", ())),
        job=int(props.get("Job", (0, ""))[0]),
    )


def _exit_code(code: int) -> str:
    # siginfo si_code values: CLD_EXITED=1, CLD_KILLED=2, CLD_DUMPED=3.
    return {1: "exited", 2: "killed", 3: "dumped"}.get(code, "")


def ttl_timer(unit: str, seconds: float) -> list[tuple[str, Props]]:
    """The transient timer that stops `unit` once `seconds` have passed (while llamad is away,
    idle-exit), then the oneshot service it starts, which conflicts with the unit: starting
    it makes systemd stop the model with no process of llamad's needed."""
    timer, service = ttl_units(unit)
    return [(timer, [("Description", b"s", f"Stop {unit} when its idle TTL runs out (from llamad)"),
                     ("TimersMonotonic", b"a(st)", [("OnActiveSec", int(seconds * USEC))]),
                     ("AccuracyUSec", b"t", USEC),  # systemd's default would allow a minute late
                     ("RemainAfterElapse", b"b", False)]),
            (service, [("Description", b"s", f"Stop {unit}: its idle TTL ran out"),
                       ("Type", b"s", "oneshot"), ("Conflicts", b"as", [unit]),
                       ("ExecStart", b"a(sasb)", [(TRUE, [TRUE], False)])])]


class UnitManager:
    """Start, stop, list and watch model units; state changes go to `on_change`, and
    `on_reconnect` is called once the signal connection is back after a loss (signals
    may have been missed meanwhile). Both can be given later, with `follow`."""

    def __init__(self, on_change: ChangeCallback = lambda name, props: None,
                 on_reconnect: Callable[[], None] = lambda: None) -> None:
        self.follow(on_change, on_reconnect)
        self._caller = bus.Caller()
        self._memory = UnitMemory()
        self._known: dict[str, UnitStatus] = {}  # list_ours's last reading of each unit
        self._signals = bus.Signals(self._caller, self._on_props, self._on_removed,
                                    lambda: self._on_reconnect())

    def follow(self, on_change: ChangeCallback, on_reconnect: Callable[[], None]) -> None:
        """Where unit changes go from now on (signals before this are dropped)."""
        self._on_change = on_change
        self._on_reconnect = on_reconnect

    async def open(self) -> None:
        await self._signals.open()

    def close(self) -> None:
        self._signals.close()
        self._caller.close()

    def _on_props(self, path: bytes, props: dict[str, Any]) -> None:
        if path.startswith(UNIT_PATH_PREFIX.encode()):
            self._emit(bus.unit_name(path), props)

    def _on_removed(self, name: str) -> None:
        # Not proof that the unit stopped: daemon-reload sends this for every unit, the
        # running ones included. The receiver asks systemd.
        if is_model_unit(name):
            self._emit(name, {REMOVED: True})

    def _emit(self, name: str, props: dict[str, Any]) -> None:
        try:
            self._on_change(name, props)
        except Exception:  # a bug in a callback must not kill signal delivery
            log.exception("unit change handler failed for %s", name)

    async def start(self, spec: UnitSpec, wanted: Callable[[], bool] | None = None) -> None:
        """Start the transient unit, clearing a failed or lingering one of that name.
        `wanted` says whether the caller still wants it: once it does not, the start is
        dropped, so a stale start never stops a unit of that name a newer one made."""
        await self.start_transient(spec.name, transient_properties(spec), wanted=wanted)

    async def start_transient(self, name: str, props: Props,
                              aux: list[tuple[str, Props]] | None = None,
                              wanted: Callable[[], bool] | None = None) -> None:
        await self.reset_failed(name)
        argv = bus.transient_args(name, props, aux or [])
        for _ in range(600):  # 30 s
            if wanted is not None and not wanted():
                return
            try:
                await self._caller.manager(b"StartTransientUnit", argv, again=False)
                return
            except UnitError as e:
                if e.away:  # systemd re-executed mid-call: did it start the unit?
                    started = await self._starting(name)
                    log.info("systemd went away while starting %s (%s); %s", name, e,
                             "it did start it" if started else "starting it again")
                    if started:
                        return
                    continue
                # A stopped unit stays loaded until systemd garbage-collects it, and
                # a transient unit of that name can't be made before. Where cgroup
                # empty notifications are late (cgroup v1, containers) that can take
                # forever; a stop job on the dead unit makes systemd look again.
                if "UnitExists" not in str(e):
                    raise
                try:
                    await self.stop(name)
                except UnitError as gone:  # collected since: the name is free now
                    if "not loaded" not in str(gone) and "NoSuchUnit" not in str(gone):
                        raise
                    continue
            await asyncio.sleep(0.05)
        await self._caller.manager(b"StartTransientUnit", argv, again=False)

    async def _starting(self, name: str) -> bool:
        return (await self.status(name)).coming_up

    async def stop(self, name: str) -> None:
        await self._caller.manager(b"StopUnit", bus.args(b"ss", [name, "replace"]))

    async def kill(self, name: str, signal: int) -> None:
        """Send `signal` to the unit's main process (a SIGKILL makes Restart= start it again)."""
        await self._caller.manager(b"KillUnit", bus.args(b"ssi", [name, "main", signal]))

    async def set_properties(self, name: str, props: Props) -> None:
        """SetUnitProperties for this boot only (runtime), like `systemctl set-property
        --runtime`: llamad sets them again from its configuration on every start."""
        argv = bus.args(b"sb", [name, True]) + bus.prop_array(props)
        await self._caller.manager(b"SetUnitProperties", argv)

    async def own_ip_filter(self) -> tuple[str, Any, Any]:
        """The unit llamad runs in, with its IPAddressDeny= and IPAddressAllow= prefixes."""
        path = await self._caller.manager(b"GetUnitByPID", bus.args(b"u", [os.getpid()]))
        name = bus.unit_name(bytes(path))
        props = await self.properties(name, SERVICE_IFACE)
        return name, props.get("IPAddressDeny"), props.get("IPAddressAllow")

    async def allow_ip(self, name: str, addresses: list[str]) -> None:
        """Add these addresses to the unit's IPAddressAllow= (systemd appends; runtime)."""
        await self.set_properties(name, [("IPAddressAllow", b"a(iayu)",
                                          [_host_prefix(a) for a in addresses])])

    async def reset_failed(self, name: str) -> None:
        try:
            await self._caller.manager(b"ResetFailedUnit", bus.args(b"s", [name]))
        except UnitError as e:
            if "not loaded" not in str(e) and "NoSuchUnit" not in str(e):
                raise

    async def properties(self, name: str, iface: bytes) -> dict[str, Any]:
        body = await self._caller.call(bus.unit_path(name), bus.PROPS_IFACE, b"GetAll",
                                       bus.args(b"s", [iface]))
        return {bus.to_str(k): bus.to_str(v) for k, v in body.items()}

    async def status(self, name: str) -> UnitStatus:
        props = await self.properties(name, UNIT_IFACE)
        props.update(await self.properties(name, SERVICE_IFACE))
        return status_from_props(name, props)

    async def memory(self, name: str) -> tuple[int | None, int | None]:
        """The unit's memory now and at its peak in bytes (unitmemory.py)."""
        return await self._memory.read(self._caller, name)

    async def start_ttl_timer(self, unit: str, seconds: float) -> None:
        """Have systemd stop `unit` after `seconds` (ttl_timer)."""
        (timer, props), service = ttl_timer(unit, seconds)
        await self.start_transient(timer, props, [service])

    async def take_ttl_timers(self) -> dict[str, float]:
        """Stop the TTL timers there are: when each model unit's was due (monotonic
        seconds; 0 when systemd did not say)."""
        due: dict[str, float] = {}
        for timer in await self.names(TTL_TIMER_PATTERN):
            try:
                props = await self.properties(timer, TIMER_IFACE)
                await self.stop(timer)
            except UnitError as e:  # it fired meanwhile, or systemd says no: carry on
                log.warning("taking back %s: %s", timer, e)
                continue
            due[unit_of_ttl_timer(timer)] = int(props.get("NextElapseUSecMonotonic", 0)) / USEC
        return due

    async def names(self, pattern: str) -> list[str]:
        """Loaded units whose names match the pattern, in any state."""
        body = await self._caller.manager(b"ListUnitsByPatterns",
                                          bus.args(b"asas", [[], [pattern]]))
        return [bus.to_str(row[0]) for row in body]

    async def list_ours(self) -> list[UnitStatus]:
        """Loaded model units that carry llamad's marker. Reconcile asks every few seconds,
        and pystemd holds the GIL through a call: each unit's status() (~300 properties)
        stalls the event loop ~3 ms, a Get ~0.3 ms. So a unit whose state, job and
        invocation are as last read is not read again (nothing else in it changes)."""
        rows = await self._caller.manager(b"ListUnitsByPatterns",
                                          bus.args(b"asas", [[], [UNIT_PATTERN]]))
        known, self._known = self._known, {}
        for row in rows:
            name = bus.to_str(row[0])
            last = known.get(name)
            if last is None or (last.active_state, last.sub_state, last.job) != (
                    bus.to_str(row[3]), bus.to_str(row[4]), int(row[7])) or \
                    await self._invocation(name) != last.invocation_id:
                last = await self.status(name)
            self._known[name] = last
        return [s for s in self._known.values() if s.ours]

    async def _invocation(self, name: str) -> str:
        found = await self._caller.call(bus.unit_path(name), bus.PROPS_IFACE, b"Get",
                                        bus.args(b"ss", [UNIT_IFACE, "InvocationID"]))
        return bytes(found).hex()
