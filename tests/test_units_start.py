"""UnitManager.start_transient against a scripted systemd: the races of a unit name that
is still loaded when a new unit of that name is made."""

from __future__ import annotations

from typing import Any

from llamad.systemd.bus import UnitError
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

    def __init__(self, **table: int | str) -> None:
        self.table = table
        self.asked: list[str] = []

    async def call(self, path: bytes, iface: bytes, method: bytes, argv: Any,
                   again: bool = True) -> int:
        assert method == b"Get"
        prop = argv[-1][1].decode()  # apply_signature's (type, value) pairs
        self.asked.append(prop)
        value = self.table[prop]
        if isinstance(value, str):
            raise UnitError(value)
        return value

    def close(self) -> None:
        pass


async def test_memory_asks_for_two_properties_and_copes_without_a_peak(subtests) -> None:  # type: ignore[no-untyped-def]
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
            assert [await units.memory(unit), await units.memory(unit)] == want
            assert systemd.asked == asked


async def test_memory_passes_on_other_errors() -> None:
    """A unit gone meanwhile is the sampler's to handle (it falls back to the process)."""
    units = UnitManager(lambda name, props: None)
    units._caller = Properties(  # type: ignore[assignment]
        MemoryCurrent=300, MemoryPeak="org.freedesktop.systemd1.NoSuchUnit: Unit m not loaded.")
    try:
        await units.memory("llama-server@m.service")
    except UnitError as e:
        assert "NoSuchUnit" in str(e)
    else:
        raise AssertionError("a unit that went away must not read as no MemoryPeak")
