"""/api/pull's progress lines as Ollama's clients read them (ollama-python here; Ollama's own
CLI keys a progress bar by `digest` and shows `digest[7:19]`). The download itself is
systemd's and the hub's (supervisor/downloads.py): faked at that boundary, a Download fed
the status lines the downloader sends (catalog/fetch.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import ollama as ollama_client
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llamad.api import downloads
from llamad.catalog import hub
from llamad.config import Config
from llamad.http import limits, middleware
from llamad.supervisor.downloads import Download

SHA256 = "ab" * 32  # an LFS file's id: the SHA-256 of its content
SHA1 = "cd" * 20  # a file kept in git: its git blob id, a SHA-1


class Finished:
    """Downloads.start as the hub and the unit leave it: `files` fetched, the end told."""

    def __init__(self, files: list[tuple[str, str | None]]) -> None:
        self.files = files

    async def start(self, name: hub.Name) -> Download:
        d = Download(name, "llamad-download@x.service")
        d.take({"commit": "c" * 40, "model": str(name)})
        for path, oid in self.files:
            status: dict[str, Any] = {"commit": "c" * 40, "file": path, "file_total": 10,
                                      "file_done": 10}
            if oid is not None:
                status["oid"] = oid
            d.take(status)
        d.state = "finished"
        return d


@pytest.fixture
async def pull() -> AsyncIterator[Any]:
    """Pull `files` through llamad's /api/pull with ollama-python: its progress lines."""
    lim = limits.Limits(Config.default())  # read_json's bounds on a body
    app = web.Application(middlewares=[lim.middleware, middleware.error_middleware])
    app[limits.LIMITS] = lim
    app.on_cleanup.append(lim.close)
    downloads.add_routes(app)
    hub_side = app[downloads.DOWNLOADS] = Finished([])
    async with TestClient(TestServer(app)) as client, \
            ollama_client.AsyncClient(host=str(client.make_url(""))) as ask:
        async def run(files: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
            hub_side.files = files
            return [p.model_dump(exclude_none=True) async for p in
                    await ask.pull("hf.co/user/repo:Q4_K_M", stream=True)]
        yield run


async def test_each_file_is_named_by_the_hash_it_is_checked_by(pull: Any) -> None:
    """A file kept in git is known by its SHA-1: not labelled sha256, as Ollama's digests
    are (a client that checks a blob against its digest would find it wrong)."""
    lines = await asyncio.wait_for(pull([("model.gguf", SHA256), ("README.md", SHA1)]), 30)
    files = [line for line in lines if "total" in line]
    assert {(f["status"], f["digest"], f["completed"]) for f in files} == {
        (f"pulling {SHA256[:12]}", f"sha256:{SHA256}", 10),
        (f"pulling {SHA1[:12]}", f"sha1:{SHA1}", 10)}
    assert lines[0] == {"status": "pulling manifest"}
    assert [line["status"] for line in lines[-3:]] == [
        "verifying sha256 and sha1 digests", "writing manifest", "success"]
    # Every file by SHA-256, as from Ollama: its own words.
    lines = await asyncio.wait_for(pull([("model.gguf", SHA256)]), 30)
    assert lines[-3]["status"] == "verifying sha256 digest"


async def test_a_file_without_an_id_has_no_digest(pull: Any) -> None:
    """Ollama's CLI slices digest[7:19] for a bar's label: a bare "sha256:" would stop it
    with a panic; without a digest it shows the status line instead."""
    lines = await asyncio.wait_for(pull([("model.gguf", None)]), 30)
    (progress,) = [line for line in lines if "total" in line]
    assert "digest" not in progress and progress["status"] == "pulling model.gguf"
