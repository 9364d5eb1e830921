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
# keep their commas. A value in double quotes is taken as it is, for one that holds ", B=".
_PAIRS = re.compile(r",\s*(?=[A-Za-z_][A-Za-z0-9_]*=)")
_QUOTED = re.compile(r'("[^"]*")')
# Names whose values llamad treats as secrets: masked wherever llamad shows them.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)
# Set by llamad on every unit, or llama-server's own flags by another name.
_CUDA = "CUDA_VISIBLE_DEVICES"
# llama-server's --api-key, read from its environment (common/arg.cpp): llamad refuses the
# flag, since its forwarded requests carry no key; in env it made each of them a 401.
_API_KEY = "LLAMA_API_KEY"


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
            size = value.strip()
            # 0 would be a limit of no memory at all: the model killed as it starts.
            zero = size != "infinity" and not float(size.rstrip("KMGTPE%"))
            if not SIZE.fullmatch(size) or zero:
                raise bad
            return size
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
    "ttl": f"seconds from 0 to {DURATION_MAX:.0f} (0 = never), or -1 to inherit idle-ttl",
    "memory-max": "a systemd size above 0 such as 8G",
    "memory-high": "a systemd size above 0 such as 8G",
    "devices": "comma-separated GPU indices such as 0,1",
    "ctx-max": "a whole number of tokens >= 0 (0 = no cap)",
    "memory-need": "a size such as 6G (RAM), or ram=SIZE and/or vram=SIZE separated by commas",
    CONCURRENCY: "a whole number >= 0 (0 = no limit)",
    ENV: ("NAME=value pairs separated by commas, such as GGML_CUDA_ENABLE_UNIFIED_MEMORY=1; "
          'a value in double quotes may hold ", NAME="'),
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
    """`A=1, B=x,y, C="u, D=v"` -> ("A=1", "B=x,y", "C=u, D=v"), each checked."""
    out: dict[str, str] = {}
    for pair in (p.strip() for p in _split_pairs(value.strip()) if p.strip()):
        name, eq, val = pair.partition("=")
        name, val = name.strip(), val.strip()
        if not eq or not _NAME.fullmatch(name):
            raise _bad(where, ENV, pair, " (not NAME=value)")
        if val.startswith('"'):
            if len(val) < 2 or not val.endswith('"') or '"' in val[1:-1]:
                raise _bad(where, ENV, pair, " (an opening quote without its closing one "
                           "at the end of the value)")
            val = val[1:-1]
        if (why := unsafe(val)) is not None:
            raise ConfigError(f"{where}: env {name}: the value {why}; systemd's Environment= "
                              "takes one line of text.")
        refused = _refused(name)
        if refused:
            raise ConfigError(f"{where}: env {name} cannot be set here: {refused}.")
        out[name] = val
    return tuple(f"{k}={v}" for k, v in out.items())


def _split_pairs(value: str) -> list[str]:
    """Pairs split at `, NAME=` outside double quotes."""
    pairs = [""]
    for k, chunk in enumerate(_QUOTED.split(value)):
        if k % 2:  # a quoted run: never split
            pairs[-1] += chunk
            continue
        first, *rest = _PAIRS.split(chunk)
        pairs[-1] += first
        pairs.extend(rest)
    return pairs


def _refused(name: str) -> str:
    if name == _CUDA:
        return ("llamad sets it on every model's unit to the GPUs it placed the model on; "
                "use devices = 0,1 to choose them")
    if name.startswith("LLAMAD_"):
        return "llamad's own LLAMAD_* variables mark the units it starts"
    if name == _API_KEY:
        return ("it is llama-server's --api-key, which would refuse every request llamad "
                "forwards (401); API keys belong in llamad's api-keys-file")
    if name.startswith("LLAMA_ARG_"):
        return ("it is a llama-server option by another name; give it as a preset key "
                "(such as ctx-size = 8192), which llamad checks and passes on the command line")
    return ""


def merged_env(*parts: object) -> tuple[str, ...]:
    """[*]'s env, then the section's (checked pairs, or None where unset): a name given in
    both takes the section's value."""
    merged: dict[str, str] = {}
    for pairs in parts:
        for pair in pairs if isinstance(pairs, tuple) else ():
            name, _, value = pair.partition("=")
            merged[name] = value
    return tuple(f"{k}={v}" for k, v in merged.items())


def idle_ttl(value: object) -> float | None:
    """A preset's checked ttl as the supervisor takes it: None inherits idle-ttl, and 0 is
    never, as llamad.conf's idle-ttl = 0 and llama-swap's `ttl: 0` (math.inf, which
    scheduler.effective_ttl reads as never; a request's keep_alive 0 still stops it)."""
    if not isinstance(value, float):
        return None
    return math.inf if value == 0 else value


def flag_value(key: str, value: str, where: str) -> None:
    """A llama-server flag's value goes into the unit's ExecStart=, which takes no control
    characters: refused here, naming the preset's file, line and key, not at the load."""
    if (why := unsafe(value)) is not None:
        raise ConfigError(f"{where}: {key} = {value!r} is invalid: the value {why}; "
                          "allowed: one line of text.")


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
