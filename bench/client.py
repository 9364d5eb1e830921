"""Loopback HTTP clients for the benchmarks.

Sequential measurements use http.client on one kept-alive connection per
contender: it adds the least client time, and that time is the same for every
contender, so differences between them are the servers' own. The parallel
section uses aiohttp, which can hold 32 streams in one thread.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import aiohttp

TIMEOUT = 300.0  # a cold start or a swap on a busy 2-core machine can take a while


class Conn:
    """One kept-alive connection to a base URL such as http://127.0.0.1:8080."""

    def __init__(self, base: str) -> None:
        url = urllib.parse.urlsplit(base)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _send(self, method: str, path: str, body: dict[str, Any] | None
              ) -> http.client.HTTPResponse:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        # A server may close an idle kept-alive connection; retry once on a new one.
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, path, body=data, headers=headers)
                return conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None
             ) -> tuple[float, int, bytes]:
        """(seconds, status, body) of one request, timed from send to the last byte."""
        start = time.perf_counter()
        resp = self._send(method, path, body)
        data = resp.read()
        elapsed = time.perf_counter() - start
        if resp.will_close:
            self.close()
        return elapsed, resp.status, data

    def ok(self, method: str, path: str, body: dict[str, Any] | None = None) -> float:
        """Seconds of one request that must answer 200."""
        elapsed, status, data = self.call(method, path, body)
        if status != 200:
            raise RuntimeError(f"{method} {path} on {self.host}:{self.port} answered "
                               f"{status}: {data[:300]!r}")
        return elapsed

    def stream(self, path: str, body: dict[str, Any]) -> Stream:
        """Read an SSE response, noting the arrival time of every event carrying text."""
        start = time.perf_counter()
        resp = self._send("POST", path, body)
        if resp.status != 200:
            raise RuntimeError(f"stream {path} answered {resp.status}: {resp.read()[:300]!r}")
        arrivals: list[float] = []
        for line in resp:
            now = time.perf_counter()  # before parsing, so JSON time is not counted
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                break
            if _has_text(json.loads(payload)):
                arrivals.append(now)
        resp.read()
        if resp.will_close:
            self.close()
        return Stream(start, arrivals)


def _has_text(event: dict[str, Any]) -> bool:
    for choice in event.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


@dataclass
class Stream:
    start: float
    arrivals: list[float]

    @property
    def tokens(self) -> int:
        return len(self.arrivals)

    @property
    def rate(self) -> float:
        """Tokens per second from the first token to the last (decode speed)."""
        span = self.arrivals[-1] - self.arrivals[0]
        return (self.tokens - 1) / span if span > 0 else 0.0

    @property
    def gaps_ms(self) -> list[float]:
        a = self.arrivals
        return [(a[i + 1] - a[i]) * 1000 for i in range(len(a) - 1)]


async def _one_stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    tokens = 0
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"stream answered {r.status}: {(await r.text())[:300]}")
        async for line in r.content:
            if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]" \
                    and _has_text(json.loads(line[6:])):
                tokens += 1
    return tokens


async def _parallel(url: str, body: dict[str, Any], clients: int) -> tuple[int, float]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        counts = await asyncio.gather(*(_one_stream(session, url, body)
                                        for _ in range(clients)))
        return sum(counts), time.perf_counter() - start


def parallel_streams(base: str, path: str, body: dict[str, Any], clients: int
                     ) -> tuple[int, float]:
    """(tokens received in all, wall seconds) for `clients` simultaneous streams."""
    return asyncio.run(_parallel(base + path, body, clients))
