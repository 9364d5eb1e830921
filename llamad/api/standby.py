"""Standing by while llamad.conf has an error: every request gets a 503 that names it.

Exiting instead would leave clients queued on llamad.socket waiting while systemd restarts
llamad every few seconds into the same error. So llamad answers on its sockets, says the
error in STATUS= and the journal, keeps the watchdog fed, and reads the file again every
second; once it is fixed, serving starts on the same sockets, without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web

from llamad import redact
from llamad.errors import ConfigError, Unavailable
from llamad.http import middleware
from llamad.systemd.activation import Notifier

log = logging.getLogger("llamad")

T = TypeVar("T")
RETRY_AFTER = 5  # seconds; the file is read again every second
CHECK_EVERY = 1.0


def sentence(error: ConfigError) -> str:
    return (f"llamad's configuration has an error, so it serves no model until the file "
            f"is fixed (llamad check-config shows it; a fixed file is picked up without a "
            f"restart): {error.message}")


class Standby:
    def __init__(self, error: ConfigError) -> None:
        self.error = error

    def app(self) -> web.Application:
        app = web.Application(middlewares=[middleware.error_middleware])
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raise Unavailable(sentence(self.error), code="configuration_error",
                          retry_after=RETRY_AFTER)


async def wait_until_fixed(sockets: list[socket.socket], error: ConfigError,
                           notifier: Notifier, load: Callable[[], tuple[T | None,
                                                                        ConfigError | None]]
                           ) -> T | None:
    """Answer 503 on `sockets` until `load()` (run in a thread) returns no error; its
    result then, or None if llamad is asked to stop meanwhile. The sockets stay open and
    listening for what comes next: connections not yet accepted wait in their queue."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A reload (SIGHUP) is no stop: the file is read again within a second anyway. Left to
    # its default, it would end llamad in a way systemd's Restart=on-failure takes as clean.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    standby = Standby(error)
    runner = web.AppRunner(standby.app(), access_log=None)
    await runner.setup()
    assert runner.server is not None
    # Duplicates: closing a server closes its socket, and the originals must stay open.
    servers = [await loop.create_server(runner.server, sock=s.dup()) for s in sockets]
    announce(notifier, standby.error, ready=True)
    result: T | None = None
    interval = min(CHECK_EVERY, notifier.watchdog_interval or CHECK_EVERY)
    try:
        while not stop.is_set():
            notifier.watchdog()
            found, new_error = await asyncio.to_thread(load)
            if new_error is None:
                log.info("the configuration has no error any more: serving")
                result = found
                break
            if new_error.message != standby.error.message:
                standby.error = new_error
                announce(notifier, new_error)
            await _wait(stop, interval)
    finally:
        for server in servers:
            server.close()
        await runner.cleanup()
    return result


def announce(notifier: Notifier, error: ConfigError, ready: bool = False) -> None:
    shown = redact.text(error.message)
    log.error("%s Every request gets 503 until the file is fixed.", shown)
    status = f"configuration error: {shown}; every request gets 503 until it is fixed"
    if ready:  # llamad answers: socket activation's clients get their 503 at once
        notifier.ready(status)
    else:
        notifier.status(status)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
