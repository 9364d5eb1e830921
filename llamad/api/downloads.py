"""Downloads and deletions over HTTP, in both dialects: llama.cpp's router (`POST /models`,
`DELETE /models?model=`, with `download_progress`, `download_finished`, `download_failed`
and `model_remove` on /models/sse) and Ollama's (`POST /api/pull`, streamed progress lines,
and `DELETE /api/delete`). Admin-only where API keys are set. The work itself is
supervisor/downloads.py's, in systemd units.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from aiohttp import web

from llamad.api import ollama_models
from llamad.api.feed import ModelFeed
from llamad.api.models import FEED
from llamad.api.ollama_translate import flag
from llamad.catalog import hub
from llamad.catalog.hub import HubError, Name
from llamad.catalog.presets import canonical_name
from llamad.errors import BadRequest, NotFound
from llamad.http import keys
from llamad.http.body import read_json
from llamad.http.context import app_key, resolve, supervisor
from llamad.supervisor.downloads import Download, DownloadFailed, Downloads
from llamad.supervisor.events import State

DOWNLOADS: Any = app_key("downloads", Downloads)
PULL_TIMEOUT = 24 * 3600.0  # seconds a pull that answers at the end (stream: false) may take
LINE_EVERY = 0.25  # seconds between progress lines of one file


def downloads(request: web.Request) -> Downloads:
    d: Downloads = request.app[DOWNLOADS]
    return d


def parse(text: object) -> Name:
    try:
        return hub.parse_name(text)
    except HubError as e:
        raise BadRequest(str(e), code="invalid_model_name") from None


# -- llama.cpp's router ------------------------------------------------------------------

@keys.admin_only
async def handle_download(request: web.Request) -> web.Response:
    """POST /models {"model": "user/repo[:QUANT]"}: {"success": true} once the hub has said
    which files it means; the rest is told on /models/sse."""
    _, data = await read_json(request)
    name = parse(data.get("model"))
    if supervisor(request).snapshot.resolve(str(name)) is not None:
        raise BadRequest(f"model '{name}' already exists", code="model_exists")
    d = await downloads(request).start(name)
    return web.json_response({"success": True, "model": d.model or str(name)})


@keys.admin_only
async def handle_delete(request: web.Request) -> web.Response:
    """DELETE /models?model=ID: a cached model's files go (a download of it stops)."""
    await remove(request, request.query.get("model", ""))
    return web.json_response({"success": True})


@keys.admin_only
async def handle_openai_delete(request: web.Request) -> web.Response:
    """DELETE /v1/models/{id} (the OpenAI SDK's models.delete): as DELETE /models, answered
    in OpenAI's shape. llama-server has no such route (404)."""
    removed = await remove(request, request.match_info["id"])
    return web.json_response({"id": removed, "object": "model", "deleted": True})


async def remove(request: web.Request, text: str) -> str:
    """Stop whatever uses the model, remove its files, rescan; the id removed."""
    if not text:
        raise BadRequest("model must be a non-empty string", code="model_required")
    dl, sup = downloads(request), supervisor(request)
    running = dl.running(text)
    try:
        slot = resolve(request, text)
    except NotFound:
        slot = None
        with contextlib.suppress(HubError, NotFound):  # hf.co/user/repo:q4_k_m and the like
            text = canonical_name(str(hub.parse_name(text)))
            running = running or dl.running(text)
            slot = resolve(request, text)
        if slot is None and running is None:
            raise NotFound(f"model {text!r} is not known to llamad; GET /v1/models lists "
                           "them") from None
    if slot is not None and slot.model.source != "cache":
        raise BadRequest(f"model {slot.model.id!r} is not removable: only downloads in "
                         f"llama.cpp's cache are, and its file is {slot.model.path}",
                         code="not_removable")
    if running is not None:
        await dl.cancel(running)
    if slot is not None and slot.state not in (State.UNLOADED, State.FAILED):
        await sup.unload(slot)
    removed = slot.model.id if slot is not None else str(running.name if running else text)
    await dl.remove(parse(removed))
    feed: ModelFeed = request.app[FEED]
    feed.send(removed, "model_remove", None)
    return removed


def feed_listener(feed: ModelFeed) -> Any:
    """Downloads told on /models/sse as llama.cpp's router tells them."""
    def listen(d: Download, what: str) -> None:
        name = str(d.name)
        if what == "finished":
            feed.send(name, "download_finished", None)
        elif what == "failed":
            feed.send(name, "download_failed", {"error": d.error})
        elif d.state == "downloading" and not d.files:
            feed.send(name, "model_status", {"status": "downloading"})
        elif d.files:
            feed.send(name, "download_progress", {"progress": {
                f["url"]: {"done": f["done"], "total": f["total"]} for f in d.files.values()}})
    return listen


# -- Ollama ------------------------------------------------------------------------------

@keys.admin_only
async def handle_pull(request: web.Request) -> web.StreamResponse:
    """POST /api/pull {"model": NAME, "stream": true}: Ollama's progress lines, once the hub
    has said which files NAME means (a refusal before that is an error answer, Ollama-shaped
    under /api/: http/middleware.py); the model's id in the cache is the X-Llamad-Model
    header."""
    _, data = await read_json(request, "name")
    stream = flag("stream", data.get("stream"), True)
    d = await downloads(request).start(parse(data.get("model") or data.get("name")))
    if not stream:
        await wait_end(d, PULL_TIMEOUT)
    headers = {"X-Llamad-Model": d.model or str(d.name)}
    if not stream:
        if d.state == "failed":
            return web.json_response({"error": d.error}, status=DownloadFailed.status,
                                     headers=headers)
        return web.json_response({"status": "success"}, headers=headers)
    resp = web.StreamResponse(headers={**headers, "Content-Type": "application/x-ndjson",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    await line(resp, {"status": "pulling manifest"})
    await stream_progress(resp, d)
    return resp


def file_line(path: str, f: dict[str, Any]) -> dict[str, Any]:
    """One file's progress line. Its digest names the hash the download checks it by: an
    LFS file's SHA-256, as Ollama's blobs, or a file kept in git by its git SHA-1, never
    labelled sha256. Without an id, no digest: Ollama's CLI labels a bar digest[7:19]."""
    oid = str(f.get("oid") or "")
    out = {"status": f"pulling {oid[:12] or path}", "total": f["total"], "completed": f["done"]}
    if oid:
        out["digest"] = hub.RemoteFile(path, f["total"], oid).digest
    return out


def verifying(d: Download) -> str:
    """Ollama's "verifying sha256 digest", with the hashes the files were checked by."""
    kinds = sorted({hub.RemoteFile(p, 0, str(f["oid"])).digest.partition(":")[0]
                    for p, f in d.files.items() if f.get("oid")} or {"sha256"}, reverse=True)
    return f"verifying {' and '.join(kinds)} digest{'s' if len(kinds) > 1 else ''}"


async def stream_progress(resp: web.StreamResponse, d: Download) -> None:
    sent: dict[str, tuple[int, float]] = {}  # path -> (bytes told, when)
    while True:
        for path, f in list(d.files.items()):
            told, when = sent.get(path, (-1, 0.0))
            now = time.monotonic()
            if f["done"] != told and (now - when >= LINE_EVERY or f["done"] == f["total"]):
                await line(resp, file_line(path, f))
                sent[path] = (f["done"], now)
        if d.ended:
            break
        with contextlib.suppress(TimeoutError):
            await d.wait(30)
    if d.state == "failed":
        await line(resp, {"error": d.error})
        return
    for status in (verifying(d), "writing manifest", "success"):
        await line(resp, {"status": status})


async def wait_end(d: Download, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not d.ended:
        await d.wait(max(0.1, deadline - time.monotonic()))


async def line(resp: web.StreamResponse, record: dict[str, Any]) -> None:
    await resp.write(json.dumps(record).encode() + b"\n")


@keys.admin_only
async def handle_ollama_delete(request: web.Request) -> web.Response:
    """DELETE /api/delete {"model": NAME}: 200 with no body, as Ollama answers; NAME as
    Ollama's clients write it (`name:latest`, `hf.co/user/repo:QUANT`)."""
    _, data = await read_json(request, "name")
    text = data.get("model") or data.get("name")
    if not isinstance(text, str) or not text:
        raise BadRequest("model is required", code="model_required")
    snapshot = supervisor(request).snapshot
    for name in ollama_models.candidates(text, snapshot.models):
        if snapshot.resolve(name) is not None or downloads(request).running(name) is not None:
            await remove(request, name)
            return web.Response(status=200)
    raise NotFound(f"model '{text}' not found")


def attach(app: web.Application, dl: Downloads) -> None:
    app[DOWNLOADS] = dl
    dl.listeners.append(feed_listener(app[FEED]))


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/models", handle_download)
    r.add_delete("/models", handle_delete)
    r.add_delete("/v1/models/{id:.+}", handle_openai_delete)
    r.add_post("/api/pull", handle_pull)
    r.add_delete("/api/delete", handle_ollama_delete)

