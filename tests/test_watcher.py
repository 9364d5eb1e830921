"""Real watchdog events on a real directory: slow copies, renames, deletions, presets."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import ggufgen
from helpers.catalogs import DEBOUNCE, Feed, aged_model, make_catalog

from llamad.catalog.catalog import Catalog, Snapshot
from llamad.catalog.watcher import CatalogWatcher


async def test_start_scans_and_stop_ends_the_observer(tmp_path: Path) -> None:
    aged_model(tmp_path / "a.gguf")
    catalog = make_catalog(tmp_path)
    async with CatalogWatcher(catalog, debounce=DEBOUNCE) as w:
        assert set(catalog.snapshot.models) == {"a"}
        observer = w._observer
        assert observer is not None and observer.is_alive()
    assert not observer.is_alive()


async def test_slow_copy_appears_only_when_complete(tmp_path: Path) -> None:
    src = ggufgen.write_model(tmp_path / "src.gguf", rows=512)
    models = tmp_path / "models"
    models.mkdir()
    catalog = make_catalog(models)
    feed = Feed(catalog)
    scans = 0
    compute = catalog.compute

    def counting() -> Snapshot:
        nonlocal scans
        scans += 1
        return compute()

    catalog.compute = counting  # type: ignore[method-assign]
    async with CatalogWatcher(catalog, debounce=DEBOUNCE):
        # Pauses longer than the debounce, so scans happen while the file is half there.
        copy = asyncio.get_running_loop().run_in_executor(
            None, ggufgen.copy_slowly, src, models / "slow.gguf", 6, DEBOUNCE * 2)
        await copy
        scans_while_copying = scans
        snap = await feed.until(lambda s: "slow" in s.models)
    assert scans_while_copying >= 3  # the start scan plus scans of the half-written file
    info = snap.models["slow"].info
    assert info is not None and info.size == src.stat().st_size
    assert all(m.info is not None and m.info.size == src.stat().st_size
               for s in feed.snapshots for m in s.models.values())


async def test_rename_is_one_change_and_delete_removes(tmp_path: Path) -> None:
    aged_model(tmp_path / "old.gguf")
    catalog = make_catalog(tmp_path)
    feed = Feed(catalog)
    async with CatalogWatcher(catalog, debounce=DEBOUNCE):
        (tmp_path / "old.gguf").rename(tmp_path / "new.gguf")
        await feed.until(lambda s: "new" in s.models)
        assert [set(s.models) for s in feed.snapshots] == [{"old"}, {"new"}]
        (tmp_path / "new.gguf").unlink()
        await feed.until(lambda s: not s.models)


async def test_directory_moved_in_and_removed(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    staging = tmp_path / "staging" / "Big"
    ggufgen.write_split(staging, "big", 2)
    ggufgen.write_mmproj(staging / "mmproj.gguf")
    for p in staging.iterdir():
        os.utime(p, (1, 1_000_000_000))
    catalog = make_catalog(models)
    feed = Feed(catalog)
    async with CatalogWatcher(catalog, debounce=DEBOUNCE):
        staging.rename(models / "Big")
        snap = await feed.until(lambda s: "Big" in s.models)
        assert snap.models["Big"].mmproj is not None and len(snap.models["Big"].shards) == 2
        shutil.rmtree(models / "Big")
        await feed.until(lambda s: "Big" not in s.models)


async def test_preset_edit_triggers_rescan(tmp_path: Path) -> None:
    models = tmp_path / "models"
    aged_model(models / "a.gguf")
    preset = tmp_path / "etc" / "presets.ini"
    preset.parent.mkdir()
    preset.write_text("[a]\nc = 1024\n")
    catalog = make_catalog(models, preset)
    feed = Feed(catalog)
    async with CatalogWatcher(catalog, debounce=DEBOUNCE):
        assert "1024" in catalog.snapshot.models["a"].settings.args
        preset.write_text("[a]\nc = 2048\nalias = first\n")
        snap = await feed.until(lambda s: s.resolve("first") is not None)
        assert "2048" in snap.models["a"].settings.args
        preset.write_text("[a]\nbogus = 1\n")  # broken: keep the last good presets
        aged_model(models / "b.gguf")
        snap = await feed.until(lambda s: "b" in s.models)
        assert snap.resolve("first") is snap.models["a"]
        assert "2048" in snap.models["a"].settings.args


async def test_a_models_directory_made_after_the_start_is_followed(tmp_path: Path) -> None:
    # A directory llamad was told about but that is not there yet (made later, a drive
    # mounted later under a path made then): watched from the nearest directory above it.
    models = tmp_path / "srv" / "llm" / "models"
    catalog = make_catalog(models)
    feed = Feed(catalog)
    async with CatalogWatcher(catalog, debounce=DEBOUNCE):
        assert not catalog.snapshot.models
        models.mkdir(parents=True)
        aged_model(models / "late.gguf")
        await feed.until(lambda s: "late" in s.models)
        aged_model(models / "later.gguf")  # and the directory itself is now watched
        await feed.until(lambda s: "later" in s.models)


async def test_a_models_directory_removed_and_made_again_is_followed(tmp_path: Path) -> None:
    models = tmp_path / "models"
    aged_model(models / "a.gguf")
    catalog = make_catalog(models)
    feed = Feed(catalog)
    async with CatalogWatcher(catalog, debounce=DEBOUNCE):
        shutil.rmtree(models)
        models.mkdir()
        aged_model(models / "b.gguf")
        await feed.until(lambda s: "b" in s.models)
        # Seen through the new directory's watch: the old one ended with its directory.
        (models / "b.gguf").rename(models / "c.gguf")
        await feed.until(lambda s: "c" in s.models and "b" not in s.models)


async def test_a_directory_gone_before_its_watch_is_no_wedge(tmp_path: Path) -> None:
    # Removed between being found and being watched (the Ollama store's whole tree removed
    # while llamad follows it): watchdog's schedule raises. The scan still ends for those
    # waiting on it, and the next one watches what is there by then.
    models = tmp_path / "models"
    catalog = make_catalog(models)
    feed = Feed(catalog)
    async with CatalogWatcher(catalog, debounce=DEBOUNCE) as w:
        observer = w._observer
        assert observer is not None
        schedule, failed = observer.schedule, list[str]()

        def gone_once(handler: object, path: str, recursive: bool = False) -> object:
            if path == str(models) and not failed:
                failed.append(path)
                raise FileNotFoundError(2, "No such file or directory", path)
            return schedule(handler, path, recursive=recursive)  # type: ignore[arg-type]

        observer.schedule = gone_once  # type: ignore[method-assign,assignment]
        models.mkdir()
        await asyncio.wait_for(w.rescan_now(), 10)
        assert failed == [str(models)]
        aged_model(models / "a.gguf")  # found by the scan that retries the watch
        await feed.until(lambda s: "a" in s.models)
        aged_model(models / "b.gguf")  # seen through the directory's own watch by now
        await feed.until(lambda s: "b" in s.models)


async def test_a_full_inotify_watch_table_polls_slowly_not_busily(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # fs.inotify.max_user_watches reached (a big tree, other programs' watches): the
    # directory is there but cannot be watched. Rescanning at once to retry would rescan
    # every debounce for ever; llamad says so once and rescans at the poll interval.
    models = tmp_path / "models"
    aged_model(models / "a.gguf")
    catalog = make_catalog(models)
    scans = _count_scans(catalog)

    def full(self: object, handler: object, path: str, recursive: bool = False) -> object:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr("llamad.catalog.watcher.Observer.schedule", full)
    async with CatalogWatcher(catalog, debounce=DEBOUNCE) as w:
        loop = asyncio.get_running_loop()
        for _ in range(3):
            await asyncio.wait_for(w.rescan_now(), 10)
        assert "a" in catalog.snapshot.models
        timer = w._timer
        assert timer is not None and timer.when() - loop.time() > DEBOUNCE * 10
        assert scans() == 4  # the start's and the three asked for, no more
    told = [r for r in caplog.records if str(models) in r.getMessage()]
    assert len(told) == 1 and "inotify watch limit" in told[0].getMessage()


def _count_scans(catalog: Catalog) -> Callable[[], int]:
    count, compute = [0], catalog.compute

    def counting() -> Snapshot:
        count[0] += 1
        return compute()

    catalog.compute = counting  # type: ignore[method-assign]
    return lambda: count[0]
