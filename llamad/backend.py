"""Where a model's llama-server listens, and one HTTP client session to reach it."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

# sun_path holds 108 bytes; long or odd instance names get a short stable hash.
_SAFE_DIR = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,47}")


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


def listen_args(address: str) -> tuple[str, ...]:
    """llama-server's own flags to listen on `address`."""
    kind, _, rest = address.partition(":")
    if kind == "unix":
        # llama-server treats a --host ending in .sock as a UNIX socket path.
        return ("--host", rest)
    host, _, port = rest.rpartition(":")
    return ("--host", host, "--port", port)


@dataclass
class Backend:
    address: str  # "unix:/run/llamad/x/llama.sock" or "tcp:127.0.0.1:39001"
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        kind, _, rest = self.address.partition(":")
        return "http://localhost" if kind == "unix" else f"http://{rest}"

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            kind, _, rest = self.address.partition(":")
            connector: aiohttp.BaseConnector
            if kind == "unix":
                connector = aiohttp.UnixConnector(path=rest, limit=0)
            else:
                connector = aiohttp.TCPConnector(limit=0)
            # No overall timeout: generations may stream for minutes.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                                  auto_decompress=False)
        return self._session

    async def healthy(self) -> bool:
        try:
            async with self.session().get(self.base_url + "/health",
                                          timeout=aiohttp.ClientTimeout(total=2)) as r:
                return r.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
