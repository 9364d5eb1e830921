"""The integration tests' way to run llamad (`llamad_factory`), and a second box."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import rig
from helpers.daemon import Factory, Llamad, wait_http


@pytest.fixture(scope="session")
def second_box() -> Iterator[rig.Box]:
    """Another machine: a box of its own, sharing the host's network (each plays a host on
    a loopback address of its own, e.g. 127.0.0.3)."""
    reason = rig.missing_requirements()
    if reason:
        pytest.fail(reason)
    with rig.Box() as b:
        yield b


@pytest.fixture
def llamad_factory(box: rig.Box, assets: rig.Assets) -> Iterator[Factory]:
    """Start llamads; every one is stopped, with its model units, afterwards, and its log
    checked for tracebacks. Every llamad a test runs comes from here."""
    made: list[Llamad] = []

    def make(names: list[str], preset: str = "", unit: tuple[str, ...] = (), *,
             host: str = "127.0.0.1", in_box: rig.Box | None = None, sandbox: bool = False,
             socket: bool = False, start: bool = True, healthy: bool = True,
             tracebacks_after: tuple[str, ...] = (), **settings: Any) -> Llamad:
        """`unit`: more systemd properties of llamad's own unit, such as Restart=;
        `host`: the loopback address it listens on; `in_box`: another box than the
        session's; `sandbox`: run in the shipped unit's sandbox (helpers.daemon.SANDBOX);
        `socket`: socket-activated (not started: the first connection starts it);
        `start=False`: configured only, the test starts it; `healthy=False`: started, and
        waited for until /health answers at all (not necessarily 200); `tracebacks_after`:
        log messages that a test provokes and Python logs with a traceback, not counted as
        llamad's; `settings`: llamad.conf keys."""
        where = in_box or box
        d = Llamad(where, assets if in_box is None else rig.Assets(where.workdir), names,
                   preset, host, **settings)
        if sandbox:
            d.sandbox()
        d.properties += unit
        d.tracebacks_after = tracebacks_after
        made.append(d)
        if socket:
            d.listen()
        elif start:
            d.start()
            wait_http(d.url, want=200 if healthy else None)
        return d
    yield make
    for d in made:
        d.cleanup()
    for d in made:
        # A bug, even where the test's own assertions passed.
        unexpected = d.unexpected_tracebacks()
        assert not unexpected, f"a traceback in the log of {d.unit}:\n{unexpected[-5000:]}"
