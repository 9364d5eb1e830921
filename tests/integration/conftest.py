"""The integration tests' way to run llamad: `llamad_factory(models, preset=, **config)`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import rig
from llamad_fixture import Factory, Llamad, wait_http


@pytest.fixture
def llamad_factory(box: rig.Box, assets: rig.Assets) -> Iterator[Factory]:
    """Start llamads in the box; every one is stopped, with its model units, afterwards,
    and its log checked for tracebacks."""
    made: list[Llamad] = []

    def make(names: list[str], preset: str = "", unit: tuple[str, ...] = (),
             healthy: bool = True, **settings: Any) -> Llamad:
        """`unit`: more systemd properties of llamad's own unit, such as Restart=.
        `healthy`: wait until /health answers 200 (else until it answers at all)."""
        d = Llamad(box, assets, names, preset, **settings)
        d.properties += unit
        made.append(d)
        d.start()
        wait_http(d.url, want=200 if healthy else None)
        return d
    yield make
    for d in made:
        d.cleanup()
    for d in made:
        # A traceback in llamad's log is a bug (an illegal state change raises one), even
        # where the test's own assertions passed.
        assert "Traceback" not in d.log(), d.log()[-5000:]
