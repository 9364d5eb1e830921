"""The downloader each `llamad-download@<model>.service` runs: `python3 -m llamad.catalog.fetch`.

One model per process, in its own sandboxed unit (systemd/downloadunit.py): it asks the hub
which files the name means (hub.py), checks the free disk space, tells systemd READY=1 with
the plan, then fetches each file into blobs/<oid>.downloadInProgress, resuming with an HTTP
Range where a part is already there, hashes it as it arrives and renames it into place only
once its SHA-256 (SHA-1 for a small git file) matches the hub's; the snapshot's links come
last (hub.publish). A file another download is fetching (an flock on its part file) is
waited for, not fetched twice. Progress and the reason of a failure are its STATUS= line
(JSON), which llamad reads from systemd.

Exit status 0 when done; 65 when trying again cannot help (no such repository or file, a
gated one without access, a corrupt file, too little disk): the unit's
RestartPreventExitStatus=; 75 after the network failed RETRIES times in a row: systemd
starts it again, and it resumes. The token (gated repositories) comes from systemd's
credential `hf-token` and goes only to the hub's own host, never to a redirect elsewhere;
nothing prints it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import http.client
import json
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from llamad.catalog import hub
from llamad.catalog.fetchstatus import Status
from llamad.catalog.hub import HubError, Name, Plan, RemoteFile
from llamad.safetext import one_line

EXIT_PERMANENT = 65  # EX_DATAERR
EXIT_RETRY = 75  # EX_TEMPFAIL
TIMEOUT = 30.0  # seconds a connect, or any one read, may take
JSON_MAX = 16 * 1024 * 1024  # bytes of a hub answer in JSON
ERROR_MAX = 4096  # bytes of an error answer read for its message
CHUNK = 1024 * 1024
RETRIES = 5  # failed attempts in a row before the process gives up (systemd restarts it)
BACKOFF = 1.0  # seconds before the first retry, doubled each time
MAX_REDIRECTS = 5
DISK_MARGIN = 64 * 1024 * 1024  # bytes left free beyond what the files need
TOKEN_CREDENTIAL = "hf-token"
USER_AGENT = "llamad-fetch/1"


def log(message: str) -> None:
    print(message, flush=True)


class Http:
    """GET and HEAD with redirects followed by hand, so that the token goes to the hub's
    own origin only; every connect and read bounded by TIMEOUT."""

    def __init__(self, endpoint: str, token: str | None) -> None:
        self.endpoint = endpoint
        self.origin = _origin(endpoint)
        self.token = token
        self.tls = ssl.create_default_context()

    def open(self, method: str, url: str, headers: dict[str, str] | None = None,
             ) -> http.client.HTTPResponse:
        """The final answer (its connection closes with it); OSError for no answer."""
        for _ in range(MAX_REDIRECTS + 1):
            parts, port = _address(url)
            conn: http.client.HTTPConnection = (
                http.client.HTTPSConnection(parts.hostname, port, timeout=TIMEOUT,
                                            context=self.tls)
                if parts.scheme == "https" else
                http.client.HTTPConnection(parts.hostname, port, timeout=TIMEOUT))
            # One connection per request: `close` hands its socket to the answer, so
            # closing the answer closes it (else it lingers until garbage collection).
            sent = {"User-Agent": USER_AGENT, "Connection": "close", **(headers or {})}
            if self.token and _origin(url) == self.origin:
                sent["Authorization"] = f"Bearer {self.token}"
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            _send(conn, method, path or "/", sent, url)
            resp = conn.getresponse()
            location = resp.getheader("Location")
            if resp.status in (301, 302, 303, 307, 308) and location:
                resp.close()
                conn.close()
                url = _join(url, location)
                continue
            return resp
        raise HubError(f"the hub redirected {one_line(url)[:200]} more than {MAX_REDIRECTS} "
                       "times")

    def json(self, url: str, what: str) -> Any:
        resp = self.open("GET", url, {"Accept": "application/json"})
        with resp:
            check(resp, what)
            body = resp.read(JSON_MAX + 1)
        if len(body) > JSON_MAX:
            raise HubError(f"the hub's answer about {what} is larger than {JSON_MAX} bytes")
        try:
            return json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested too deep for json
            raise HubError(f"the hub's answer about {what} is not JSON") from None


# What the hub sends (a redirect's Location above all) is parsed by urllib and http.client,
# which raise ValueError (and InvalidURL) for what they cannot use: one sentence instead
# of a traceback, and permanent (a hub that sends it again would get the same).
def _bad_address(url: str) -> HubError:
    return HubError(f"the hub sent a download to {one_line(url)[:200]!r}, which is not a "
                    "valid http or https address")


def _address(url: str) -> tuple[Any, int | None]:
    """urlsplit(url) and its port, if it is an address llamad can ask."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _bad_address(url) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad_address(url)
    return parts, port


def _join(url: str, location: str) -> str:
    try:
        return urljoin(url, location)
    except ValueError:
        raise _bad_address(location) from None


def _send(conn: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str],
          url: str) -> None:
    try:
        conn.request(method, path, headers=headers)
    except http.client.InvalidURL:
        raise _bad_address(url) from None
    except ValueError:  # a header value; its text may hold the token, so it is not told
        raise HubError(f"cannot ask {one_line(url)[:200]}: a header holds characters HTTP "
                       "does not allow (is the hf-token-file one line?)") from None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def check(resp: http.client.HTTPResponse, what: str) -> None:
    """Nothing for a success; else the hub's refusal as one sentence."""
    if resp.status < 400:
        return
    # The hub says why in the body, and (for a HEAD too) in X-Error-Message.
    said = _message(resp.read(ERROR_MAX)) or one_line(resp.getheader("X-Error-Message") or "")[:200]
    said = f" (the hub says: {said})" if said else ""
    if resp.status == 401:
        raise HubError(f"the hub refuses {what} without a token{said}: the repository is "
                       "gated, private or missing; accept its terms on the hub and set "
                       "hf-token-file in llamad.conf")
    if resp.status == 403:
        raise HubError(f"the hub refuses {what} with this token{said}: it has no access to "
                       "the repository; accept its terms on the hub")
    if resp.status == 404:
        raise HubError(f"the hub has no {what}{said}")
    raise HubError(f"the hub answered HTTP {resp.status} for {what}{said}",
                   permanent=resp.status < 500 and resp.status != 429)


def _message(body: bytes) -> str:
    try:
        data = json.loads(body)
        text = data.get("error") if isinstance(data, dict) else None
    except ValueError:
        text = None
    return one_line(str(text))[:200] if text else ""


def make_plan(http_: Http, name: Name) -> Plan:
    repo = quote(name.repo, safe="/")
    base = f"{http_.endpoint}api/models/{repo}"
    commit = hub.parse_refs(http_.json(f"{base}/refs", f"repository {name.repo}"), name.repo)
    files = hub.parse_tree(http_.json(f"{base}/tree/{commit}?recursive=true",
                                      f"the file list of {name.repo}"), name.repo)
    return hub.choose(name, commit, files)


def file_url(endpoint: str, plan: Plan, f: RemoteFile) -> str:
    return f"{endpoint}{quote(plan.name.repo, safe='/')}/resolve/{plan.commit}/" \
           f"{quote(f.path, safe='/')}"


def check_access(http_: Http, plan: Plan, f: RemoteFile) -> None:
    """A HEAD of the file, so that a gated or missing file is refused before READY."""
    resp = http_.open("HEAD", file_url(http_.endpoint, plan, f))
    with resp:
        check(resp, f"file {f.path} of {plan.name.repo}")


def missing_bytes(cache: Path, plan: Plan) -> int:
    need = 0
    for f in plan.files:
        final = hub.blob(cache, plan.name, f.oid)
        if final.exists():
            continue
        try:
            have = os.stat(str(final) + hub.PARTIAL).st_size
        except OSError:
            have = 0
        need += max(0, f.size - have)
    return need


def check_disk(cache: Path, plan: Plan) -> None:
    need = missing_bytes(cache, plan)
    st = os.statvfs(cache)
    free = st.f_bavail * st.f_frsize
    if need + DISK_MARGIN > free:
        raise HubError(f"not enough free disk space in {cache} for {plan.model or plan.name}: "
                       f"it needs {_size(need)} more and {_size(free)} are free")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


class Retry(Exception):
    """A transfer broke off (connection lost, stalled, refused for now): resume it."""


class Part:
    """blobs/<oid>.downloadInProgress, held under an exclusive flock while written."""

    def __init__(self, cache: Path, plan: Plan, f: RemoteFile) -> None:
        self.f = f
        self.final = hub.blob(cache, plan.name, f.oid)
        self.path = Path(str(self.final) + hub.PARTIAL)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.file = os.fdopen(fd, "r+b")
        self.have = 0
        self.hasher = self._new_hasher()

    def _new_hasher(self) -> Any:
        if len(self.f.oid) == 64:
            return hashlib.sha256()
        h = hashlib.sha1()  # git's blob id: "blob <size>\0" and the content
        h.update(b"blob %d\0" % self.f.size)
        return h

    def lock(self, status: Status) -> None:
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{self.f.path}: another download is fetching it; waiting for it")
            status.send(phase="waiting", file=self.f.path)
            fcntl.flock(self.file, fcntl.LOCK_EX)

    def ours(self) -> bool:
        """Whether the part file's path is still the file this process holds."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino
        except OSError:
            return False

    def read_back(self) -> None:
        """Hash what an earlier attempt left, so that the download goes on from there."""
        size = os.fstat(self.file.fileno()).st_size
        if size > self.f.size:
            self.restart()
            return
        self.file.seek(0)
        while chunk := self.file.read(CHUNK):
            self.hasher.update(chunk)
        self.have = size

    def restart(self) -> None:
        self.file.truncate(0)
        self.file.seek(0)
        self.have = 0
        self.hasher = self._new_hasher()

    def write(self, chunk: bytes) -> None:
        try:
            self.file.write(chunk)
        except OSError as e:  # the disk (full, read-only), not the network: no retry helps
            raise HubError(f"cannot write {self.path}: {e.strerror or e}; what arrived stays "
                           "for a later pull to resume") from None
        self.hasher.update(chunk)
        self.have += len(chunk)

    def verify_and_place(self) -> None:
        got = self.hasher.hexdigest()
        if got != self.f.oid:  # deleted under the lock: a waiter then finds the path gone
            self.path.unlink(missing_ok=True)
            self.file.close()
            raise HubError(f"{self.f.path} does not match the hub's {self.f.digest} (it hashes "
                           f"to {got}); the download was deleted")
        self.file.flush()
        os.fsync(self.file.fileno())
        os.rename(self.path, self.final)

    def close(self) -> None:
        self.file.close()


def transfer(http_: Http, url: str, part: Part, status: Status) -> None:
    """One GET of what is missing; Retry if it broke off."""
    headers = {"Range": f"bytes={part.have}-"} if part.have else {}
    try:
        resp = http_.open("GET", url, headers)
    except OSError as e:
        raise Retry(f"no answer from the hub ({e})") from None
    with resp:
        if resp.status == 416:  # the part is not a prefix of this file
            check_size(resp, part.f)
            part.restart()
            raise Retry("the hub refused to resume; starting over")
        if resp.status >= 500 or resp.status == 429:
            raise Retry(f"the hub answered HTTP {resp.status}")
        check(resp, f"file {part.f.path}")
        if part.have and (resp.status != 206 or not (resp.getheader("Content-Range") or "")
                          .startswith(f"bytes {part.have}-")):
            log(f"{part.f.path}: the hub sent the whole file again; starting over")
            part.restart()
        check_size(resp, part.f)
        part.file.seek(part.have)
        try:
            while part.have < part.f.size:
                chunk = resp.read(min(CHUNK, part.f.size - part.have))
                if not chunk:
                    raise Retry(f"the connection ended at {part.have} of {part.f.size} bytes")
                part.write(chunk)
                status.progress(part.have)
        except (OSError, http.client.HTTPException) as e:
            raise Retry(f"the transfer broke off at {part.have} of {part.f.size} bytes "
                        f"({type(e).__name__}: {one_line(str(e))[:200]})") from None


def check_size(resp: http.client.HTTPResponse, f: RemoteFile) -> None:
    """The file's size as the answer says it must be the one the hub listed: a file read
    to a listed size it does not reach would be resumed past its end (416), started over
    and fetched whole again without end; one larger would fail only at its hash."""
    told = resp.getheader("Content-Range") or ""
    total = told.rpartition("/")[2] if told else \
        (resp.getheader("Content-Length") or "") if resp.status == 200 else ""
    total = total.strip()
    if total.isdigit() and len(total) < 20 and int(total) != f.size:
        raise HubError(f"the hub lists {f.path} as {f.size} bytes but sends {int(total)}")


def fetch_file(http_: Http, cache: Path, plan: Plan, f: RemoteFile, status: Status) -> None:
    # Named before any wait for its lock: a status of this file with the last one's hash,
    # size and address would show llamad's listeners the wrong file.
    status.fields.update(file=f.path, oid=f.oid, file_total=f.size, file_done=0,
                         url=file_url(http_.endpoint, plan, f))
    part = Part(cache, plan, f)
    part.lock(status)
    while not part.ours():  # the download waited for failed its hash and deleted the file
        part.close()
        part = Part(cache, plan, f)
        part.lock(status)
    try:
        if part.final.exists():  # another download placed it meanwhile
            part.path.unlink()  # ours: the loop above holds its lock
            return
        part.read_back()
        if part.have:
            log(f"{f.path}: resuming at {part.have} of {f.size} bytes")
        status.send(phase="downloading", file_done=part.have, done=status.base + part.have)
        pull(http_, file_url(http_.endpoint, plan, f), part, status)
        status.send(phase="verifying")
        part.verify_and_place()
        log(f"{f.path}: {f.size} bytes, {f.digest} verified")
    finally:
        part.close()


def pull(http_: Http, url: str, part: Part, status: Status) -> None:
    failures = 0
    furthest = part.have  # only bytes beyond it are progress: a start over is none
    while part.have < part.f.size:
        try:
            transfer(http_, url, part, status)
        except Retry as e:
            failures = 1 if part.have > furthest else failures + 1
            furthest = max(furthest, part.have)
            if failures > RETRIES:
                raise
            pause = BACKOFF * 2 ** (failures - 1)
            log(f"{part.f.path}: {e}; resuming in {pause:.0f} s")
            time.sleep(pause)


def download(http_: Http, cache: Path, name: Name, status: Status) -> None:
    try:
        plan = make_plan(http_, name)
        todo = [f for f in plan.files if not hub.blob(cache, plan.name, f.oid).exists()]
        for f in todo:
            check_access(http_, plan, f)
    except (OSError, http.client.HTTPException) as e:
        raise HubError(f"cannot reach the hub at {http_.endpoint} ({one_line(str(e))[:200]})",
                       permanent=False) from None
    check_disk(cache, plan)
    total = sum(f.size for f in plan.files)
    log(f"{name}: {len(plan.files)} files of {plan.name.repo} at {plan.commit}, "
        f"{_size(total)}, {len(todo)} to fetch")
    status.send(ready=True, phase="downloading", model=plan.model, commit=plan.commit,
                preset=plan.preset, total=total, files=[f.path for f in plan.files])
    status.base = total - sum(f.size for f in todo)
    for f in todo:
        fetch_file(http_, cache, plan, f, status)
        status.base += f.size
    hub.publish(cache, plan)
    status.send(phase="done", done=total)
    log(f"{plan.model or name}: in the cache")


def read_token() -> str | None:
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        return None
    try:
        with open(Path(folder) / TOKEN_CREDENTIAL, "rb") as f:
            token = f.read(4096).decode(errors="replace").strip()
    except OSError:
        return None
    return token or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m llamad.catalog.fetch",
                                description="download a model into llama.cpp's cache")
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--endpoint", default="")
    p.add_argument("--remove", action="store_true", help="remove it from the cache instead")
    p.add_argument("name")
    args = p.parse_args(argv)
    status = Status()
    try:
        name = hub.parse_name(args.name)
        if args.remove:
            removed = hub.remove(args.cache, name)
            log(f"{name}: {removed} files removed from {args.cache}")
            return 0
        http_ = Http(hub.endpoint(args.endpoint, os.environ), read_token())
        download(http_, args.cache, name, status)
        return 0
    except HubError as e:
        return fail(status, str(e), EXIT_PERMANENT if e.permanent else EXIT_RETRY)
    except Retry as e:
        return fail(status, f"the download failed {RETRIES + 1} times in a row: {e}",
                    EXIT_RETRY)
    except OSError as e:
        return fail(status, f"{e.strerror or e} ({e.filename or args.cache})",
                    EXIT_PERMANENT if e.filename else EXIT_RETRY)


def fail(status: Status, message: str, code: int) -> int:
    log(message)
    status.send(phase="failed", error=message[:1000])
    return code


if __name__ == "__main__":
    sys.exit(main())
