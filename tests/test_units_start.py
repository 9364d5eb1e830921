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
