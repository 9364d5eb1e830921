"""Model name -> llama-server@<instance>.service (the unit's markers map it back: units.Markers).

The instance string is only an identifier: it is never unescaped into a path. Names
that are already valid and readable are used as they are; any other name is made
readable (`/` becomes `-`, other characters `_`) and gets a short hash of the real
name, so `a/b` and `a-b` map to different units.
"""

from __future__ import annotations

import hashlib
import re

UNIT_PREFIX = "llama-server@"
UNIT_SUFFIX = ".service"
UNIT_PATTERN = f"{UNIT_PREFIX}*{UNIT_SUFFIX}"  # for systemd's ListUnitsByPatterns
SLICE = "llama-server.slice"  # every model unit runs in it (slice-memory-max limits it)
# systemd allows 255 bytes, but names a unit's PrivateTmp= directory
# systemd-private-<32 hex of the boot id>-<unit>-XXXXXX, one path component of at most
# 255 bytes: a longer unit name fails every start ("File name too long").
UNIT_NAME_MAX = 255 - len("systemd-private-") - 32 - len("-") - len("-XXXXXX")
INSTANCE_MAX = UNIT_NAME_MAX - len(UNIT_PREFIX) - len(UNIT_SUFFIX)
HASH_LEN = 8

_PLAIN = re.compile(r"[A-Za-z0-9_.:-]+")
_OTHER = re.compile(r"[^A-Za-z0-9_.:-]")


def _hash(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:HASH_LEN]


def instance_name(model_id: str, limit: int = INSTANCE_MAX) -> str:
    """`limit`: the longest instance the unit's prefix and suffix leave room for."""
    if (_PLAIN.fullmatch(model_id) and not model_id.startswith(".")
            and len(model_id) <= limit):
        return model_id
    readable = _OTHER.sub("_", model_id.replace("/", "-"))
    if readable.startswith("."):
        readable = "_" + readable[1:]
    readable = readable[:limit - HASH_LEN - 1]
    return f"{readable}-{_hash(model_id)}" if readable else _hash(model_id)


def unit_name(model_id: str) -> str:
    return f"{UNIT_PREFIX}{instance_name(model_id)}{UNIT_SUFFIX}"


def is_model_unit(unit: str) -> bool:
    return unit.startswith(UNIT_PREFIX) and unit.endswith(UNIT_SUFFIX)


# While llamad is away (idle-exit), a model's remaining idle TTL runs in a timer that
# starts a service conflicting with the model's unit: llamad-ttl@<instance>.timer/.service.
TTL_PREFIX = "llamad-ttl@"
TTL_TIMER_PATTERN = f"{TTL_PREFIX}*.timer"


def ttl_units(unit: str) -> tuple[str, str]:
    """The TTL timer of a model unit, and the service it starts."""
    name = TTL_PREFIX + instance_of(unit)
    return f"{name}.timer", f"{name}.service"


def unit_of_ttl_timer(timer: str) -> str:
    return f"{UNIT_PREFIX}{timer.removeprefix(TTL_PREFIX).removesuffix('.timer')}{UNIT_SUFFIX}"


def instance_of(unit: str) -> str:
    """llama-server@<instance>.service -> <instance>."""
    return unit.removeprefix(UNIT_PREFIX).removesuffix(UNIT_SUFFIX)


def bus_label(text: str) -> str:
    """sd-bus's escaping of a name into one D-Bus object path element."""
    return "".join(c if c.isascii() and c.isalnum() else "".join(
        f"_{b:02x}" for b in c.encode()) for c in text) or "_"


# systemd's D-Bus object path of every model unit starts with this.
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/" + bus_label(UNIT_PREFIX)
