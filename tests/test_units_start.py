"""UnitManager.start_transient against a scripted systemd: the races of a unit name that
is still loaded when a new unit of that name is made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamad.systemd import bus
from llamad.systemd.bus import UnitError
from llamad.systemd.unitmemory import UnitMemory
from llamad.systemd.units import UnitManager


class Systemd:
    """Answers manager calls from a script: method -> errors to raise, in turn."""

    def __init__(self, **script: list[str]) -> None:
        self.script = script
        self.calls: list[str] = []

    async def manager(self, method: bytes, argv: Any, again: bool = True) -> None:
        name = method.decode()
        self.calls.append(name)
        errors = self.script.get(name, [])
        if errors:
            raise UnitError(errors.pop(0))

    def close(self) -> None:
        pass


async def test_a_unit_collected_between_exists_and_stop_is_started() -> None:
    """StartTransientUnit says the unit exists; by the StopUnit that makes systemd look
    again it has been collected ("not loaded"): the next try starts it (the soak lost
    requests to this race: the model failed with "systemd refused to start")."""
    systemd = Systemd(
        StartTransientUnit=["[err -17]: org.freedesktop.systemd1.UnitExists: Unit "
                            "llama-server@m.service was already loaded"],
        StopUnit=["[err -2]: b'Unit llama-server@m.service not loaded.'"])
    units = UnitManager(lambda name, props: None)
    units._caller = systemd  # type: ignore[assignment]
    await units.start_transient("llama-server@m.service", [])
    assert systemd.calls == ["ResetFailedUnit", "StartTransientUnit", "StopUnit",
                             "StartTransientUnit"]


async def test_a_refused_stop_is_still_an_error() -> None:
    systemd = Systemd(StartTransientUnit=["org.freedesktop.systemd1.UnitExists: loaded"],
                      StopUnit=["org.freedesktop.DBus.Error.AccessDenied: no"])
    units = UnitManager(lambda name, props: None)
    units._caller = systemd  # type: ignore[assignment]
    try:
        await units.start_transient("llama-server@m.service", [])
    except UnitError as e:
        assert "AccessDenied" in str(e)
    else:
        raise AssertionError("a stop systemd refuses must not pass for success")


async def test_a_start_no_longer_wanted_stops_nothing() -> None:
    """A start still retrying an existing name when its model has moved on (unloaded, and a
    newer start made the unit since) must not stop that unit: two starts that stop each
    other's units started and stopped llama-server every 20 ms in the soak."""
    systemd = Systemd(StartTransientUnit=["org.freedesktop.systemd1.UnitExists: loaded"] * 3)
    wanted = iter([True, False])
    units = UnitManager(lambda name, props: None)
    units._caller = systemd  # type: ignore[assignment]
    await units.start_transient("llama-server@m.service", [], wanted=lambda: next(wanted))
    assert systemd.calls == ["ResetFailedUnit", "StartTransientUnit", "StopUnit"]


class Properties:
    """Answers Properties.Get from a table: a value, or an error's text to raise."""

    def __init__(self, **table: int | str | bytes) -> None:
        self.table = table
        self.asked: list[str] = []

    async def call(self, path: bytes, iface: bytes, method: bytes, argv: Any,
                   again: bool = True) -> int | bytes:
        assert method == b"Get"
        prop = argv[-1][1].decode()  # apply_signature's (type, value) pairs
        self.asked.append(prop)
        value = self.table[prop]
        if isinstance(value, str):
            raise UnitError(value)
        return value

    def close(self) -> None:
        pass


async def test_memory_asks_for_two_properties_and_copes_without_a_peak(  # type: ignore[no-untyped-def]
        subtests, tmp_path: Path) -> None:
    """memory() asks systemd for MemoryCurrent and MemoryPeak alone, not the ~300 properties
    of status(). systemd before 256 (Debian 12's 252, on a cgroup v2 host) has no MemoryPeak:
    its error (the text below is what 252 answers) is taken once, and not asked again.
    Under cgroup v1 MemoryCurrent is unset (the maximum uint64) and nothing more is asked."""
    unit = "llama-server@m.service"
    no_peak = ("[err -53]: Unknown interface org.freedesktop.systemd1.Service or property "
               "MemoryPeak.")
    Case = tuple[str, dict[str, int | str], list[tuple[int | None, int | None]], list[str]]
    cases: list[Case] = [
        ("systemd 256+", {"MemoryCurrent": 300, "MemoryPeak": 500}, [(300, 500)] * 2,
         ["MemoryCurrent", "MemoryPeak"] * 2),
        ("systemd 252, cgroup v2", {"MemoryCurrent": 300, "MemoryPeak": no_peak},
         [(300, None)] * 2, ["MemoryCurrent", "MemoryPeak", "MemoryCurrent"]),
        ("cgroup v1", {"MemoryCurrent": 2**64 - 1}, [(None, None)] * 2, ["MemoryCurrent"] * 2)]
    for name, table, want, asked in cases:
        with subtests.test(name):
            systemd = Properties(**table)
            units = UnitManager(lambda name, props: None)
            units._caller = systemd  # type: ignore[assignment]
            units._memory = UnitMemory(root=tmp_path)  # no cgroup v2 there: systemd asked
            assert [await units.memory(unit), await units.memory(unit)] == want
            assert systemd.asked == asked


async def test_memory_passes_on_other_errors(tmp_path: Path) -> None:
    """A unit gone meanwhile is the sampler's to handle (it falls back to the process)."""
    units = UnitManager(lambda name, props: None)
    units._memory = UnitMemory(root=tmp_path)
    units._caller = Properties(  # type: ignore[assignment]
        MemoryCurrent=300, MemoryPeak="org.freedesktop.systemd1.NoSuchUnit: Unit m not loaded.")
    try:
        await units.memory("llama-server@m.service")
    except UnitError as e:
        assert "NoSuchUnit" in str(e)
    else:
        raise AssertionError("a unit that went away must not read as no MemoryPeak")


class Listing:
    """systemd's ListUnitsByPatterns, GetAll and Get for a table of units, counted."""

    def __init__(self) -> None:
        self.units: dict[str, dict[str, Any]] = {}
        self.asked: list[str] = []

    async def manager(self, method: bytes, argv: Any, again: bool = True) -> Any:
        assert method == b"ListUnitsByPatterns"
        self.asked.append("List")
        return [(name.encode(), b"", b"loaded", p["ActiveState"].encode(),
                 p["SubState"].encode(), b"", b"", p["Job"][0], b"", b"")
                for name, p in self.units.items()]

    async def call(self, path: bytes, iface: bytes, method: bytes, argv: Any,
                   again: bool = True) -> Any:
        props = self.units[bus.unit_name(path)]
        self.asked.append(method.decode())
        if method == b"Get":
            return props[argv[-1][1].decode()]
        return {k.encode(): v for k, v in props.items()}  # both interfaces in one table

    def close(self) -> None:
        pass


def _unit(invocation: bytes, active: str = "active", job: int = 0) -> dict[str, Any]:
    return {"ActiveState": active, "SubState": "running", "Job": (job, b"/"),
            "InvocationID": list(invocation), "MainPID": 7, "Environment": [b"LLAMAD_MANAGED=1"]}


async def test_list_ours_reads_a_unit_again_only_when_it_changed() -> None:
    """Reconcile lists the model units every few seconds. pystemd holds the GIL through a
    call, so two GetAlls (~300 properties) per unit per round stalled every request in
    flight by ~3 ms per loaded model; an unchanged unit now costs one Get."""
    systemd = Listing()
    units = UnitManager(lambda name, props: None)
    units._caller = systemd  # type: ignore[assignment]
    a, b = "llama-server@a.service", "llama-server@b.service"
    systemd.units = {a: _unit(b"\x01"), b: _unit(b"\x02")}

    async def listed() -> dict[str, tuple[str, str, int]]:
        systemd.asked.clear()
        return {s.name: (s.active_state, s.invocation_id, s.job) for s in await units.list_ours()}

    assert await listed() == {a: ("active", "01", 0), b: ("active", "02", 0)}
    assert systemd.asked == ["List"] + ["GetAll", "GetAll"] * 2
    assert await listed() == {a: ("active", "01", 0), b: ("active", "02", 0)}
    assert systemd.asked == ["List", "Get", "Get"]
    # Restarted behind llamad's back (a new invocation), a job queued, stopping, gone.
    systemd.units = {a: _unit(b"\x03"), b: _unit(b"\x02", job=9)}
    assert await listed() == {a: ("active", "03", 0), b: ("active", "02", 9)}
    assert systemd.asked == ["List", "Get", "GetAll", "GetAll", "GetAll", "GetAll"]
    systemd.units = {a: _unit(b"\x03", active="deactivating")}
    assert await listed() == {a: ("deactivating", "03", 0)}
    assert systemd.asked == ["List", "GetAll", "GetAll"]


async def test_memory_under_cgroup_v2_is_read_from_the_cgroups_files(tmp_path: Path) -> None:
    """Under cgroup v2 the kernel's memory.current and memory.peak are read: no D-Bus call
    at every tick (each stalls the event loop for its round trip), and a peak where systemd
    has none (252, Debian 12's). The cgroup is asked for once; a unit moved to another slice
    (its directory gone) is asked for again, systemd answering meanwhile."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    unit = "llama-server@m.service"
    where = tmp_path / "llama.slice" / unit
    where.mkdir(parents=True)
    (where / "memory.current").write_text("300\n")
    (where / "memory.peak").write_text("500\n")
    systemd = Properties(ControlGroup=f"/llama.slice/{unit}".encode(), MemoryCurrent=301,
                         MemoryPeak="[err -53]: Unknown property MemoryPeak.")
    units = UnitManager(lambda name, props: None)
    units._caller = systemd  # type: ignore[assignment]
    units._memory = UnitMemory(root=tmp_path)
    assert [await units.memory(unit), await units.memory(unit)] == [(300, 500)] * 2
    assert systemd.asked == ["ControlGroup"]
    (where / "memory.peak").unlink()  # a kernel before 5.19
    assert await units.memory(unit) == (300, None)
    systemd.asked.clear()
    (where / "memory.current").unlink()
    systemd.table["ControlGroup"] = f"/other.slice/{unit}".encode()
    assert await units.memory(unit) == (301, None)
    assert systemd.asked == ["MemoryCurrent", "MemoryPeak"]
    moved = tmp_path / "other.slice" / unit
    moved.mkdir(parents=True)
    (moved / "memory.current").write_text("700\n")
    assert await units.memory(unit) == (700, None)
    assert systemd.asked == ["MemoryCurrent", "MemoryPeak", "ControlGroup"]
