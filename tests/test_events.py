"""The transition table: docs/design.md shows the one events.TRANSITIONS enforces."""

from __future__ import annotations

import re
from pathlib import Path

from llamad.supervisor.events import TRANSITIONS, Cause, Change, Hub, State

DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"


def documented() -> dict[State, frozenset[State]]:
    text = DESIGN.read_text()
    table = text.split("| from | to |", 1)[1].split("\n\n", 1)[0]
    out = {}
    for row in table.splitlines()[2:]:
        source, targets = (cell.strip() for cell in row.strip("|").split("|"))
        out[State(source.strip("`"))] = frozenset(
            State(name) for name in re.findall(r"`(\w+)`", targets))
    return out


def test_design_shows_the_enforced_table() -> None:
    assert documented() == TRANSITIONS


def test_a_broken_listener_does_not_silence_the_others() -> None:
    hub = Hub()
    heard: list[Change] = []

    def broken(change: Change) -> None:
        raise RuntimeError("bug")
    hub.subscribe(broken)
    unsubscribe = hub.subscribe(heard.append)
    change = Change("m", State.UNLOADED, State.STARTING, Cause.LOAD)
    hub.emit(change)
    unsubscribe()
    hub.emit(change)
    assert heard == [change]
