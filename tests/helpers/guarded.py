"""Apps behind llamad's own limits and error shapes, as `llamad serve` builds them, for
tests of what a request meets before its handler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from llamad.config import Config
from llamad.http import keys, limits, middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def body_checking(handle: Handler) -> web.Application:
    """POST / behind the limits (a body's share, the scanning thread) and the error shapes."""
    lim = limits.Limits(Config.default())
    app = web.Application(middlewares=[lim.middleware, middleware.error_middleware])
    app[limits.LIMITS] = lim
    app.router.add_post("/", handle)
    app.on_cleanup.append(lim.close)
    return app


def keyed(lim: limits.Limits, keyfile: Path) -> web.Application:
    """The error shapes, limits and keys in llamad's order; the routes are the test's."""
    app = web.Application(middlewares=[
        middleware.error_middleware, lim.middleware,
        keys.middleware(keys.Keyring(keyfile)), lim.admit])
    app[limits.LIMITS] = lim
    return app
