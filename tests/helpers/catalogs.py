"""Model directories and catalogs for the tests: files aged past the settle window,
configurations over directories, and a feed of the snapshots a catalog publishes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from helpers import ggufgen
from helpers.watch import Watch
from llamad.catalog.catalog import Catalog, Snapshot
from llamad.config import Config

SETTLE = 0.6
DEBOUNCE = 0.2


def age(root: Path, seconds: float = 60) -> None:
    """Make files look finished: older than the settle window."""
    then = time.time() - seconds
    for p in root.rglob("*"):
        if p.exists():
            os.utime(p, (then, then))


def config(*dirs: Path, cache: Path | None = None, **kw: object) -> Config:
    kw.setdefault("llama_cache", cache is not None)
    return Config.default(models_dirs=dirs, llama_cache_dir=cache, models_preset=None, **kw)


def problems_about(snap: Snapshot, word: str) -> list[str]:
    return [p for p in snap.problems if word in p]


class Feed:
    """Records every snapshot the catalog publishes with a change in it, for assertions."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.snapshots: list[Snapshot] = []
        self.watch = Watch()
        catalog.subscribe(self._published)

    def _published(self, old: Snapshot, new: Snapshot) -> None:
        self.snapshots.append(new)
        self.watch.poke()

    async def until(self, check: Callable[[Snapshot], bool], timeout: float = 10) -> Snapshot:
        """The current snapshot once `check` holds for it (checked at each change)."""
        await self.watch.until("the catalog to change so",
                               lambda: check(self.catalog.snapshot), timeout)
        return self.catalog.snapshot


def make_catalog(d: Path, preset: Path | None = None) -> Catalog:
    config = Config.default(models_dirs=(d,), llama_cache=False, models_preset=preset)
    return Catalog(config, settle=SETTLE)


def aged_model(path: Path) -> Path:
    ggufgen.write_model(path)
    os.utime(path, (1, 1_000_000_000))
    return path
