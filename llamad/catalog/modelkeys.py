"""The values of the preset keys that are not llama-server flags: the router's preset-only
keys and llamad's own (presets.py reads the INI; this checks what each key may hold). Among
them what a model's unit runs besides its flags: how many requests it gets at once
(`concurrency-limit`), its environment (`env`) and which llama-server binary
(`llama-server`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from llamad.config import DURATION_MAX
from llamad.errors import ConfigError
from llamad.safetext import unsafe
from llamad.sizes import SIZE, parse_size

TRUE = ("on", "enabled", "true", "1", "yes")
FALSE = ("off", "disabled", "false", "0", "no")

CONCURRENCY = "concurrency-limit"
ENV = "env"
SERVER = "llama-server"
KEYS = (CONCURRENCY, ENV, SERVER)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A comma starts a new pair only where NAME= follows: values such as HIP_VISIBLE_DEVICES=0,1
# keep their commas.
_PAIRS = re.compile(r",\s*(?=[A-Za-z_][A-Za-z0-9_]*=)")
# Names whose values llamad treats as secrets: masked wherever llamad shows them.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)
# Set by llamad on every unit, or llama-server's own flags by another name.
_CUDA = "CUDA_VISIBLE_DEVICES"


def check(key: str, value: str, where: str, base: Path | None = None) -> object:
    """The checked value of a preset-only or llamad-only key; ConfigError names file,
    key, value and range."""
    if key in KEYS:
        return _control(key, value, where, base)
    bad = ConfigError(f"{where}: {key} = {value!r} is invalid; allowed: {_ALLOWED[key]}.")
    try:
        if key in ("load-on-startup", "pin", "split", "dedup-cache-models", "restore"):
            on = truthy(value)
            if on is None:
                raise bad
            return on
        if key in ("stop-timeout", "ttl"):
            number = float(value)
            if not math.isfinite(number) or number > DURATION_MAX or \
                    (number < 0 and not (key == "ttl" and number == -1)):
                raise bad  # nan and inf too: a stop timeout of either failed every start
            return None if number == -1 else number
        if key in ("memory-max", "memory-high"):
            if not SIZE.fullmatch(value.strip()):
                raise bad
            return value.strip()
        if key == "ctx-max":
            if int(value) < 0:
                raise bad
            return int(value)
        if key == "memory-need":
            return _memory_need(value, bad)
        devices = tuple(int(d) for d in value.split(","))
        if any(d < 0 for d in devices):
            raise bad
        return devices
    except ValueError:
        raise bad from None


def truthy(value: str) -> bool | None:
    v = value.strip().lower()
    return True if v in TRUE else False if v in FALSE else None


_ALLOWED = {
    "load-on-startup": "true or false", "pin": "true or false", "split": "true or false",
    "restore": "true or false",
    "dedup-cache-models": "true or false",
    "stop-timeout": f"seconds from 0 to {DURATION_MAX:.0f}",
    "ttl": f"seconds from 0 to {DURATION_MAX:.0f}, or -1 to inherit idle-ttl",
    "memory-max": "a systemd size such as 8G", "memory-high": "a systemd size such as 8G",
    "devices": "comma-separated GPU indices such as 0,1",
    "ctx-max": "a whole number of tokens >= 0 (0 = no cap)",
    "memory-need": "a size such as 6G (RAM), or ram=SIZE and/or vram=SIZE separated by commas",
    CONCURRENCY: "a whole number >= 0 (0 = no limit)",
    ENV: "NAME=value pairs separated by commas, such as GGML_CUDA_ENABLE_UNIFIED_MEMORY=1",
    SERVER: "the absolute path of a llama-server binary (or one relative to the preset file)",
}


def _memory_need(value: str, bad: ConfigError) -> tuple[int | None, int | None]:
    """`6G` (RAM; on a machine without GPUs every byte is RAM), `ram=2G,vram=6G`."""
    found: dict[str, int] = {}
    for part in (p.strip() for p in value.split(",")):
        key, _, size = part.rpartition("=") if "=" in part else ("ram", "=", part)
        key, size = key.strip(), size.strip()
        if key not in ("ram", "vram") or key in found or not SIZE.fullmatch(size) \
                or size.endswith("%") or size == "infinity":
            raise bad
        found[key] = parse_size(size, lambda: 0) or 0
    return found.get("ram"), found.get("vram")


def _control(key: str, value: str, where: str, base: Path | None) -> object:
    if key == CONCURRENCY:
        try:
            limit = int(value.strip())
        except ValueError:
            limit = -1
        if limit < 0:
            raise _bad(where, key, value)
        return limit
    if key == ENV:
        return env_pairs(value, where)
    return server_path(value, where, base)


def _bad(where: str, key: str, value: str, why: str = "") -> ConfigError:
    return ConfigError(f"{where}: {key} = {value!r} is invalid{why}; allowed: {_ALLOWED[key]}.")


def env_pairs(value: str, where: str) -> tuple[str, ...]:
    """`A=1, B=x,y` -> ("A=1", "B=x,y"), each checked."""
    out: dict[str, str] = {}
    for pair in (p.strip() for p in _PAIRS.split(value.strip()) if p.strip()):
        name, eq, val = pair.partition("=")
        name = name.strip()
        if not eq or not _NAME.fullmatch(name):
            raise _bad(where, ENV, pair, " (not NAME=value)")
        if (why := unsafe(val)) is not None:
            raise ConfigError(f"{where}: env {name}: the value {why}; systemd's Environment= "
                              "takes one line of text.")
        refused = _refused(name)
        if refused:
            raise ConfigError(f"{where}: env {name} cannot be set here: {refused}.")
        out[name] = val.strip()
    return tuple(f"{k}={v}" for k, v in out.items())


def _refused(name: str) -> str:
    if name == _CUDA:
        return ("llamad sets it on every model's unit to the GPUs it placed the model on; "
                "use devices = 0,1 to choose them")
    if name.startswith("LLAMAD_"):
        return "llamad's own LLAMAD_* variables mark the units it starts"
    if name.startswith("LLAMA_ARG_"):
        return ("it is a llama-server option by another name; give it as a preset key "
                "(such as ctx-size = 8192), which llamad checks and passes on the command line")
    return ""


def secret_values(env: tuple[str, ...]) -> list[str]:
    """Values of env entries whose names look like secrets (HF_TOKEN, ..._API_KEY)."""
    return [v for name, _, v in (e.partition("=") for e in env)
            if SECRET_NAME.search(name) and v]


def masked(env: tuple[str, ...], mask: str) -> tuple[str, ...]:
    """`env` with the values of secret-looking names replaced by `mask`."""
    return tuple(f"{n}={mask}" if SECRET_NAME.search(n) and v else f"{n}={v}"
                 for n, _, v in (e.partition("=") for e in env))


def server_path(value: str, where: str, base: Path | None) -> Path:
    text = value.strip()
    if not text or (why := unsafe(text)) is not None:
        raise _bad(where, SERVER, value, f" ({why})" if text else " (empty)")
    path = Path(text)
    if not path.is_absolute():
        if base is None:
            raise _bad(where, SERVER, value, " (a relative path)")
        path = Path(os.path.abspath(base / path))
    return path
