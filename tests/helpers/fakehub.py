"""A Hugging Face hub on loopback, for tests that download: the routes llama.cpp's `-hf` and
llamad's downloader use, and the ways the real one can go wrong.

- GET /api/models/USER/REPO (model info), /api/models/USER/REPO/refs (branches),
  /api/models/USER/REPO/tree/REV?recursive=true (files, with an `lfs` object for big ones);
- HEAD and GET /USER/REPO/resolve/REV/PATH: a big (LFS) file redirects (302) to /cdn/OID,
  as the hub sends its files to a CDN; a small one is answered directly;
- /cdn/OID: the bytes, with Range (206), Accept-Ranges, ETag and Content-Length.

Repositories may be gated (401 without the token, 403 with another), hold a corrupt file
(the tree's hash is the right one, the bytes served are not), drop the connection once
part-way through a file, claim a size other than the file's (one no disk has), answer the
tree with any bytes, or redirect a file anywhere. Every request is recorded (method,
path, Range, whether it carried the token) for the tests to check.

    with FakeHub() as hub:
        hub.add("user/repo", {"m-Q4_K_M.gguf": data})
        ... MODEL_ENDPOINT=hub.url ...
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TOKEN = "hf_" + "t0ken" * 7  # what llama.cpp accepts as a token: hf_ and 34+ letters/digits
LFS_MIN = 1024  # bytes from which a file is stored in LFS (the hub's threshold is far higher)


@dataclass
class File:
    data: bytes
    corrupt: bool = False  # the bytes served differ from the hash listed
    drop_at: int | None = None  # the first GET from offset 0 breaks off after this many bytes
    claimed: int | None = None  # the size the tree lists instead of the real one
    location: str | None = None  # where its resolve URL redirects instead of the CDN
    dropped: bool = False

    @property
    def lfs(self) -> bool:
        return len(self.data) >= LFS_MIN or self.claimed is not None

    @property
    def oid(self) -> str:
        if self.lfs:
            return hashlib.sha256(self.data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def served(self) -> bytes:
        if not self.corrupt:
            return self.data
        return self.data[:-1] + bytes([self.data[-1] ^ 0xFF])


@dataclass
class Repo:
    files: dict[str, File]
    commit: str
    gated: bool = False
    tree_body: bytes | None = None  # the tree's raw answer instead of the real listing


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    token: bool
    auth: str | None = field(default=None, repr=False)


class FakeHub:
    """The server runs on its own thread and event loop while the `with` block lasts."""

    def __init__(self, host: str = "127.0.0.1", rate: int | None = None,
                 cdn_host: str | None = None) -> None:
        self.host = host
        self.rate = rate  # bytes per second a file is sent at (None: as fast as it goes)
        # Where big files are redirected to: another host name of the same server plays
        # the hub's CDN, another origin (None: the hub's own).
        self.cdn_host = cdn_host
        self.repos: dict[str, Repo] = {}
        self.seen: list[Seen] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def add(self, repo: str, files: dict[str, bytes | File], gated: bool = False) -> Repo:
        commit = hashlib.sha1(repo.encode() + json.dumps(sorted(files)).encode()).hexdigest()
        made = Repo({p: f if isinstance(f, File) else File(f) for p, f in files.items()},
                    commit, gated)
        self.repos[repo] = made
        return made

    def file(self, repo: str, path: str) -> File:
        return self.repos[repo].files[path]

    def gets(self, path_end: str) -> list[Seen]:
        """GETs of /cdn/ or resolve paths ending with `path_end` (an oid or a file path)."""
        with self._lock:
            return [s for s in self.seen if s.method == "GET" and s.path.endswith(path_end)]

    # -- running --------------------------------------------------------------------

    def __enter__(self) -> FakeHub:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/models/{user}/{repo}", self._info)
        app.router.add_get("/api/models/{user}/{repo}/refs", self._refs)
        app.router.add_get("/api/models/{user}/{repo}/tree/{rev}", self._tree)
        app.router.add_route("*", "/{user}/{repo}/resolve/{rev}/{path:.+}", self._resolve)
        app.router.add_route("*", "/cdn/{oid}", self._cdn)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        with self._lock:
            self.seen.append(Seen(request.method, request.path, request.headers.get("Range"),
                                  auth == f"Bearer {TOKEN}", auth))
        resp: web.StreamResponse = await handler(request)
        return resp

    # -- the hub's API --------------------------------------------------------------

    def _repo(self, request: web.Request) -> tuple[str, Repo]:
        name = f"{request.match_info['user']}/{request.match_info['repo']}"
        repo = self.repos.get(name)
        if repo is None:
            # What the hub answers for a repository it will not admit exists.
            raise web.HTTPUnauthorized(text=json.dumps({"error": "Repository not found"}),
                                       content_type="application/json")
        return name, repo

    async def _info(self, request: web.Request) -> web.Response:
        name, repo = self._repo(request)
        return web.json_response({"id": name, "sha": repo.commit, "gated": repo.gated and "auto",
                                  "siblings": [{"rfilename": p} for p in repo.files]})

    async def _refs(self, request: web.Request) -> web.Response:
        _, repo = self._repo(request)
        return web.json_response({"branches": [{"name": "main", "ref": "refs/heads/main",
                                                "targetCommit": repo.commit}],
                                  "converts": [], "tags": []})

    async def _tree(self, request: web.Request) -> web.Response:
        _, repo = self._repo(request)
        if request.match_info["rev"] not in (repo.commit, "main"):
            raise web.HTTPNotFound(text=json.dumps({"error": "Invalid rev id"}))
        if repo.tree_body is not None:
            return web.Response(body=repo.tree_body, content_type="application/json")
        out = []
        for path, f in repo.files.items():
            size = f.claimed if f.claimed is not None else len(f.data)
            git = hashlib.sha1(b"blob %d\0" % len(f.data) + f.data).hexdigest()
            entry: dict[str, Any] = {"type": "file", "oid": git, "size": size, "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.oid, "size": size, "pointerSize": 134}
            out.append(entry)
        return web.json_response(out)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        name, repo = self._repo(request)
        if repo.gated:
            auth = request.headers.get("Authorization")
            if auth is None:
                raise _gated(web.HTTPUnauthorized, f"Access to model {name} is restricted. "
                             "You must have access to it and be authenticated to access it. "
                             "Please log in.")
            if auth != f"Bearer {TOKEN}":
                raise _gated(web.HTTPForbidden, f"Access to model {name} is restricted and "
                             "you are not in the authorized list.")
        f = repo.files.get(request.match_info["path"])
        if f is None or request.match_info["rev"] not in (repo.commit, "main"):
            raise web.HTTPNotFound(text=json.dumps({"error": "Entry not found"}),
                                   content_type="application/json")
        if f.location is not None:  # set by hand: not checked, as a broken hub's is not
            return web.Response(status=302, headers={"Location": f.location})
        if f.lfs:
            where = f"http://{self.cdn_host}:{self.port}" if self.cdn_host else ""
            raise web.HTTPFound(f"{where}/cdn/{f.oid}",
                                headers={"X-Linked-Size": str(len(f.data))})
        return await self._send(request, f)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        oid = request.match_info["oid"]
        for repo in self.repos.values():
            for f in repo.files.values():
                if f.oid == oid:
                    return await self._send(request, f)
        raise web.HTTPNotFound()

    async def _send(self, request: web.Request, f: File) -> web.StreamResponse:
        data = f.served
        start, status = 0, 200
        wanted = request.headers.get("Range", "")
        if wanted.startswith("bytes=") and wanted.endswith("-"):
            start, status = int(wanted[6:-1]), 206
            if start >= len(data):
                raise web.HTTPRequestRangeNotSatisfiable(
                    headers={"Content-Range": f"bytes */{len(data)}"})
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{f.oid}"',
                   "Content-Length": str(len(data) - start)}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        end = len(data)
        if f.drop_at is not None and not f.dropped and start == 0:
            f.dropped = True
            end = f.drop_at
        step = 64 * 1024
        try:
            for at in range(start, end, step):
                await resp.write(data[at:min(end, at + step)])
                if self.rate:
                    await asyncio.sleep(step / self.rate)
        except ConnectionError:  # the downloader went away (stopped, killed)
            return resp
        if end < len(data):
            assert request.transport is not None
            request.transport.abort()  # the connection drops part-way through
            return resp
        await resp.write_eof()
        return resp


def _gated(refusal: type[web.HTTPException], why: str) -> web.HTTPException:
    """The hub's refusal of a gated repository, with its reason where clients read it."""
    return refusal(text=json.dumps({"error": why}), content_type="application/json",
                   headers={"X-Error-Code": "GatedRepo", "X-Error-Message": why})


def blob(n: int, seed: int) -> bytes:
    """n pseudo-random bytes (a file's content; the hub hashes it)."""
    out = bytearray()
    block = hashlib.sha256(b"%d" % seed).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])
