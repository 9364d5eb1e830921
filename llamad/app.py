"""Builds the aiohttp application and runs it: sockets, background work, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import inspect
import logging
import signal
import socket
import sys
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from llamad.api import dashboard, fleet, ollama, peerforward, proxy, report, standby, webui
from llamad.api import downloads as api_downloads
from llamad.api import models as api
from llamad.catalog import flagtable
from llamad.catalog import rpcargs as rpc
from llamad.catalog.catalog import Catalog, Snapshot
from llamad.catalog.gguf_info import InfoCache
from llamad.catalog.presets import global_flags, parse_args
from llamad.catalog.watcher import CatalogWatcher
from llamad.config import Config, load_config
from llamad.errors import ConfigError
from llamad.http import body, browsers, keys, limits, middleware, record
from llamad.log import die
from llamad.memory import heap
from llamad.memory.measure import Measure
from llamad.observe import logstream, metrics, requestlog
from llamad.safetext import one_line
from llamad.sizes import MIB
from llamad.supervisor import sampling
from llamad.supervisor.downloads import Downloads
from llamad.supervisor.supervisor import Supervisor
from llamad.supervisor.unitspec import memory_max_props
from llamad.systemd import unitpaths
from llamad.systemd.activation import Notifier, bind, systemd_sockets
from llamad.systemd.egress import Egress, peer_addresses
from llamad.systemd.unitname import SLICE
from llamad.systemd.units import UnitError, UnitManager

log = logging.getLogger("llamad")

TICK = 1.0
STOP_GRACE = 2.0
# How long a stop may take beyond shutdown-grace: aiohttp gives the handlers still running
# 60 s to finish (runner.cleanup), then the cleanup contexts end; past this it hangs.
STOP_DEADLINE = 70.0
# A stop not over after this long (beyond shutdown-grace) says what it waits for.
STOP_SLOW = 10.0
STOP_MARGIN = 10.0  # systemd's SIGKILL no sooner than this after stop_deadline's exit
STARTING = "reading the models"  # STATUS= from READY until the first scan is in
FLAGS_FILE = "llama-server-flags.json"  # in state-dir: flagtable.remember_in


async def journal_tail(unit: str, lines: int = 5) -> str:
    """The unit's last log lines, for a failure reason; '' if the journal can't be read."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "journalctl", "--no-pager", "-o", "cat", "-n", str(lines), "-u", unit,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(proc.communicate(), 5)
    except (TimeoutError, OSError):
        return ""
    # Escaped: the reason reaches terminals (llamad load --wait) and llama.cpp prints GGUF
    # strings as they are.
    return " | ".join(one_line(line) for line in out.decode(errors="replace").splitlines()
                      if line)


class Daemon:
    """Everything `llamad serve` runs, wired together: each resource is one of the
    application's cleanup contexts (app()), and every task they start is awaited at exit."""

    def __init__(self, config: Config, notifier: Notifier) -> None:
        self.config = config
        self.notifier = notifier
        # Headers survive restarts: a socket-activated start need not re-read them.
        # The first scan is the watcher's (the _watcher context), in a worker thread.
        self.catalog = Catalog(config, cache=InfoCache(config.state_dir / "gguf-info.json"))
        self.stop = asyncio.Event()
        # 1 once llamad gave up on itself: Restart=on-failure restarts nothing after 0.
        self.exit_status = 0
        self.reloads: set[asyncio.Task[None]] = set()
        self.last_request = time.monotonic()
        # Connections that have sent a request (their transports): see stop_accepting.
        self.answered: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        # Made by the cleanup contexts (app()), in this order, when the application starts.
        self.units: UnitManager
        self.sup: Supervisor
        self.watcher: CatalogWatcher
        self.egress: Egress
        # Fails closed: a key file that is set but unusable stops llamad here.
        self.keyring = keys.Keyring(config.api_keys_file, config.peer_key_file)
        self.keyed = config.api_keys_file is not None
        self.runner: web.AppRunner | None = None
        self._sampling: asyncio.Task[None] | None = None  # the tick's measurement (_measure)
        self.metrics = metrics.Metrics(self._connections)
        # Writes the request log (if on) and llamad's notes into models' journals.
        self.journal = requestlog.JournalWriter()

    def app(self) -> web.Application:
        door = browsers.Door(self.config, keyed=self.keyed)
        lim = limits.Limits(self.config)
        # The API key is checked before anything is counted against a limit (admit), so
        # traffic without a valid key never holds a request's or a stream's place.
        middlewares = [self._activity, middleware.error_middleware, lim.middleware,
                       door.middleware]
        if self.keyed:
            middlewares.append(keys.middleware(self.keyring))
        middlewares.append(lim.admit)
        sinks: list[record.Sink] = [self.metrics.on_request]
        if self.config.request_log:
            sinks.append(self.journal)
        middlewares += [record.middleware(sinks), self._opened]
        app = web.Application(client_max_size=self.config.max_body_mb * MIB,
                              middlewares=middlewares)
        app.on_response_prepare.append(door.on_prepare)
        app[limits.LIMITS] = lim
        app[keys.KEYRING] = self.keyring
        app[fleet.DRAINING] = fleet.Draining()  # /health says so after SIGTERM
        peerforward.install(app)  # requests for the peers' models go there
        app.on_cleanup.append(lim.close)
        proxy.add_routes(app)
        api.add_routes(app)
        api_downloads.add_routes(app)
        logstream.add_routes(app)
        dashboard.add_routes(app)
        ollama.add_routes(app)
        webui.add_routes(app, self.config.ui_dir, root=ollama.probe_or)
        app[metrics.METRICS] = self.metrics
        app.cleanup_ctx.extend([self._request_log, self._units, self._supervisor,
                                self._watcher, self._downloads, self._running])
        return app

    @web.middleware
    async def _activity(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.last_request = time.monotonic()
        if request.transport is not None:
            self.answered.add(request.transport)
        try:
            resp: web.StreamResponse = await handler(request)
            return resp
        finally:
            self.last_request = time.monotonic()

    @web.middleware
    async def _opened(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Until llamad has read its models after a start, every request but /health waits
        for it, bounded by queue-timeout, then 503 (Supervisor.wait_open): llamad is READY
        and serving before its first scan is in (`_open`)."""
        if request.path != "/health":
            await self.sup.wait_open()
        resp: web.StreamResponse = await handler(request)
        return resp

    # One cleanup context per resource, started in this order and ended in reverse.

    async def _units(self, app: web.Application) -> AsyncIterator[None]:
        """The D-Bus connections to systemd."""
        self.units = UnitManager()
        await self.units.open()
        await limit_slice(self.units, self.config)
        try:
            yield
        finally:
            self.units.close()

    async def _supervisor(self, app: web.Application) -> AsyncIterator[None]:
        """The owner of model state, fed by systemd's signals and the catalog's changes."""
        measure = Measure(self.config, state_dir=self.config.state_dir)
        self.watcher = CatalogWatcher(self.catalog, asyncio.get_running_loop())
        sup = self.sup = Supervisor(self.config, self.catalog.snapshot, self.units, measure,
                                    journal_tail, rescan=self.watcher.rescan_now, opened=False)
        self.catalog.swa_fits = sup.kv.swa_fits  # before the first scan, the watcher's
        self.units.follow(sup.on_unit_change, sup.reconcile_soon)
        api.attach(app, sup, self.catalog)
        self.metrics.watch(sup)
        sup.events.subscribe(requestlog.fit_notes(
            self.journal, lambda m: sup.slots[m].unit if m in sup.slots else None))
        self.catalog.subscribe(lambda old, new: sup.update_snapshot(new))
        self.egress = Egress(self.units)
        self.catalog.subscribe(lambda old, new: self._reach(sup, new))
        try:
            yield
        finally:
            await sup.close()

    async def _watcher(self, app: web.Application) -> AsyncIterator[None]:
        """The models directories, watched from the first scan on (`_open`) until the end."""
        try:
            yield
        finally:
            await self.watcher.stop()

    async def _downloads(self, app: web.Application) -> AsyncIterator[None]:
        """Downloads into llama.cpp's cache, each a unit; those running already followed."""
        downloads = Downloads(self.config, self.units, self.watcher.rescan_now,
                              lambda: self.catalog.snapshot, journal_tail)
        api_downloads.attach(app, downloads)
        await downloads.adopt()
        try:
            yield
        finally:
            await downloads.close()  # the units go on: the next llamad follows them

    async def _running(self, app: web.Application) -> AsyncIterator[None]:
        """The first scan, units taken over or stopped, preloads, then the reconcile loop
        (`_open`, in the background), and the tick from the start."""
        opening = self.sup.spawn(self._open(self.sup), "reading the models")
        ticker = asyncio.get_running_loop().create_task(self._tick(), name="tick")
        ticker.add_done_callback(self._tick_ended)
        try:
            yield
        finally:
            for task in (opening, ticker):
                task.cancel()
            await asyncio.gather(opening, ticker, return_exceptions=True)

    async def _open(self, sup: Supervisor) -> None:
        """The first scan, then the units an earlier llamad left taken over. Requests wait
        for it (Supervisor.wait_open); READY does not, so files that make a scan slow cannot
        keep llamad from starting (docs/security.md, "Hostile model files")."""
        try:
            await self.watcher.start()
            await self.egress.allow(*reachable(self.config, self.catalog.snapshot))
            await sup.adopt()
            await sup.take_back()
        except Exception:  # as when this came before READY: exit, systemd starts llamad again
            log.exception("reading the models and adopting their units failed; exiting")
            self.give_up()
            return
        sup.opened.set()
        self.notifier.status(report.status_line(sup))  # before any waiting request resumes
        heap.trim()  # what reading the models left behind
        await sup.preload()
        sup.spawn(sup.keep_reconciling(), "reconciling with systemd")

    async def _request_log(self, app: web.Application) -> AsyncIterator[None]:
        """The journal writer: the request log and llamad's notes in models' journals."""
        try:
            yield
        finally:
            self.journal.close()

    def _reach(self, sup: Supervisor, snapshot: Snapshot) -> None:
        """New presets may name new rpc workers: let llamad reach them."""
        sup.spawn(self.egress.allow(reachable(self.config, snapshot)[0]),
                  "opening llamad's filter")

    def _connections(self) -> int:
        server = self.runner.server if self.runner is not None else None
        return len(server.connections) if server is not None else 0

    async def _tick(self) -> None:
        interval = min(TICK, self.notifier.watchdog_interval or TICK)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._tick_once()
            except Exception:  # a bug in one step must not stop the watchdog pings
                log.exception("the periodic tick failed")

    def _tick_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            # Without the tick no TTL runs and the watchdog starves: let systemd restart us.
            log.error("the periodic tick ended: %r; exiting", task.exception())
            self.give_up()

    def give_up(self) -> None:
        """Exit with a failure, so that systemd starts llamad again (Restart=on-failure)."""
        self.exit_status = 1
        self.stop.set()

    async def _tick_once(self) -> None:
        sup = self.sup
        self.notifier.watchdog()
        self.journal.flush()  # request log entries journald had no room for
        sup.expire()
        sup.probe()
        sup.watch_sleep()
        self.notifier.status(report.status_line(sup))
        self._measure(sup)
        idle_for = time.monotonic() - self.last_request
        if self.config.idle_exit and idle_for > self.config.idle_exit and sup.quiet() \
                and sup.opened.is_set() and not self.stop.is_set():
            await self._exit_when_idle(sup, idle_for)

    def _measure(self, sup: Supervisor) -> None:
        """Measure beside the tick, one measurement at a time: it asks systemd about each
        running model, and a systemd slow to answer (sd-bus waits 25 s per call) must hold
        back neither the next WATCHDOG=1 (WatchdogSec=30s would kill a healthy llamad)
        nor pile up calls behind itself. The supervisor cancels it on close."""
        if self._sampling is None or self._sampling.done():
            self._sampling = sup.spawn(sample(sup), "measuring the models' memory")

    async def _exit_when_idle(self, sup: Supervisor, idle_for: float) -> None:
        try:
            if not await sup.hand_off():  # a request came in meanwhile
                return
        except UnitError as e:  # stay: with no timer, nothing would stop the models
            log.warning("cannot hand the idle TTLs to systemd (%s); not exiting", e)
            return
        log.info("idle for %.0fs: exiting; the socket starts llamad again on demand", idle_for)
        self.stop.set()


async def sample(sup: Supervisor) -> None:
    """Measure the models' memory; a failure is logged and the next tick tries again."""
    try:
        await sampling.sample(sup)
    except Exception:  # never let a measurement bug stop the watchdog pings
        log.exception("measuring the models' memory failed")


def reachable(config: Config, snapshot: Snapshot) -> tuple[list[str], list[str]]:
    """(addresses llamad itself connects to beyond its backends, peers named by host name):
    the rpc workers of every model, which rpcguard probes, and the peers."""
    peers, named = peer_addresses(config.peers)
    workers = {w.host for m in snapshot.models.values() for w in rpc.workers(m.settings.args)}
    return [*peers, *sorted(workers)], named


async def limit_slice(units: UnitManager, config: Config) -> None:
    """slice-memory-max: MemoryMax= of llama-server.slice, the total for all models."""
    if not config.slice_memory_max:
        return
    try:
        await units.set_properties(SLICE, memory_max_props(config.slice_memory_max))
        log.info("%s: MemoryMax=%s", SLICE, config.slice_memory_max)
    except UnitError as e:
        log.warning("cannot set MemoryMax=%s on %s: %s", config.slice_memory_max, SLICE, e)


def reload(daemon: Daemon) -> None:
    """SIGHUP (`systemctl reload llamad`): read the API keys (and the peer key) again."""
    if daemon.keyring.path is None and daemon.keyring.peer_key_file is None:
        log.info("reload: neither api-keys-file nor peer-key-file is set; nothing to reload")
        return
    task = asyncio.get_running_loop().create_task(daemon.keyring.reload(),
                                                  name="reloading the API keys")
    daemon.reloads.add(task)
    task.add_done_callback(_reloaded)
    task.add_done_callback(daemon.reloads.discard)


def _reloaded(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("reloading the API keys failed: %s", task.exception())


def runner_kwargs() -> dict[str, Any]:
    # aiohttp >= 3.9 no longer cancels a handler when its client goes away;
    # we want that, so a dropped client frees the backend's slot at once.
    params = inspect.signature(web.Server.__init__).parameters
    return {"handler_cancellation": True} if "handler_cancellation" in params else {}


async def serve(config: Config, sockets: list[socket.socket], notifier: Notifier) -> int:
    """Serve until asked to stop; the exit status."""
    # Big request bodies are checked on a thread (body.py): hand the GIL back to the event
    # loop within 1 ms rather than Python's default 5 ms.
    sys.setswitchinterval(body.SWITCH_INTERVAL)
    heap.setup()
    daemon = Daemon(config, notifier)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload, daemon)
    app = daemon.app()
    lim: limits.Limits = app[limits.LIMITS]
    limits.raise_fd_limit(lim)
    runner = daemon.runner = web.AppRunner(app, access_log=None, **runner_kwargs())
    await runner.setup()
    assert runner.server is not None
    servers = []
    slow: asyncio.TimerHandle | None = None
    try:
        for sock in sockets:
            # aiohttp's protocol, guarded per connection: the connection cap, and a
            # deadline for receiving each request, which aiohttp lacks (limits.Guard).
            servers.append(await loop.create_server(lim.protocol(runner.server), sock=sock))
        status = report.status_line(daemon.sup) if daemon.sup.opened.is_set() else STARTING
        log.info("serving on %s: %s", ", ".join(str(s.getsockname()) for s in sockets), status)
        notifier.ready(status)
        await daemon.stop.wait()
        slow = begin_stop(notifier, config.shutdown_grace)
        await fleet.drain(app, config.shutdown_grace)  # a load balancer's cue to move on
    finally:
        if slow is None:  # failed before it began serving: nothing to drain
            slow = begin_stop(notifier, 0)
        await stop_accepting(servers, runner, daemon.answered)
        # Backends keep running: the next llamad adopts them.
        with contextlib.suppress(Exception):
            await runner.cleanup()
        await asyncio.gather(*daemon.reloads, return_exceptions=True)
        slow.cancel()
    return daemon.exit_status


def begin_stop(notifier: Notifier, grace: float) -> asyncio.TimerHandle:
    """From SIGTERM on: the stop may take `grace` and STOP_DEADLINE more. systemd is told
    so, with a margin (its default stop timeout, 90 s, would SIGKILL a longer grace, and
    before stop_deadline says where a stop hangs); the deadline and the slow-stop report
    count from now, not from the end of the grace. Returns the report's timer."""
    notifier.stopping(grace + STOP_DEADLINE + STOP_MARGIN)
    stop_deadline(grace + STOP_DEADLINE)
    return asyncio.get_running_loop().call_later(grace + STOP_SLOW, stop_is_slow)


def stop_deadline(seconds: float) -> None:
    """A stop that has not ended after `seconds` hangs (a thread stuck in a library, a
    cleanup that never returns) and keeps the port from the next llamad: Python's own
    traceback of every thread goes to the journal and llamad exits (status 1), before
    systemd's SIGKILL (begin_stop's EXTEND_TIMEOUT_USEC=) would, leaving no trace of where."""
    faulthandler.dump_traceback_later(seconds, exit=True)


def stop_is_slow() -> None:
    """What a slow stop waits for: each task still pending, and each thread."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    log.warning("stopping takes long: %d tasks pending%s", len(tasks), "".join(
        f"\n{t.get_name()}: {one_line(repr(t.get_coro()))} at "
        + " < ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in t.get_stack(limit=8)[::-1])
        for t in tasks))
    faulthandler.dump_traceback(all_threads=True)


async def stop_accepting(servers: list[asyncio.Server], runner: web.AppRunner,
                         answered: weakref.WeakSet[asyncio.BaseTransport]) -> None:
    """Stop accepting: connections still queued on the socket wait there for the next
    llamad. Those accepted just before may not have been read yet; shutting down closes
    a connection without a request as idle, which would lose theirs, so give them
    STOP_GRACE seconds to be read. runner.cleanup() then closes the open ones."""
    for server in servers:
        server.close()
    deadline = time.monotonic() + STOP_GRACE
    while runner.server is not None and time.monotonic() < deadline and any(
            c.transport is not None and c.transport not in answered
            for c in runner.server.connections):
        await asyncio.sleep(0.02)


def load(config_path: Path | None) -> tuple[Config | None, ConfigError | None]:
    """llamad.conf read and checked as serving needs it: its `args` against llama-server's
    flags, its api-keys-file. Blocks (runs llama-server --help once per binary)."""
    try:
        config = load_config(config_path)
        flagtable.remember_in(config.state_dir / FLAGS_FILE)
        parse_args(config.args, f"{config.path or 'configuration'}: args",
                   global_flags(config.llama_server))
        if config.api_keys_file is not None:
            keys.load(config.api_keys_file)  # fails closed: standby answers every request
    except ConfigError as e:
        return None, e
    return config, None


async def main(config_path: Path | None, listen: str | None) -> int:
    """Serve; with an error in llamad.conf, stand by on the same sockets until it is fixed
    (api/standby.py). Without sockets from systemd or --listen, the error is raised: no
    client waits on a socket then, and where to listen is part of what is broken."""
    sockets = systemd_sockets()
    config, error = await asyncio.to_thread(load, config_path)
    if not sockets:
        if config is None and listen is None:
            assert error is not None
            raise error
        sockets = [bind(listen or (config.listen if config else ""))]
    notifier = Notifier()
    if config is None:
        assert error is not None
        config = await standby.wait_until_fixed(sockets, error, notifier,
                                                lambda: load(config_path))
        if config is None:
            return 0  # asked to stop while standing by
    for problem in unitpaths.config_problems(config):
        log.warning("%s", problem)  # the same warnings as check-config's, in the journal
    return await serve(config, sockets, notifier)


def run(config_path: Path | None, listen: str | None) -> int:
    """`llamad serve`: returns the exit status. An error in llamad.conf is answered with
    503s (standby) where clients can reach llamad, else raised (ConfigError)."""
    try:
        return asyncio.run(main(config_path, listen))
    except OSError as e:
        die(f"cannot listen: {e}", hint="another process may hold the port")
    except UnitError as e:
        die(str(e))

