"""Downloads and removals of cached models, each carried out by a systemd unit of its own
(systemd/downloadunit.py running catalog/fetch.py): what `POST /models`, `/api/pull` and
`llamad pull` start, join and watch, and `DELETE /models`, `/api/delete` and `llamad rm`.

One unit per name (`llamad-download@<name>.service`): a second request for a name being
downloaded joins the first, and llamad starts nothing twice. systemd holds the state: a
later llamad (after a restart, or an idle exit) finds the units and watches them again.
The downloader's STATUS= line (JSON) says which files, how far, and why it failed; llamad
polls it every POLL seconds while a download runs and tells its listeners (the /models/sse
feed, the streams of /api/pull). A unit ends `active (exited)` once the files are in the
cache (RemainAfterExit=), so its last status is still there to read: llamad reads it, has
the catalog rescan, then stops the unit. A failed one stays failed (with its reason) until
llamad has read it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamad.catalog import hub
from llamad.catalog.catalog import Snapshot
from llamad.catalog.hub import Name
from llamad.config import Config, cache_dir
from llamad.errors import BadRequest, LlamadError
from llamad.safetext import one_line
from llamad.systemd import downloadunit as du
from llamad.systemd.units import SERVICE_IFACE, UNIT_IFACE, UnitError, UnitManager

log = logging.getLogger("llamad.downloads")

POLL = 0.25  # seconds between looks at a running download's unit
READY_TIMEOUT = du.PLAN_TIMEOUT + 15  # a start that neither plans nor fails by then
REMOVE_TIMEOUT = 60.0
STATUS_MAX = 8192  # characters of a unit's status text read
PLAN_KEYS = ("model", "commit", "preset", "total", "files")  # the downloader's READY=1 status


class DownloadFailed(LlamadError):
    """The hub or the disk refused; the message is the downloader's own sentence."""

    status = 502
    type = "download_error"
    code = "download_failed"


@dataclass
class Download:
    """One name being downloaded, as its unit reports it."""

    name: Name
    unit: str
    status: dict[str, Any] = field(default_factory=dict)
    state: str = "starting"  # starting | downloading | finished | failed
    started: bool = False  # systemd has taken the start (or it ran already)
    error: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set and renewed on news
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> its progress

    @property
    def model(self) -> str:
        return str(self.status.get("model") or "")

    @property
    def ended(self) -> bool:
        return self.state in ("finished", "failed")

    def planned(self) -> bool:
        return "commit" in self.status

    def take(self, status: dict[str, Any]) -> bool:
        """A new status line; whether it says anything new."""
        if self.planned() and "commit" not in status:
            # A downloader systemd restarted tells its own status (none, then perhaps a
            # failure to reach the hub) before it plans again: the download stays planned,
            # or the follower would take a restart for the end (StartLimitBurst= decides).
            status = {**{k: self.status[k] for k in PLAN_KEYS if k in self.status}, **status}
        if status == self.status:
            return False
        self.status = status
        path = status.get("file")
        # A poll every POLL s misses a file's last bytes (its hash check, a small file
        # whole): the downloader names the next file only once one is in place, and its
        # "done" ends them all. Else a file's last line (Ollama's bar) stayed part-way.
        # (A restarted downloader's first lines name no file: that ends none.)
        for seen, f in self.files.items():
            if (isinstance(path, str) and seen != path) or status.get("phase") == "done":
                f["done"] = f["total"]
        if isinstance(path, str) and isinstance(status.get("file_total"), int):
            self.files[path] = {"url": status.get("url"), "oid": status.get("oid"),
                                "done": status.get("file_done", 0),
                                "total": status["file_total"]}
        if self.planned() and self.state == "starting":
            self.state = "downloading"
        return True

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        await asyncio.wait_for(self.changed.wait(), timeout)


Listener = Callable[[Download, str], None]  # (download, "progress" | "finished" | "failed")


class Downloads:
    def __init__(self, config: Config, units: UnitManager,
                 rescan: Callable[[], Awaitable[None]], snapshot: Callable[[], Snapshot],
                 journal: Callable[[str], Awaitable[str]]) -> None:
        self.config = config
        self.units = units
        self.rescan = rescan
        self.snapshot = snapshot
        self.journal = journal
        self.active: dict[str, Download] = {}  # by unit name
        self.listeners: list[Listener] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.python = sys.executable

    def cache(self) -> Path:
        cache = cache_dir(self.config)
        if not self.config.llama_cache or cache is None:
            raise BadRequest("downloads go to llama.cpp's cache, which llamad does not serve "
                             "(llama-cache = no); set llama-cache = yes", code="no_cache")
        if not cache.is_dir():
            raise BadRequest(f"llama.cpp's cache {cache} does not exist; create it "
                             f"(mkdir -p {cache}) or set llama-cache-dir", code="no_cache")
        return cache

    def endpoint(self) -> str:
        return hub.endpoint(self.config.hf_endpoint, os.environ)

    # -- starting and joining ----------------------------------------------------------

    async def start(self, name: Name) -> Download:
        """The download of `name`, started or joined; returns once the hub has said which
        files it means (DownloadFailed if it refused)."""
        unit = du.download_unit(str(name))
        d = self.active.get(unit)
        if d is not None and d.started and \
                (await self._state(unit))[0] in ("gone", "inactive"):
            # Stopped a moment ago (systemctl stop): its follower ends it within POLL.
            while not d.ended:
                await d.wait(30)
        d = self.active.get(unit)  # no await from here until it is in self.active
        if d is None or d.ended:
            cache = self.cache()
            d = self.active[unit] = Download(name, unit)
            try:
                await self._start_unit(d, cache)
            except BaseException:
                self.active.pop(unit, None)
                raise
            d.started = True
            self._watch(d)
        deadline = time.monotonic() + READY_TIMEOUT
        while not d.planned() and not d.ended:
            try:
                await d.wait(max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                raise DownloadFailed(f"the download of {name} did not start within "
                                     f"{READY_TIMEOUT:.0f} s") from None
        if d.state == "failed":
            raise DownloadFailed(d.error)
        return d

    async def _start_unit(self, d: Download, cache: Path) -> None:
        current = await self._state(d.unit)
        if current[0] in ("active", "activating", "reloading"):
            log.info("%s: a download of %s runs already; joining it", d.unit, d.name)
            return
        command = du.argv(self.python, cache, self.endpoint(), str(d.name))
        props = du.properties(str(d.name), command, cache, self.config.hf_token_file)
        log.info("%s: downloading %s from %s", d.unit, d.name, self.endpoint())
        await self.units.start_transient(d.unit, props)

    def _watch(self, d: Download) -> None:
        task = asyncio.get_running_loop().create_task(self._follow(d), name=d.unit)
        self.tasks.add(task)
        task.add_done_callback(self._watch_ended)

    def _watch_ended(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("watching a download failed", exc_info=task.exception())

    # -- following a unit --------------------------------------------------------------

    async def _state(self, unit: str) -> tuple[str, str, dict[str, Any]]:
        """(ActiveState, SubState, the status line) of a unit; ('gone', ...) if it is not."""
        props = await self.units.properties(unit, UNIT_IFACE)
        if props.get("LoadState") == "not-found":
            return "gone", "", {}
        job = props.get("Job")
        if isinstance(job, (list, tuple)) and job and job[0]:
            return "queued", "", {}  # a start (or stop) job not carried out yet
        service = await self.units.properties(unit, SERVICE_IFACE)
        text = str(service.get("StatusText", ""))[:STATUS_MAX]
        try:
            status = json.loads(text) if text.startswith("{") else {}
        except ValueError:
            status = {}
        return str(props.get("ActiveState", "")), str(props.get("SubState", "")), \
            status if isinstance(status, dict) else {}

    async def _follow(self, d: Download) -> None:
        while not d.ended:
            try:
                active, sub, status = await self._state(d.unit)
            except UnitError as e:
                log.warning("%s: cannot read its state (%s); trying again", d.unit, e)
                await asyncio.sleep(1)
                continue
            if d.take(status) and not d.ended:
                self._tell(d, "progress")
            if active == "active" and sub == "exited":
                await self._finished(d)
            elif active == "failed" or (sub == "auto-restart" and not d.planned()):
                await self._failed(d, status)
            elif active == "gone" or active == "inactive":
                self._end(d, "failed", f"the download of {d.name} was stopped")
            else:
                await asyncio.sleep(POLL)

    async def _finished(self, d: Download) -> None:
        await self.rescan()  # the cache's new files are in the catalog before anyone hears
        model = d.model
        if model and model not in self.snapshot().models:
            about = [p for p in self.snapshot().problems if d.name.folder in p or model in p]
            log.warning("%s: downloaded, but the catalog does not list it: %s", model,
                        "; ".join(about)[:1000] or "no reason given")
        await self._stop(d.unit)
        log.info("%s: downloaded %s", d.unit, model or d.name)
        self._end(d, "finished")

    async def _failed(self, d: Download, status: dict[str, Any]) -> None:
        why = str(status.get("error") or "") or await self.journal(d.unit) or \
            "the downloader failed without saying why"
        await self._stop(d.unit)
        with_reset = self.units.reset_failed(d.unit)
        try:
            await with_reset
        except UnitError as e:
            log.warning("%s: %s", d.unit, e)
        log.warning("%s: %s", d.unit, why)
        self._end(d, "failed", one_line(why))

    async def _stop(self, unit: str) -> None:
        try:
            await self.units.stop(unit)
        except UnitError as e:  # gone already
            log.debug("%s: %s", unit, e)

    def _end(self, d: Download, state: str, error: str = "") -> None:
        d.state, d.error = state, error
        if self.active.get(d.unit) is d:
            del self.active[d.unit]
        self._tell(d, state)

    def _tell(self, d: Download, what: str) -> None:
        d.notify()
        for listener in list(self.listeners):
            try:
                listener(d, what)
            except Exception:  # one broken listener must not stop the others
                log.exception("a listener of downloads failed")

    # -- cancelling, removing, adopting --------------------------------------------------

    def running(self, name: str) -> Download | None:
        return next((d for d in self.active.values()
                     if name in (str(d.name), d.model) and not d.ended), None)

    async def cancel(self, d: Download) -> None:
        await self._stop(d.unit)
        while not d.ended:
            await d.wait(30)

    async def remove(self, name: Name) -> None:
        """Remove `name`'s files from the cache (a unit of its own), then rescan."""
        cache = self.cache()
        unit = du.remove_unit(str(name))
        command = du.argv(self.python, cache, "", str(name), remove=True)
        await self.units.start_transient(unit, du.properties(str(name), command, cache, None,
                                                             remove=True))
        deadline = time.monotonic() + REMOVE_TIMEOUT
        while True:
            active, _, status = await self._state(unit)
            if active in ("gone", "inactive"):
                break
            if active == "failed" or time.monotonic() > deadline:
                why = str(status.get("error") or "") or await self.journal(unit) or \
                    f"it did not end within {REMOVE_TIMEOUT:.0f} s"
                await self._stop(unit)
                await self.units.reset_failed(unit)
                raise LlamadError(f"removing {name} from the cache failed: {one_line(why)}",
                                  code="remove_failed")
            await asyncio.sleep(POLL)
        await self.rescan()

    async def adopt(self) -> None:
        """Follow the downloads a previous llamad started (they ran on meanwhile)."""
        for unit in await self.units.names(du.DOWNLOAD_PATTERN):
            props = await self.units.properties(unit, SERVICE_IFACE)
            env = [str(e) for e in props.get("Environment", ())]
            text = next((e.split("=", 1)[1] for e in env
                         if e.startswith(du.MODEL_ENV + "=")), None)
            try:
                name = hub.parse_name(text)
            except hub.HubError:
                continue
            if unit not in self.active:
                log.info("%s: following the download of %s", unit, name)
                d = self.active[unit] = Download(name, unit, started=True)
                self._watch(d)

    async def close(self) -> None:
        """Stop following (the units go on; the next llamad follows them again)."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
