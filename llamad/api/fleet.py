"""What llamad does to be a good host behind a load balancer (docs/scaling.md).

- Draining: after SIGTERM, for `shutdown-grace` seconds, /health answers 503 "draining"
  while requests are still served, so a balancer checking /health takes the host out
  before its port closes (app.serve calls `drain`).
- One catalog: with `peers` set, GET /v1/models also lists the models of the other llamads
  (asked at once, each bounded by `peer-timeout`), so a client of the fleet sees every
  model whichever host answered. A peer is asked with `?peers=no`, so it lists only its own.
  What the peers listed is kept (PeerMap): a request for a model only a peer serves is
  forwarded there (peerforward.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from llamad.errors import Unavailable
from llamad.http import keys, limits
from llamad.http.context import app_key
from llamad.supervisor.backend import capped_json

log = logging.getLogger("llamad.fleet")

LOCAL_ONLY = "no"  # GET /v1/models?peers=no: this host's models only
MAX_LISTING = 64 << 20  # bytes of a peer's model list (10,000 models are ~20 MB)


class Draining:
    """Whether llamad is draining; app.py puts one in the application (app[DRAINING])."""

    def __init__(self) -> None:
        self.on = False


DRAINING: Any = app_key("draining", Draining)


async def drain(app: web.Application, grace: float) -> None:
    """Say "draining" on /health for `grace` seconds, still serving; then return."""
    if grace <= 0 or DRAINING not in app:
        return
    app[DRAINING].on = True
    log.info("draining: /health answers 503 for %gs before the port closes", grace)
    await asyncio.sleep(grace)


def check_health(app: web.Application) -> None:
    """/health's answer while draining, or while every one of max-requests is taken: 503,
    which health checks count as down, so a balancer sends the next requests elsewhere."""
    if DRAINING in app and app[DRAINING].on:
        raise Unavailable("llamad is shutting down; it still serves requests until its "
                          "port closes", code="draining")
    if limits.LIMITS in app and (busy := app[limits.LIMITS].saturated()) is not None:
        raise busy


def wants_peers(request: web.Request, peers: tuple[str, ...]) -> bool:
    return bool(peers) and request.query.get("peers") != LOCAL_ONLY


async def with_peers(request: web.Request, local: bytes, peers: tuple[str, ...],
                     timeout: float, key: str | None = None) -> bytes:
    """GET /v1/models' body, `local` with the peers' models added: a model several hosts
    list appears once (this host's entry first); `peers` says how each peer answered.

    The peers are asked with llamad's own `key` (peer-key-file), never with the client's:
    a client's key, an admin's too, would travel in clear text to every peer. So the
    client's scope is applied here, to the peers' entries."""
    answers = await ask_peers(peers, timeout, key)
    if PEER_MAP in request.app:
        request.app[PEER_MAP].learn(peers, answers)
    listing = json.loads(local)
    seen = {e.get("id") for e in listing["data"]}
    report: list[dict[str, Any]] = []
    for url, (entries, error) in zip(peers, answers, strict=True):
        if error:
            report.append({"url": url, "error": error})
            continue
        entries = [e for e in entries if _may_see(request, e)]
        report.append({"url": url, "models": len(entries)})
        for entry in entries:
            if entry.get("id") not in seen:
                seen.add(entry.get("id"))
                listing["data"].append(_hosted(entry, url))
    listing["peers"] = report
    return json.dumps(listing).encode()


async def ask_peers(peers: tuple[str, ...], timeout: float,
                    key: str | None) -> list[tuple[list[Any], str]]:
    """Each peer's own models, or why not; all asked at once, each within `timeout`."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limit = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=limit, headers=headers) as session:
        return await asyncio.gather(*(_models_of(session, url, timeout) for url in peers))


@dataclass(frozen=True)
class PeerModel:
    """A model a peer listed: where it is, and what a client's key is checked against."""

    url: str
    model: str
    aliases: tuple[str, ...]


class PeerMap:
    """Which peer serves which model (by id or alias), from the last listing of the peers:
    GET /v1/models' or its own, made at most every FRESH seconds while names are found and
    at most every RETRY seconds for a name that is not (a client's typo asks no peer
    more often than that)."""

    FRESH = 10.0
    RETRY = 2.0

    def __init__(self) -> None:
        self.names: dict[str, PeerModel] = {}
        self.asked = -float("inf")  # monotonic time the last listing began
        self._asking: asyncio.Task[None] | None = None

    def learn(self, peers: tuple[str, ...], answers: list[tuple[list[Any], str]]) -> None:
        """A listing's answers; a peer that failed to answer keeps the models it listed
        before. The first peer listing a name gets it, ids before aliases, as in the
        listing."""
        found: list[PeerModel] = []
        kept = list(dict.fromkeys(self.names.values()))
        for url, (entries, error) in zip(peers, answers, strict=True):
            if error:  # down for now: its requests get a 502 naming it, not a 404
                found.extend(m for m in kept if m.url == url)
            for entry in entries:
                model, aliases = entry.get("id"), entry.get("aliases")
                if isinstance(model, str):
                    found.append(PeerModel(url, model, tuple(
                        a for a in aliases if isinstance(a, str))
                        if isinstance(aliases, list) else ()))
        names: dict[str, PeerModel] = {}
        for m in found:
            names.setdefault(m.model, m)
        for m in found:
            for alias in m.aliases:
                names.setdefault(alias, m)
        self.names = names
        self.asked = max(self.asked, time.monotonic())  # GET /v1/models' listing counts too

    async def find(self, name: str, peers: tuple[str, ...], timeout: float,
                   key: str | None) -> PeerModel | None:
        """The peer model `name` names. A name not known is looked for in a new listing
        (bounded by `timeout`); a known one is used while a stale listing is renewed."""
        age = time.monotonic() - self.asked
        known = self.names.get(name)
        if (known is None and age >= self.RETRY) or age >= self.FRESH:
            self._ask(peers, timeout, key)
        if known is None and self._asking is not None and not self._asking.done():
            await asyncio.shield(self._asking)  # a client leaving does not cut it for others
            return self.names.get(name)
        return known

    def _ask(self, peers: tuple[str, ...], timeout: float, key: str | None) -> None:
        if self._asking is None or self._asking.done():
            self.asked = time.monotonic()

            async def ask() -> None:
                self.learn(peers, await ask_peers(peers, timeout, key))
            self._asking = asyncio.ensure_future(ask())


PEER_MAP: Any = app_key("peer_map", PeerMap)


def _hosted(entry: dict[str, Any], url: str) -> dict[str, Any]:
    """A peer's entry marked with the peer that lists it. Its `llamad` is the peer's to
    write, so anything but an object there is replaced rather than trusted."""
    extra = entry.get("llamad")
    return {**entry, "llamad": {**(extra if isinstance(extra, dict) else {}), "host": url}}


def _may_see(request: web.Request, entry: dict[str, Any]) -> bool:
    model, aliases = entry.get("id"), entry.get("aliases")
    return isinstance(model, str) and keys.may_use(
        request, model, [a for a in aliases if isinstance(a, str)]
        if isinstance(aliases, list) else ())


@functools.cache
def verified() -> ssl.SSLContext:
    """A client context that verifies peers against the system's CAs. Not aiohttp's own:
    llamad imports aiohttp without loading the CAs (llamad/__init__.py)."""
    return ssl.create_default_context()


async def _models_of(session: aiohttp.ClientSession, url: str,
                     timeout: float) -> tuple[list[Any], str]:
    """A peer's own models, or why not (a sentence)."""
    try:
        async with session.get(f"{url}/v1/models", params={"peers": LOCAL_ONLY},
                               allow_redirects=False,
                               ssl=verified() if url.startswith("https:") else True) as r:
            if r.status != 200:
                return [], f"answered HTTP {r.status}"
            data = await capped_json(r, MAX_LISTING)
    except TimeoutError:
        return [], f"did not answer within peer-timeout ({timeout:g}s)"
    except RecursionError:  # JSON nested deeper than the decoder goes: not a model list
        data = None
    except (aiohttp.ClientError, ValueError, OSError) as e:
        return [], f"cannot be asked: {e or type(e).__name__}"
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return [], "answered something other than a model list"
    return [e for e in entries if isinstance(e, dict)], ""
