"""Watch model directories with watchdog and rescan the catalog after changes settle.

watchdog calls back on its own thread; the handler only pokes the event loop with
call_soon_threadsafe. On the loop, each poke restarts a short debounce timer, so a
burst of events (a copy, a rename, a deleted directory) becomes one rescan.

A directory that is not there (not made yet, removed, its drive not mounted yet) is
watched from the nearest directory above it that is, for the one step towards it; after
each scan the watches follow what exists, so it is seen once it appears, without a restart.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path
from types import TracebackType

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from llamad.catalog.catalog import Catalog
from llamad.config import cache_dir

log = logging.getLogger("llamad.watcher")

DEBOUNCE_SECONDS = 0.5
# How often a directory that is there but cannot be watched (the inotify watch limit
# reached) is scanned instead: rarely, since each scan lists every directory.
POLL_SECONDS = 30.0
# Reads (our own header scans included) must not trigger rescans; newer watchdog
# versions report opens and read-only closes, 2.2 does not. A touch is an attribute
# change: 2.2 reports it as "modified", newer versions as "attrib".
_CHANGES = frozenset({"created", "deleted", "modified", "moved", "closed", "attrib"})


# A directory as watched: its path, recursively or not, and which directory that path
# named then (device, inode): one removed and made again needs a new watch.
Place = tuple[Path, bool, tuple[int, int]]
# The paths in a watched directory whose events count; None: all of them.
Only = frozenset[str] | None


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: CatalogWatcher, root: Path, only: Only) -> None:
        super().__init__()
        self.watcher = watcher
        self.root = str(root)
        self.only = only
        # watchdog ends a watch whose directory is removed; one made again under the same
        # name (often with the same inode number) needs a new one.
        self.ended = False

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _CHANGES:
            return
        paths = {str(event.src_path), str(getattr(event, "dest_path", "") or "")}
        if event.event_type == "deleted" and str(event.src_path) == self.root:
            self.ended = True
        elif self.only is not None and not self.only & paths:
            return
        self.watcher.loop.call_soon_threadsafe(self.watcher.poke)


def _place(directory: Path, recursive: bool, only: Path | None) -> tuple[Place, Path | None]:
    """Where to watch for `directory`: itself, or while it is missing the nearest
    directory above it, for the step towards it alone."""
    while not directory.is_dir() and directory.parent != directory:
        directory, recursive, only = directory.parent, False, directory
    st = directory.stat()
    return (directory, recursive, (st.st_dev, st.st_ino)), only


class CatalogWatcher:
    """`async with CatalogWatcher(catalog): ...` keeps the catalog in step with the disk.

    start() does a first scan, so the catalog is complete once it returns.
    """

    def __init__(self, catalog: Catalog, loop: asyncio.AbstractEventLoop | None = None,
                 debounce: float = DEBOUNCE_SECONDS, poll: float = POLL_SECONDS) -> None:
        self.catalog = catalog
        self._loop = loop
        self.debounce = debounce
        self.poll = poll
        # Directories there but not watched (told once each): scanned every `poll` seconds.
        self._unwatched: set[Path] = set()
        self._observer: BaseObserver | None = None
        self._watches: dict[Place, tuple[_Handler, ObservedWatch]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._again = False
        # rescan_now() callers, told when a scan that began after their call has ended.
        self._waiting: list[asyncio.Future[None]] = []

    def _watched(self) -> list[tuple[Path, bool, Path | None]]:
        """(directory, recursive, only this file) for everything the catalog reads."""
        config = self.catalog.config
        out: list[tuple[Path, bool, Path | None]] = [(d, True, None) for d in config.models_dirs]
        cache = cache_dir(config)
        if config.llama_cache and cache is not None:
            out.append((cache, True, None))
        if config.ollama_models is not None:  # a manifest comes once its blobs are whole
            out.append((config.ollama_models / "manifests", True, None))
        if config.models_preset is not None:
            out.append((config.models_preset.parent, False, config.models_preset))
        return out

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def start(self) -> None:
        _ = self.loop  # bind to the running loop before watchdog's thread needs it
        observer = Observer()
        observer.daemon = True
        observer.start()
        self._observer = observer
        await self._follow_disk()
        await self.catalog.rescan_async()
        self._follow_up()

    def _wanted(self) -> dict[Place, Only]:
        wanted: dict[Place, Only] = {}
        for directory, recursive, only in self._watched():
            try:
                place, step = _place(directory, recursive, only)
            except OSError:  # gone between the check and the stat: the next scan retries
                continue
            if place in wanted:  # two things watched from one place
                had = wanted[place]
                wanted[place] = None if had is None or step is None else had | {str(step)}
            else:
                wanted[place] = None if step is None else frozenset({str(step)})
        return wanted

    def _sync(self) -> bool:
        """Make the observer's watches what _wanted() says (in a worker thread: a
        recursive watch walks its tree). True if something is newly watched, whose
        contents may predate the watch."""
        observer, wanted = self._observer, self._wanted()
        if observer is None:
            return False
        for place, (handler, watch) in list(self._watches.items()):
            if place not in wanted or wanted[place] != handler.only or handler.ended:
                observer.unschedule(watch)
                del self._watches[place]
        self._unwatched &= {directory for directory, _, _ in wanted}
        again = False
        for place in [p for p in wanted if p not in self._watches]:
            again |= self._schedule(observer, place, wanted[place])
        return again

    def _schedule(self, observer: BaseObserver, place: Place, only: Only) -> bool:
        """Watch `place`. True if a scan should follow at once: it is newly watched, or
        it went away meanwhile (that scan then watches what is there instead)."""
        directory, recursive, _ = place
        handler = _Handler(self, directory, only)
        try:
            watch = observer.schedule(handler, str(directory), recursive=recursive)
        except (FileNotFoundError, NotADirectoryError) as e:
            log.debug("cannot watch %s yet: %s", directory, e)
            return True
        except OSError as e:
            # Most often the inotify watch limit: it stays reached, and a scan at once to
            # try again would rescan every debounce for ever. Poll instead (_follow_up).
            if directory not in self._unwatched:
                log.warning("cannot watch %s (%s); scanning it every %.0f s instead%s",
                            directory, e.strerror, self.poll,
                            " (raise fs.inotify.max_user_watches)"
                            if e.errno == errno.ENOSPC else "")
            self._unwatched.add(directory)
            return False
        self._unwatched.discard(directory)
        self._watches[place] = (handler, watch)
        return True

    async def _follow_disk(self) -> bool:
        return await self.loop.run_in_executor(None, self._sync)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        observer, self._observer = self._observer, None  # and _sync() leaves it alone
        if observer is not None:
            observer.stop()
            await self.loop.run_in_executor(None, observer.join)
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def __aenter__(self) -> CatalogWatcher:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def poke(self, delay: float | None = None) -> None:
        """Something changed: rescan once things have been quiet for the debounce time."""
        if self._observer is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self.debounce if delay is None else delay,
                                           self._fire)

    async def rescan_now(self) -> None:
        """Return once a scan that began after this call has been published; concurrent
        callers share one. For a request naming a model whose file may just have arrived."""
        done = self.loop.create_future()
        self._waiting.append(done)
        if self._timer is not None:
            self._timer.cancel()
        self._fire()
        await done

    def _fire(self) -> None:
        self._timer = None
        if self._task is not None and not self._task.done():
            self._again = True  # rescan again when the running one ends
            return
        self._task = self.loop.create_task(self._rescan(), name="rescanning the catalog")

    async def _rescan(self) -> None:
        waiting, self._waiting = self._waiting, []
        try:
            await self.catalog.rescan_async()
            if await self._follow_disk():
                self.poke()  # what arrived before its watch did is read by one more scan
        except Exception:
            # A failed scan must not stop watching; the next change tries again.
            log.exception("catalog rescan failed")
        finally:
            for done in waiting:  # whatever happened, no request waits for ever
                if not done.done():
                    done.set_result(None)
        if self._again:
            self._again = False
            # Someone waits for a scan that starts after theirs: now, not after the debounce.
            self.poke(0 if self._waiting else None)
        self._follow_up()

    def _follow_up(self) -> None:
        if self._timer is not None:
            return
        if self.catalog.snapshot.pending:
            # A file that looked unfinished sends no more events once it is done.
            self.poke(self.catalog.settle + self.debounce)
        elif self._unwatched:
            self.poke(self.poll)  # nothing would tell of their changes
