"""Where a model's llama-server listens, and the HTTP client sessions that reach it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from llamad.errors import SHORTAGE

# sun_path holds 108 bytes; long or odd instance names get a short stable hash. No ':'
# either: systemd writes RuntimeDirectory= and BindPaths= into the transient unit's file
# as they are, and splits them at ':' when it reads the file back (every daemon-reload).
_SAFE_DIR = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,47}")


def runtime_dir(instance: str) -> str:
    """The unit's RuntimeDirectory (relative to /run) for a unit instance name."""
    if _SAFE_DIR.fullmatch(instance):
        return f"llamad/{instance}"
    return "llamad/" + hashlib.sha256(instance.encode()).hexdigest()[:16]


def unix_address(run_dir: Path, instance: str) -> str:
    sub = runtime_dir(instance).removeprefix("llamad/")
    return f"unix:{run_dir / sub / 'llama.sock'}"


def tcp_address(port: int) -> str:
    return f"tcp:127.0.0.1:{port}"


def cpu_ticks(pid: int) -> int | None:
    """CPU time process `pid` has used, in clock ticks; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text() if pid > 0 else ""
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return int(fields[11]) + int(fields[12]) if len(fields) > 12 else None  # utime + stime


def listen_args(address: str) -> tuple[str, ...]:
    """llama-server's own flags to listen on `address`."""
    kind, _, rest = address.partition(":")
    if kind == "unix":
        # llama-server treats a --host ending in .sock as a UNIX socket path.
        return ("--host", rest)
    host, _, port = rest.rpartition(":")
    return ("--host", host, "--port", port)


SMALL_ANSWER = 1 << 20  # bytes llamad reads of a backend's /health, /slots or slot action
INLINE_JSON = 65536  # answers up to this size are decoded on the event loop


async def read_capped(r: aiohttp.ClientResponse, cap: int) -> bytes | bytearray:
    """An answer's body, at most `cap` bytes (ValueError beyond): what llamad reads for
    itself from a backend or a peer is bounded, whoever wrote it."""
    if r.content_length is not None and r.content_length > cap:
        raise ValueError(f"the answer is larger than the {cap} bytes llamad reads")
    data = bytearray()
    while chunk := await r.content.readany():
        data += chunk
        if len(data) > cap:
            raise ValueError(f"the answer is larger than the {cap} bytes llamad reads")
    return data


async def capped_json(r: aiohttp.ClientResponse, cap: int) -> Any:
    """An answer's JSON, at most `cap` bytes of it; a big one is decoded on a thread (its
    size bounds how long that holds the GIL)."""
    data = await read_capped(r, cap)
    if len(data) <= INLINE_JSON:
        return json.loads(data)
    return await asyncio.to_thread(json.loads, data)


# llama-server (cpp-httplib) closes a connection idle for 5 s. Reusing one at that moment
# loses the request, so pooled connections are dropped well before.
KEEPALIVE = 2.0
HEALTH_TIMEOUT = 2.0
SHORT = -1  # _health: llamad itself lacked descriptors or memory to ask
PROBE_TIMEOUT = 5.0  # seconds a liveness probe waits for /health (at most liveness-timeout)
PROPS_MAX = 1 << 20  # /props is a few KiB, the chat template its bulk


@dataclass
class Backend:
    """One model process's address and the HTTP client sessions that reach it.

    Requests hold a session through `client()`. `renew()` retires the pooled connections
    (they may lead to a process that died) without cutting responses still in flight on
    them; `close()` never cuts them either: a session closes when its last user leaves.
    """

    address: str  # "unix:/run/llamad/x/llama.sock" or "tcp:127.0.0.1:39001"
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)
    _users: dict[aiohttp.ClientSession, int] = field(default_factory=dict, repr=False)
    _closed: bool = field(default=False, repr=False)
    last_heard: float = 0.0  # monotonic time of its last answer on any request (heard())
    _probe: asyncio.Future[bool | None] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        kind, _, rest = self.address.partition(":")
        return "http://localhost" if kind == "unix" else f"http://{rest}"

    def _new_session(self) -> aiohttp.ClientSession:
        kind, _, rest = self.address.partition(":")
        connector: aiohttp.BaseConnector
        if kind == "unix":
            connector = aiohttp.UnixConnector(path=rest, limit=0, keepalive_timeout=KEEPALIVE)
        else:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE)
        # No overall timeout: generations may stream for minutes (forward watches silence).
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)

    def session(self) -> aiohttp.ClientSession:
        """The current session, not held: for short calls that may be cut by renew()
        (a probe); a request's answer goes through client()."""
        if self._session is None or self._session.closed:
            self._session = self._new_session()
        return self._session

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[aiohttp.ClientSession]:
        """The current session, held until the response is done with."""
        session = self.session()
        self._users[session] = self._users.get(session, 0) + 1
        try:
            yield session
        finally:
            self._users[session] -= 1
            if self._users[session] == 0:
                del self._users[session]
                if session is not self._session or self._closed:
                    await session.close()

    async def renew(self) -> None:
        """Never reuse the pooled connections again: later requests connect afresh."""
        old, self._session = self._session, None
        if old is not None and old not in self._users:
            await old.close()

    def heard(self) -> None:
        """Bytes came from the backend: it is alive."""
        self.last_heard = time.monotonic()

    async def healthy(self, timeout: float = HEALTH_TIMEOUT) -> bool:
        """/health answers 200 within `timeout` seconds: ready."""
        return await self._health(timeout) == 200

    async def answers(self, timeout: float) -> bool | None:
        """/health answers at all within `timeout` (a 503 is an answer too): alive. None:
        llamad could not ask, being out of descriptors or memory itself, which says
        nothing of the backend."""
        status = await self._health(timeout)
        return None if status == SHORT else status is not None

    async def _health(self, timeout: float) -> int | None:
        """/health's status; None: no answer; SHORT: llamad could not ask."""
        try:
            async with self.client() as session, session.get(
                    self.base_url + "/health", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                await read_capped(r, SMALL_ANSWER)
        except OSError as e:  # aiohttp's connect errors too; TimeoutError has no errno
            return SHORT if e.errno in SHORTAGE else None
        except (aiohttp.ClientError, ValueError):
            return None
        self.heard()
        return r.status

    async def sleeping(self, timeout: float = HEALTH_TIMEOUT) -> bool | None:
        """Whether llama-server sleeps (--sleep-idle-seconds), from /props' `is_sleeping`,
        which it answers asleep without waking; None: no answer, or none that says."""
        try:
            async with self.client() as session, session.get(
                    self.base_url + "/props", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                body = await r.content.read(PROPS_MAX) if r.status == 200 else b""
        except (OSError, aiohttp.ClientError):
            return None
        self.heard()
        try:
            asleep = json.loads(body).get("is_sleeping")
        except (ValueError, AttributeError):
            return None
        return asleep if isinstance(asleep, bool) else None

    async def probe(self, timeout: float, pid: int = 0) -> bool | None:
        """Alive: /health answers within `timeout`, or process `pid` (0: unknown) uses CPU
        meanwhile. On a busy machine /health can take many seconds while the process
        computes; a stopped or deadlocked one computes nothing. None: llamad could not
        ask (answers()). One check at a time, shared by all who ask meanwhile (requests,
        the liveness tick)."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._check(timeout, pid))
        return await asyncio.shield(self._probe)

    async def _check(self, timeout: float, pid: int) -> bool | None:
        before = cpu_ticks(pid)
        answered = await self.answers(timeout)
        if answered is not False:
            return answered
        after = cpu_ticks(pid)
        return before is not None and after is not None and after > before

    async def close(self) -> None:
        """Close the idle session now; one still in use closes after its last response."""
        self._closed = True
        await self.renew()
