"""Model files changing under a running llamad: rewritten, removed, a directory gone, a
file copied in and requested at once. The catalog's side (the supervisor's is in
test_supervisor.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import ggufgen
from helpers.catalogs import age, config, problems_about

from llamad.catalog.catalog import may_appear, scan
from llamad.catalog.gguf_info import InfoCache


def test_a_known_model_being_rewritten_keeps_its_entry(tmp_path: Path) -> None:
    d = tmp_path / "models"
    ggufgen.write_model(d / "m.gguf")
    age(d)
    first = scan(config(d), cache=InfoCache())
    ggufgen.write_model(d / "m.gguf", context=8192)  # cp over it: fresh, maybe half-written
    during = scan(config(d), cache=InfoCache(), previous=first)
    assert during.models["m"] is first.models["m"] and during.pending
    assert "m" not in during.settling
    age(d)
    after = scan(config(d), cache=InfoCache(), previous=during)
    assert after.models["m"].info is not None and after.models["m"].info.context_length == 8192


def test_a_new_file_being_written_is_settling(tmp_path: Path) -> None:
    d = tmp_path / "models"
    ggufgen.write_model(d / "old.gguf")
    age(d)
    ggufgen.write_model(d / "new.gguf")
    snap = scan(config(d), cache=InfoCache(), previous=scan(config(d), cache=InfoCache()))
    assert snap.settling == {"new"} and "new" not in snap.models
    age(d)
    assert not scan(config(d), cache=InfoCache(), previous=snap).settling


def test_a_models_directory_that_disappears_keeps_its_models(tmp_path: Path) -> None:
    d, other = tmp_path / "models", tmp_path / "other"
    ggufgen.write_model(d / "a.gguf")
    ggufgen.write_model(other / "b.gguf")
    age(tmp_path)
    first = scan(config(d, other), cache=InfoCache())
    shutil.rmtree(d)
    gone = scan(config(d, other), cache=InfoCache(), previous=first)
    assert sorted(gone.models) == ["a", "b"]
    assert problems_about(gone, "has gone; keeping its 1 models")
    # Without a previous snapshot (llamad starting) there is nothing to keep.
    assert sorted(scan(config(d, other), cache=InfoCache()).models) == ["b"]


def test_may_appear(tmp_path: Path) -> None:
    d = tmp_path / "models"
    ggufgen.write_model(d / "here.gguf")
    (d / "dir").mkdir()
    cfg = config(d)
    assert may_appear(cfg, "here") and may_appear(cfg, "dir")
    for name in ("nothere", "../models/here", ".hidden", "", "a\0b", "x" * 300):
        assert not may_appear(cfg, name)


async def test_a_touch_is_seen_and_a_rescan_can_be_asked_for(tmp_path: Path) -> None:
    import asyncio
    import os

    from helpers.catalogs import DEBOUNCE, Feed, aged_model, make_catalog

    from llamad.catalog.watcher import CatalogWatcher

    d = tmp_path / "models"
    aged_model(d / "a.gguf")
    catalog = make_catalog(d)
    feed = Feed(catalog)
    async with CatalogWatcher(catalog, debounce=DEBOUNCE) as w:
        first = catalog.snapshot.models["a"]
        os.utime(d / "a.gguf")  # touch: an attribute change only
        later = await feed.until(lambda s: s.models["a"].created != first.created)
        assert later.models["a"].path == first.path
        # A file that arrives between two scans is found by a scan asked for now.
        aged_model(d / "b.gguf")
        await asyncio.wait_for(w.rescan_now(), 5)
        assert "b" in catalog.snapshot.models
