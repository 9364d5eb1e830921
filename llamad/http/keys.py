"""API keys: the key file, who may do what, and the one way to declare a route admin-only.

The file (`api-keys-file`) holds one key per line, optionally followed by its scope:

    KEY                  every model; no management
    KEY admin            every model, and loading, unloading, pinning, keep_alive, /status,
                         logs and whatever other route is declared @admin_only
    KEY models=a,b       only models a and b (or their aliases): the others look unknown

Blank lines and lines starting with `#` are ignored. It fails closed: a file that is set but
unreadable, malformed or holds no key stops llamad from starting (and `check-config` from
passing); a bad file on reload keeps the keys already loaded.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import stat
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from llamad.errors import ConfigError, LlamadError, unknown_model

log = logging.getLogger("llamad.keys")

ADMIN_ATTR = "llamad_admin_only"
PUBLIC_ATTR = "llamad_public"
H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])
T = TypeVar("T")


@dataclass(frozen=True)
class Key:
    """One API key: what it may do and which models it may use."""

    secret: bytes
    admin: bool = False
    models: frozenset[str] | None = None  # None: every model

    def may_use(self, model_id: str, aliases: Iterable[str] = ()) -> bool:
        return self.models is None or model_id in self.models or any(
            a in self.models for a in aliases)


# The key a request authenticated with; absent when no api-keys-file is set.
REQUEST_KEY: Any = web.RequestKey("llamad_key", Key) if hasattr(web, "RequestKey") \
    else "llamad_key"


def admin_only(handler: H) -> H:
    """Declare a route handler admin-only: with API keys set, only `admin` keys reach it
    (others get 403). Without API keys every client is admin, as before."""
    setattr(handler, ADMIN_ATTR, True)
    return handler


def public(handler: H) -> H:
    """Declare a route handler public: no key needed, as llama-server serves its UI. For
    the static files of the web UI and the dashboard, which hold no data (what they fetch
    is checked as usual): a browser cannot send a key with a page load."""
    setattr(handler, PUBLIC_ATTR, True)
    return handler


def parse(text: str, path: Path) -> tuple[Key, ...]:
    keys: dict[bytes, Key] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        secret, scope = words[0].encode(), words[1:]
        if secret in keys:
            raise ConfigError(f"{path}:{n}: this key appears on an earlier line too.")
        keys[secret] = _key(secret, scope, f"{path}:{n}")
    if not keys:
        raise ConfigError(f"{path}: api-keys-file holds no key, so every request would be "
                          "refused; put one key per line in it, or unset api-keys-file.")
    return tuple(keys.values())


def _key(secret: bytes, scope: list[str], where: str) -> Key:
    if not scope:
        return Key(secret)
    if scope == ["admin"]:
        return Key(secret, admin=True)
    if len(scope) == 1 and scope[0].startswith("models="):
        models = frozenset(m for m in scope[0].removeprefix("models=").split(",") if m)
        if models:
            return Key(secret, models=models)
    raise ConfigError(f"{where}: after the key comes nothing, \"admin\" or "
                      f"\"models=NAME,NAME\", not {' '.join(scope)!r}.")


def load(path: Path) -> tuple[Key, ...]:
    """Read and parse the key file; a ConfigError names the file. Warns when others may
    read it."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text"
        raise ConfigError(f"{path}: api-keys-file cannot be read ({why}); llamad does not "
                          "start without its keys.") from e
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: api-keys-file is readable by group or others (mode %04o); "
                    "chmod 600 it", path, stat.S_IMODE(st.st_mode))
    return parse(text, path)


def find(keys: Iterable[Key], presented: str) -> Key | None:
    """The key matching `presented`, comparing in constant time against every key."""
    # aiohttp hands undecodable header bytes over as surrogates: such a key matches none.
    given = presented.encode("utf-8", "surrogateescape")
    found = None
    for key in keys:
        if hmac.compare_digest(key.secret, given):
            found = key
    return found


def load_peer_key(path: Path) -> str:
    """The key llamad presents to its peers (`peer-key-file`): one line, one word."""
    try:
        st = path.stat()
        words = path.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text"
        raise ConfigError(f"{path}: peer-key-file cannot be read ({why}).") from e
    if len(words) != 1:
        raise ConfigError(f"{path}: peer-key-file must hold exactly one key (one word), not "
                          f"{len(words)} words.")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: peer-key-file is readable by group or others (mode %04o); "
                    "chmod 600 it", path, stat.S_IMODE(st.st_mode))
    return words[0]


class Keyring:
    """The keys in force; reload() replaces them from the file (SIGHUP). Also the key
    llamad presents to its peers, if `peer_key_file` is set."""

    def __init__(self, path: Path | None, peer_key_file: Path | None = None) -> None:
        self.path = path
        self.keys = load(path) if path is not None else ()
        self.peer_key_file = peer_key_file
        self.peer_key = load_peer_key(peer_key_file) if peer_key_file is not None else None

    async def reload(self) -> None:
        if self.peer_key_file is not None:
            try:
                self.peer_key = await asyncio.to_thread(load_peer_key, self.peer_key_file)
            except ConfigError as e:
                log.error("%s Keeping the peer key loaded before.", e.message)
        if self.path is None:
            return
        try:
            keys = await asyncio.to_thread(load, self.path)
        except ConfigError as e:
            log.error("%s Keeping the %d keys loaded before.", e.message, len(self.keys))
            return
        self.keys = keys
        log.info("%s: %d API keys loaded", self.path, len(keys))


KEYRING: Any = web.AppKey("keyring", Keyring) if hasattr(web, "AppKey") else "keyring"


def presented(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key", "")


def middleware(keyring: Keyring) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        # /health is public, as in llama-server; so are routes declared @public.
        public = getattr(request.match_info.handler, PUBLIC_ATTR, False)
        if request.path not in ("/health", "/v1/health") and not public:
            key = find(keyring.keys, presented(request))
            if key is None:
                raise _refused("a valid API key is required (Authorization: Bearer KEY, or "
                               "x-api-key: KEY)", 401, "invalid_api_key", "authentication_error")
            request[REQUEST_KEY] = key
            if getattr(request.match_info.handler, ADMIN_ATTR, False) and not key.admin:
                raise forbidden(f"{request.method} {request.path}")
        resp: web.StreamResponse = await handler(request)
        return resp
    return check


def _refused(message: str, status: int, code: str, kind: str) -> LlamadError:
    err = LlamadError(message, status=status, code=code)
    err.type = kind
    return err


def forbidden(what: str) -> LlamadError:
    return _refused(f"{what} needs an admin key (a line \"KEY admin\" in the api-keys-file)",
                    403, "admin_key_required", "permission_error")


def request_key(request: web.Request) -> Key | None:
    key: Key | None = request.get(REQUEST_KEY)
    return key


def require_admin(request: web.Request, what: str) -> None:
    """For admin-only parts of a request that any key may send (?reload=1)."""
    key = request_key(request)
    if key is not None and not key.admin:
        raise forbidden(what)


def admins_say(request: web.Request, value: T) -> T | None:
    """A part of a request only an admin key decides (keep_alive: how long a model that
    every key shares stays loaded); another key's is ignored, as if not sent, rather than
    refused: clients such as Continue send keep_alive with every request."""
    key = request_key(request)
    return value if key is None or key.admin else None


def may_use(request: web.Request, model_id: str, aliases: Iterable[str] = ()) -> bool:
    key = request_key(request)
    return key is None or key.may_use(model_id, aliases)


def check_model(request: web.Request, model_id: str, aliases: Iterable[str],
                name: str, peers: bool) -> None:
    """A scoped key's other models look exactly like unknown ones."""
    if not may_use(request, model_id, aliases):
        raise unknown_model(name, peers)
