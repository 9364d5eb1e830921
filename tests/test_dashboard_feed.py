"""The dashboard's feed: what each event carries, with systemd faked at the Units boundary
(the real thing runs on the box in tests/integration/test_dashboard.py and test_browser.py)."""

from __future__ import annotations

import json
import os
from typing import Any

from helpers.ggufgen import write_model
from helpers.supervised import Rig

from llamad.api.dashboard import Feed
from llamad.catalog.catalog import scan
from llamad.config import Config
from llamad.supervisor.events import Cause, State


def events(data: bytes) -> list[tuple[str, Any]]:
    out = []
    for block in data.decode().split("\n\n"):
        if block:
            kind, payload = block.split("\n")
            out.append((kind.removeprefix("event: "), json.loads(payload.removeprefix("data: "))))
    return out


async def test_state_changes_and_catalog_changes_reach_the_page(tiny_config: Config) -> None:
    sup = Rig(tiny_config).sup
    feed = Feed(sup)
    sup.events.subscribe(feed.on_change)
    data, ids = feed.hello()
    [(kind, hello)] = events(data)
    assert kind == "hello" and hello["ids"] == ids == ["tiny"]
    assert hello["machine"]["ram"]["total"] > 0
    [(kind, batch)] = events(feed.batch(ids))
    assert kind == "models" and [(m["id"], m["state"]) for m in batch] == [("tiny", "unloaded")]
    assert batch[0]["estimate"]["ram"] > 0 and batch[0]["unit"] == "llama-server@tiny.service"

    slot = sup.slots["tiny"]
    sup.move(slot, State.STARTING, Cause.LOAD)
    sup.move(slot, State.LOADING, Cause.ACTIVE)
    assert feed.wake.is_set()
    # Two moves between writes: the page gets the model once, as it is now.
    assert [(k, m["state"]) for k, m in events(feed.changes())] == [("model", "loading")]
    assert feed.changes() == b""

    # Loaded models come with every `figures`; models that join are sent in full apart.
    data, added = feed.figures()
    [(kind, figures)] = events(data)
    assert kind == "figures" and [m["id"] for m in figures["models"]] == ["tiny"]
    assert added == [] and figures["removed"] == []
    models_dir = tiny_config.models_dirs[0]
    os.utime(write_model(models_dir / "other.gguf"), (0, 0))
    sup.update_snapshot(scan(tiny_config))
    data, added = feed.figures()
    assert added == ["other"] and [m["id"] for m in events(data)[0][1]["models"]] == ["tiny"]
    (models_dir / "other.gguf").unlink()
    sup.update_snapshot(scan(tiny_config))
    data, added = feed.figures()
    assert events(data)[0][1]["removed"] == ["other"] and added == []
    await sup.close()


async def test_runtime_pin_overrides_the_preset(tiny_config: Config) -> None:
    sup = Rig(tiny_config).sup
    slot = sup.slots["tiny"]
    assert not slot.pinned
    sup.set_pin(slot, True)
    assert slot.pinned and sup.views(slot)["tiny"].pinned
    sup.set_pin(slot, False)
    assert not slot.pinned
    await sup.close()
