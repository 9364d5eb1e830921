"""The system bus to systemd, with pystemd: calls, signals, and getting both back after the
bus went away (`systemctl restart dbus`). units.py says what to call; this says how.

Method calls run on one worker thread that owns its own connection, because sd-bus is
synchronous and not thread-safe. Signals arrive on a second connection read from the
event loop with `add_reader`. pystemd holds the GIL through a call's whole round trip, so
a call still stalls the loop for as long as it takes: the calls made again and again
(units.list_ours, units.memory) are kept few and small. Arguments are marshalled
here with their D-Bus signatures rather than through pystemd's own property table, which
differs between pystemd 0.11 (Debian 12) and later releases and lacks some we need.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pystemd.dbuslib import DBus, apply_signature, path_decode, path_encode

from llamad.safetext import unsafe

log = logging.getLogger("llamad.units")

SYSTEMD = b"org.freedesktop.systemd1"
MANAGER_PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
PROPS_IFACE = b"org.freedesktop.DBus.Properties"
UNIT_ROOT = b"/org/freedesktop/systemd1/unit"

RECONNECT_TRIES = 8
RECONNECT_PAUSE = 0.1  # seconds, times the attempt: 2.8 s in all while the bus restarts
# A call failing with these found the connection gone. (ENOENT is systemd's "no such
# unit", not a lost bus.)
_GONE = {errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE, errno.ESHUTDOWN}
# A call failing with these reached no systemd, or one that went away before it answered
# (`systemctl daemon-reexec`: it leaves the bus and comes back): whether it acted on the
# call is unknown.
_AWAY = ("disconnected from message bus without replying", "ServiceUnknown", "NameHasNoOwner")

Props = Sequence[tuple[str, bytes, Any]]  # (name, D-Bus signature, value)


class UnitError(Exception):
    """A D-Bus call to systemd failed; the message is systemd's own. `away`: systemd was
    not there to answer (re-executing), so the call may or may not have been carried out."""

    def __init__(self, message: str, away: bool = False) -> None:
        super().__init__(message)
        self.away = away


def disconnected(e: Exception) -> bool:
    """Whether a pystemd error means the bus connection is gone (not a refused call)."""
    code = getattr(e, "errno", None)
    return isinstance(code, int) and abs(code) in _GONE


def went_away(e: Exception) -> bool:
    """Whether a pystemd error says systemd was away, not that it refused the call."""
    return any(sign in describe(e) for sign in _AWAY)


def describe(e: Exception) -> str:
    parts = [p.decode() if isinstance(p, bytes) else str(p) for p in e.args if p]
    return ": ".join(parts) or type(e).__name__


def to_bytes(value: Any, what: str = "a value") -> Any:
    """pystemd wants bytes for strings, recursively. The last line of defence of safetext:
    no string with a control character reaches systemd, whatever path it came by."""
    if isinstance(value, str):
        why = unsafe(value)
        if why is not None:
            raise UnitError(f"llamad refuses to send {what} {value!r} to systemd: it {why}")
        return value.encode()
    if isinstance(value, list):
        return [to_bytes(v, what) for v in value]
    if isinstance(value, tuple):
        return tuple(to_bytes(v, what) for v in value)
    return value


def to_str(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, list):
        return [to_str(v) for v in value]
    return value


def args(signature: bytes, values: list[Any]) -> list[Any]:
    return list(apply_signature(signature, to_bytes(values)))


def prop_array(props: Props) -> list[Any]:
    """An a(sv) argument, each variant with its own signature."""
    out: list[Any] = [(ord("a"), b"(sv)")]
    for name, sig, value in props:
        out += [(ord("r"), b"sv"), (ord("s"), name.encode()), (ord("v"), sig)]
        out += apply_signature(sig, [to_bytes(value, f"{name}=")])
        out += [(-1, None), (-1, None)]
    out.append((-1, None))
    return out


def transient_args(name: str, props: Props, aux: Sequence[tuple[str, Props]] = ()) -> list[Any]:
    """StartTransientUnit's arguments: the unit, and auxiliary units started with it."""
    out = [*apply_signature(b"ss", [to_bytes(name, "a unit name"), b"fail"]),
           *prop_array(props)]
    out.append((ord("a"), b"(sa(sv))"))
    for aux_name, aux_props in aux:
        out += [(ord("r"), b"sa(sv)"), (ord("s"), to_bytes(aux_name, "a unit name"))]
        out += [*prop_array(aux_props), (-1, None)]
    out.append((-1, None))
    return out


def unit_path(name: str) -> bytes:
    return bytes(path_encode(UNIT_ROOT, name.encode()))


def unit_name(path: bytes) -> str:
    return bytes(path_decode(path, UNIT_ROOT)).decode()


class Caller:
    """Blocking D-Bus calls on one dedicated thread with its own connection, opened
    again (and the call retried) when the bus went away."""

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

    def _forget_bus(self) -> None:
        bus = getattr(self._local, "bus", None)
        self._local.bus = None
        if bus is not None:
            bus.close()

    def _call(self, path: bytes, iface: bytes, method: bytes, argv: list[Any],
              again: bool) -> Any:
        """`again`: the call may be repeated when systemd was away (it is idempotent)."""
        for attempt in range(RECONNECT_TRIES):
            try:
                bus = self._bus()
            except Exception as e:  # the bus is not back yet (restarting)
                if attempt == RECONNECT_TRIES - 1:
                    raise UnitError(f"cannot connect to the system bus: {describe(e)}") from e
                time.sleep(RECONNECT_PAUSE * attempt)  # on this thread only: calls wait anyway
                continue
            try:
                return bus.call_method(SYSTEMD, path, iface, method, argv).body
            except Exception as e:  # pystemd raises DBusError subclasses and others
                if disconnected(e):
                    log.warning("lost the system bus (%s); connecting again", describe(e))
                    self._forget_bus()
                elif not (again and went_away(e)) or attempt == RECONNECT_TRIES - 1:
                    raise UnitError(describe(e), away=went_away(e)) from e
                else:
                    log.info("systemd was away (%s); asking again", describe(e))
                    time.sleep(RECONNECT_PAUSE * (attempt + 1))
        raise UnitError("the system bus keeps going away")

    async def call(self, path: bytes, iface: bytes, method: bytes, argv: list[Any],
                   again: bool = True) -> Any:
        return await self.run(lambda: self._call(path, iface, method, argv, again))

    async def manager(self, method: bytes, argv: list[Any], again: bool = True) -> Any:
        return await self.call(MANAGER_PATH, MANAGER, method, argv, again)

    async def run(self, work: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def close(self) -> None:
        # A call stuck in systemd must not hang llamad's exit.
        self._pool.shutdown(wait=False, cancel_futures=True)


def _plain(method: Callable[[Any], None]) -> Callable[..., None]:
    def callback(msg: Any, error: Any = None, userdata: Any = None) -> None:
        method(msg)
    return callback


class Signals:
    """systemd's PropertiesChanged and UnitRemoved signals, read on the event loop.
    A lost connection is opened again and the subscription renewed; `on_reconnect`
    is called then, since signals may have been missed meanwhile."""

    def __init__(self, caller: Caller, on_props: Callable[[bytes, dict[str, Any]], None],
                 on_removed: Callable[[str], None], on_reconnect: Callable[[], None]) -> None:
        self._caller = caller
        self._on_props, self._on_removed, self._on_reconnect = on_props, on_removed, on_reconnect
        self._bus: DBus | None = None
        self._fd = -1  # the bus's, kept: a closed connection's get_fd() answers -ENOTCONN
        self._handled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # pystemd tags a callback with attributes (bound methods refuse) and holds it
        # without a reference, so keep plain functions alive here.
        self._callbacks = [_plain(self._props), _plain(self._removed)]
        self._reconnecting: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            bus = await self._caller.run(self._subscribe)
        except Exception as e:
            raise UnitError(f"cannot connect to systemd's system bus ({describe(e)}); "
                            "llamad needs systemd as PID 1, or DBUS_SYSTEM_BUS_ADDRESS") from e
        self._listen(bus)

    def _subscribe(self) -> DBus:
        """A new signal connection (on the D-Bus thread: it blocks)."""
        bus = DBus()
        bus.open()
        bus.match_signal(SYSTEMD, None, PROPS_IFACE, b"PropertiesChanged", self._callbacks[0])
        bus.match_signal(SYSTEMD, MANAGER_PATH, MANAGER, b"UnitRemoved", self._callbacks[1])
        # Without a subscriber systemd does not send unit signals at all.
        bus.call_method(SYSTEMD, MANAGER_PATH, MANAGER, b"Subscribe", [])
        return bus

    def _listen(self, bus: DBus) -> None:
        assert self._loop is not None
        self._bus, self._fd = bus, bus.get_fd()
        self._loop.add_reader(self._fd, self._drain)
        self._drain()

    def close(self) -> None:
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        self._unlisten()

    def _unlisten(self) -> None:
        if self._bus is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._bus.close()
        self._bus, self._fd = None, -1

    def _drain(self) -> None:
        # sd_bus_process handles one message per call and hides whether it did
        # anything when a callback consumed it; the flag tells us.
        assert self._bus is not None
        try:
            for _ in range(1000):
                self._handled = False
                msg = self._bus.process()
                if msg.is_empty() and not self._handled:
                    break
        except Exception as e:  # pystemd's DBusError: the connection is gone
            self._lost(describe(e))
            return
        # A connection the bus closed hands over its Disconnected message, closes its
        # socket (get_fd() turns negative) and goes silent: no error, no more wakeups.
        if self._bus.get_fd() < 0:
            self._lost("the bus closed the connection")

    def _lost(self, why: str) -> None:
        log.warning("lost the system bus connection for systemd's signals (%s); reconnecting",
                    why)
        self._unlisten()
        assert self._loop is not None
        self._reconnecting = self._loop.create_task(self._reconnect(),
                                                    name="reconnecting to the system bus")

    async def _reconnect(self) -> None:
        pause = RECONNECT_PAUSE
        while True:
            try:
                bus = await self._caller.run(self._subscribe)
            except Exception as e:  # the bus is not back yet
                log.debug("reconnecting to the system bus: %s", describe(e))
                await asyncio.sleep(pause)
                pause = min(5.0, pause * 2)
                continue
            self._listen(bus)
            log.info("reconnected to the system bus and subscribed to systemd's signals again")
            self._on_reconnect()
            return

    def _props(self, msg: Any) -> None:
        self._handled = True
        msg.process_reply(True)
        _iface, changed, _invalidated = msg.body
        self._on_props(bytes(msg.headers.get("Path", b"")),
                       {to_str(k): to_str(v) for k, v in changed.items()})

    def _removed(self, msg: Any) -> None:
        self._handled = True
        msg.process_reply(True)
        self._on_removed(to_str(msg.body[0]))
