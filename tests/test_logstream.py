"""/logs/stream's bound on open streams (the journal itself is read on the box:
tests/integration/test_logs.py)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llamad.http import middleware
from llamad.observe import logstream


async def test_a_reader_that_cannot_open_leaks_no_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """security-review-3 L12: the count of open streams went up before the journal was
    opened, and never down when that failed: after MAX_STREAMS failures (the journal
    rotating, descriptors short) /logs/stream said 503 until llamad restarted."""
    def broken(unit: str | None) -> Any:
        raise OSError(24, "Too many open files")
    monkeypatch.setattr(logstream, "open_reader", broken)
    app = web.Application(middlewares=[middleware.error_middleware])
    logstream.add_routes(app)
    async with TestClient(TestServer(app)) as client:
        for _ in range(logstream.MAX_STREAMS + 3):
            r = await client.get("/logs/stream?follow=0&lines=0")
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "journal_unavailable"
        assert app[logstream.STREAMS].open == 0
        monkeypatch.undo()
        r = await client.get("/logs/stream?follow=0&lines=0")
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
