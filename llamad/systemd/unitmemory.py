"""A model unit's memory (now, peak) as its cgroup counts it, read where it costs least.

Asked of every running model at every tick. Under cgroup v2 the kernel's own files are
read (memory.current, memory.peak): no D-Bus call, which would stall the event loop for its
round trip (pystemd holds the GIL through it), and a peak even where systemd has no
MemoryPeak (before 256: Debian 12's 252), so that a load's short-lived buffers between two
samples are seen. Elsewhere systemd is asked (under cgroup v1 it accounts nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamad.systemd import bus
from llamad.systemd.bus import UnitError

CGROUP_ROOT = Path("/sys/fs/cgroup")
SERVICE_IFACE = b"org.freedesktop.systemd1.Service"


def known_bytes(value: Any) -> int | None:
    # systemd reports "unknown" as the maximum uint64.
    return None if value is None or value >= 2**64 - 1 else int(value)


def _read(path: Path) -> int | None:
    try:
        return int(path.read_bytes())  # a few bytes of a kernel file: never blocks
    except (OSError, ValueError):
        return None


class UnitMemory:
    def __init__(self, root: Path = CGROUP_ROOT) -> None:
        self._root = root
        self._unified = (root / "cgroup.controllers").is_file()  # cgroup v2
        self._dirs: dict[str, Path] = {}  # unit -> its cgroup's directory
        self._memory_peak = True  # until this systemd says it has no MemoryPeak

    async def read(self, caller: bus.Caller, name: str) -> tuple[int | None, int | None]:
        """The unit's memory now and at its peak in bytes; None where it is not known."""
        where = self._unified and (self._dirs.get(name) or await self._cgroup(caller, name))
        if where:
            current = _read(where / "memory.current")
            if current is not None:
                return current, _read(where / "memory.peak")  # kernel 5.19 and later
            self._dirs.pop(name, None)  # stopped, or moved to another slice: ask again
        return await self._from_systemd(caller, name)

    async def _cgroup(self, caller: bus.Caller, name: str) -> Path | None:
        found = bus.to_str(await _get(caller, name, "ControlGroup"))
        if not isinstance(found, str) or not found.startswith("/"):
            return None  # not running: no cgroup
        where = self._dirs[name] = self._root / found.lstrip("/")
        return where

    async def _from_systemd(self, caller: bus.Caller,
                            name: str) -> tuple[int | None, int | None]:
        # Two Gets: a sixth of what status()'s two GetAlls of ~300 properties cost.
        current = known_bytes(await _get(caller, name, "MemoryCurrent"))
        if current is None or not self._memory_peak:
            return current, None
        try:
            return current, known_bytes(await _get(caller, name, "MemoryPeak"))
        except UnitError as e:
            if "MemoryPeak" not in str(e):
                raise
            self._memory_peak = False  # this systemd has none: do not ask again
            return current, None


async def _get(caller: bus.Caller, name: str, prop: str) -> Any:
    return await caller.call(bus.unit_path(name), bus.PROPS_IFACE, b"Get",
                             bus.args(b"ss", [SERVICE_IFACE, prop]))
