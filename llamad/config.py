"""The global configuration file, parsed once into a frozen Config."""

from __future__ import annotations

import math
import os
import re
import shlex
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from configobj import ConfigObj, ConfigObjError, DuplicateError, flatten_errors, get_extra_values
from validate import Validator

from llamad.errors import ConfigError
from llamad.sizes import SIZE

DEFAULT_PATH = Path("/etc/llamad/llamad.conf")
DEFAULT_PRESETS = Path("/etc/llamad/presets.ini")
SERVER_CANDIDATES = (Path("/usr/bin/llama-server"), Path("/usr/local/bin/llama-server"))

_ORIGIN = re.compile(r"https?://[^/\s]+")
_URL = re.compile(r"https?://[^/\s]+(/\S*)?")
_LISTEN = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^:\s\[\]]+):(\d{1,5})")

# The longest time any key or request may give, in seconds: Go's longest duration (2^63 ns,
# 292 years), as Ollama's keep_alive is one. Beyond it no date (/api/ps's expires_at) or
# systemd timer (microseconds in 64 bits) can be made.
DURATION_MAX = 2**63 / 1e9


def _seconds(least: float, default: float, note: str = "") -> tuple[str, str]:
    return (f"float(min={least}, max={DURATION_MAX}, default={default})",
            f"seconds from {least:g} to {DURATION_MAX:.0f}{note}")


# key: (validate check, what is allowed). The check strings are configobj/validate
# syntax; the second column is what an error message tells the user.
SPEC: dict[str, tuple[str, str]] = {
    "models-dir": ("force_list(default=list('/var/lib/llamad/models'))",
                   "one or more absolute directory paths separated by commas"),
    "llama-cache": ("boolean(default=yes)", "yes or no"),
    "llama-cache-dir": ("string(default='')", "an absolute directory path or empty"),
    "ollama-models": ("string(default='/usr/share/ollama/.ollama/models')",
                      "an absolute directory path or empty"),
    "models-preset": ("string(default=None)", "an absolute file path or empty"),
    "llama-server": ("string(default='')", "the absolute path of the llama-server binary, "
                     "or empty for /usr/bin's or /usr/local/bin's"),
    "args": ("string(default='')", "llama-server arguments in shell syntax"),
    "models-max": ("integer(min=0, default=4)", "a whole number >= 0 (0 = unlimited)"),
    "models-autoload": ("boolean(default=yes)", "yes or no"),
    "backend": ("option('unix', 'tcp', default='unix')", "unix or tcp"),
    "run-dir": ("string(default='/run/llamad')", "an absolute directory path"),
    "tcp-port-base": ("integer(min=1024, max=64511, default=39000)",
                      "a port number from 1024 to 64511"),
    "listen": ("string(default='127.0.0.1:8080')",
               "HOST:PORT, PORT from 1 to 65535, such as 127.0.0.1:8080 or [::1]:8080"),
    "idle-ttl": _seconds(0, 0, " (0 = never)"),
    "idle-exit": _seconds(0, 0, " (0 = never)"),
    "api-keys-file": ("string(default='')", "an absolute file path or empty"),
    "allowed-hosts": ("force_list(default=list())",
                      "host names separated by commas, or * for any"),
    "cors-origins": ("force_list(default=list())",
                     "origins such as https://ui.example.org separated by commas, or *"),
    "load-timeout": _seconds(1, 300),
    "queue-size": ("integer(min=1, default=64)", "a whole number >= 1"),
    "queue-timeout": _seconds(0, 300),
    "drain-timeout": _seconds(0, 600),
    "liveness-timeout": _seconds(0, 30, " (0 = never probe)"),
    "max-body-mb": ("integer(min=1, default=32)", "a whole number of MiB >= 1"),
    "max-bodies-mb": ("integer(min=1, default=256)", "a whole number of MiB >= 1"),
    "receive-timeout": _seconds(1, 30),
    "max-connections": ("integer(min=1, default=4096)", "a whole number >= 1"),
    "max-requests": ("integer(min=1, default=1024)", "a whole number >= 1"),
    "max-streams": ("integer(min=1, default=256)", "a whole number >= 1"),
    "send-timeout": _seconds(1, 60),
    "stop-timeout": _seconds(0, 10),
    "restart-sec": _seconds(0, 2),
    # systemd's StartLimitBurst= is an unsigned 32-bit number (D-Bus `u`).
    "start-limit-burst": ("integer(min=0, max=4294967295, default=3)",
                          "a whole number from 0 to 4294967295"),
    "start-limit-interval": _seconds(0, 60),
    "unit-user": ("string(default='dynamic')", "dynamic or a user name"),
    "memory-reserve-mb": ("integer(min=0, default=1024)", "a whole number of MiB >= 0"),
    "memory-budget-mb": ("integer(min=0, default=0)",
                         "a whole number of MiB >= 0 (0 = measured free memory)"),
    "eviction-policy": ("option('lru', 'largest', 'cheapest-reload', default='lru')",
                        "lru, largest or cheapest-reload"),
    "slice-memory-max": ("string(default='')",
                         "a systemd size such as 16G, a percentage, infinity, or empty"),
    "memory-limit": ("option('none', 'estimate', default='none')", "none or estimate"),
    "gpu-fallback": ("option('fail', 'degraded', default='fail')", "fail or degraded"),
    "state-dir": ("string(default='/var/lib/llamad')", "an absolute directory path"),
    "ui-dir": ("string(default='/usr/share/llamad/ui')",
               "an absolute directory path, or empty for no web UI"),
    "request-log": ("boolean(default=yes)", "yes or no"),
    "load-progress": ("boolean(default=yes)", "yes or no"),
    "debug-request-delay": ("float(min=0, max=60, default=0)", "seconds from 0 to 60"),
    "kv-cache": ("option('auto', 'yes', 'no', 'true', 'false', 'on', 'off', default='auto')",
                 "auto, yes or no"),
    "kv-cache-max-mb": ("integer(min=0, default=0)",
                        "a whole number of MiB >= 0 (0 = a tenth of the free disk space)"),
    "kv-cache-timeout": ("float(min=0.1, max=600, default=3)", "seconds from 0.1 to 600"),
    "peers": ("force_list(default=list())",
              "other llamads' URLs such as http://10.0.0.3:8080 separated by commas"),
    "peer-timeout": ("float(min=0.1, max=60, default=2)", "seconds from 0.1 to 60"),
    "peer-key-file": ("string(default='')", "an absolute file path or empty"),
    "shutdown-grace": ("float(min=0, max=300, default=0)", "seconds from 0 to 300"),
    # -- fitting models to memory (memory/fit.py) --
    "fit-min-ctx": ("integer(min=256, default=4096)", "a whole number of tokens >= 256"),
    "ctx-max": ("integer(min=0, default=0)",
                "a whole number of tokens >= 0 (0 = the model's trained context)"),
    # Downloads (POST /models, /api/pull, llamad pull): where the hub is, and its token.
    "hf-endpoint": ("string(default='')",
                    "an http:// or https:// URL, or empty for $MODEL_ENDPOINT, $HF_ENDPOINT "
                    "or https://huggingface.co/"),
    "hf-token-file": ("string(default='')",
                      "the absolute path of a file holding a Hugging Face token, or empty"),
    # Per-model controls (presets may set each per model; issue #24).
    "concurrency-limit": ("integer(min=0, default=0)",
                          "a whole number >= 0 (0 = no limit)"),
}


@dataclass(frozen=True)
class Config:
    """llamad.conf, checked: one field per key of SPEC."""

    path: Path | None
    models_dirs: tuple[Path, ...]
    llama_cache: bool
    llama_cache_dir: Path | None
    ollama_models: Path | None
    models_preset: Path | None
    llama_server: Path
    args: tuple[str, ...]
    models_max: int
    models_autoload: bool
    backend: str
    run_dir: Path
    tcp_port_base: int
    listen: str
    idle_ttl: float
    idle_exit: float
    api_keys_file: Path | None
    allowed_hosts: tuple[str, ...]
    cors_origins: tuple[str, ...]
    load_timeout: float
    queue_size: int
    queue_timeout: float
    drain_timeout: float
    liveness_timeout: float
    max_body_mb: int
    max_bodies_mb: int
    receive_timeout: float
    max_connections: int
    max_requests: int
    max_streams: int
    send_timeout: float
    stop_timeout: float
    restart_sec: float
    start_limit_burst: int
    start_limit_interval: float
    unit_user: str
    memory_reserve_mb: int
    memory_budget_mb: int
    eviction_policy: str
    slice_memory_max: str | None
    memory_limit: str
    state_dir: Path
    gpu_fallback: str
    ui_dir: Path | None
    request_log: bool
    load_progress: bool
    debug_request_delay: float
    kv_cache: str  # auto, yes or no
    kv_cache_max_mb: int
    kv_cache_timeout: float
    peers: tuple[str, ...]
    peer_timeout: float
    peer_key_file: Path | None
    shutdown_grace: float
    # -- fitting models to memory --
    fit_min_ctx: int
    ctx_max: int
    hf_endpoint: str
    hf_token_file: Path | None
    # Per-model controls: the default of the presets' concurrency-limit.
    concurrency_limit: int

    @classmethod
    def default(cls, **overrides: Any) -> Config:
        """All defaults (as if the file were empty), with attributes replaced by keyword."""
        values = _build(None, _validated(ConfigObj([], configspec=_spec_lines()), None))
        values.update(overrides)
        return cls(**values)

    @property
    def dynamic_user(self) -> bool:
        return self.unit_user == "dynamic"


def load_config(path: Path | None = None) -> Config:
    """Read and validate the file; a missing default file means all defaults."""
    explicit = path is not None
    path = path or DEFAULT_PATH
    if not path.exists():
        if explicit:
            raise ConfigError(f"{path}: the configuration file does not exist.")
        return Config.default()
    if path.is_dir():  # configobj would say "Config file not found"
        raise ConfigError(f"{path} is a directory, not a configuration file.")
    if not path.is_file():  # /dev/null, a pipe: configobj's "not found" of what exists
        raise ConfigError(f"{path} is not a regular file (a device, a pipe or a socket); "
                          "give a configuration file's path.")
    obj = _parsed(path)
    if obj.sections:
        raise ConfigError(f"{path}: section [{obj.sections[0]}] is not allowed; "
                          "the file has keys only.")
    return Config(**_build(path, _validated(obj, path)))


def _parsed(path: Path) -> ConfigObj:
    """The file as configobj reads it, without interpolation: a `%(name)s` in a value (an
    argument of llama-server's) is meant as written, and configobj's interpolation would
    replace it or raise from deep inside validation, a traceback."""
    try:
        return ConfigObj(str(path), configspec=_spec_lines(), file_error=True,
                         encoding="utf-8", list_values=True, interpolation=False)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: is not UTF-8 text (byte {e.start + 1} of the file); "
                          "save it as UTF-8.") from e
    except (ConfigObjError, OSError) as e:
        # Of several errors configobj's message is "several errors.\nFirst error ...".
        first = (getattr(e, "errors", None) or [e])[0]
        if isinstance(first, DuplicateError):
            raise _twice(path, first) from e
        line = getattr(first, "line_number", None)
        where = f"{path}:{line}" if line else str(path)
        said = str(first).rstrip(".")
        raise ConfigError(f"{where}: cannot be read as a configuration file: {said}.") from e


def _twice(path: Path, e: DuplicateError) -> ConfigError:
    key = e.line.partition("=")[0].strip()
    first = next(iter(_lines(path, key)), "?")
    return ConfigError(f"{path}:{e.line_number}: {key} is set twice (lines {first} and "
                       f"{e.line_number}); keep one.")


def _spec_lines() -> list[str]:
    return [f"{key} = {check}" for key, (check, _) in SPEC.items()]


def _lines(path: Path, key: str) -> list[int]:
    """The numbers of the lines that set `key`."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return [n for n, text in enumerate(f, 1)
                    if re.match(rf"\s*{re.escape(key)}\s*=", text)]
    except OSError:
        return []


def _where(path: Path | None, key: str) -> str:
    """`file:line: ` of the key's (last) line in the file; `file: ` if it is not there."""
    if path is None:
        return ""
    lines = _lines(path, key)
    return f"{path}:{lines[-1]}: " if lines else f"{path}: "


def _bad(path: Path | None, key: str, value: object) -> ConfigError:
    return ConfigError(f"{_where(path, key)}{key} = {value!r} is invalid; "
                       f"allowed: {SPEC[key][1]}.")


def _validated(obj: ConfigObj, path: Path | None) -> dict[str, Any]:
    raw = dict(obj)
    result = obj.validate(Validator(), preserve_errors=True, copy=True)
    if result is not True:
        for _sections, key, _error in flatten_errors(obj, result):
            raise _bad(path, key, raw.get(key))
    for key, (check, _) in SPEC.items():
        # float() takes nan and inf, and a NaN passes every min= and max=: a timeout that
        # never fires, or that breaks asyncio's timer heap.
        if check.startswith("float") and not math.isfinite(obj[key]):
            raise _bad(path, key, raw.get(key))
    extra = get_extra_values(obj)
    if extra:
        raise _unknown(path, extra[0][1])
    return dict(obj)


def _unknown(path: Path | None, key: str) -> ConfigError:
    """An unknown key, with the known key it most likely misspells, else all of them."""
    import difflib  # here: 1 ms of every start, socket-activated ones included, otherwise

    close = difflib.get_close_matches(key.lower(), SPEC, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(SPEC)}."
    return ConfigError(f"{_where(path, key)}unknown key {key!r}; {hint}")


def valid_listen(text: str, least: int = 1) -> bool:
    """Whether `text` is HOST:PORT as `listen` takes it (`llamad serve --listen` takes port
    0 too: any free one, for tests)."""
    listen = _LISTEN.fullmatch(text)
    return listen is not None and least <= int(listen[2]) <= 65535


def _opt_path(value: str | None) -> Path | None:
    return Path(value) if value else None


# Paths that must be absolute (where one may be empty, only when given). llamad.service
# runs in /, `llamad check-config` and `llamad models` wherever the user stands: a relative
# path would name one place to them and another to the daemon.
_ABSOLUTE = ("run-dir", "state-dir", "ui-dir", "llama-cache-dir", "ollama-models",
             "models-preset", "llama-server", "api-keys-file", "peer-key-file",
             "hf-token-file")


def _check_absolute(path: Path | None, v: dict[str, Any]) -> None:
    for key, value in [*((k, v[k]) for k in _ABSOLUTE), *(("models-dir", d)
                                                        for d in v["models-dir"])]:
        if (value or key in ("run-dir", "state-dir")) and not Path(value).is_absolute():
            raise _bad(path, key, value)


def _build(path: Path | None, v: dict[str, Any]) -> dict[str, Any]:
    """Turn validated values into Config attributes, checking what validate cannot."""
    if v["slice-memory-max"] and not SIZE.fullmatch(v["slice-memory-max"]):
        raise _bad(path, "slice-memory-max", v["slice-memory-max"])
    if not valid_listen(v["listen"]):
        raise _bad(path, "listen", v["listen"])
    try:
        args = tuple(shlex.split(v["args"]))
    except ValueError as e:
        raise _bad(path, "args", v["args"]) from e
    if not v["unit-user"] or not re.fullmatch(r"[a-z_][a-z0-9_-]*\$?", v["unit-user"]):
        raise _bad(path, "unit-user", v["unit-user"])
    _check_absolute(path, v)
    # Empty entries ("cors-origins =", a trailing comma) are none, as below.
    for origin in filter(None, v["cors-origins"]):
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise _bad(path, "cors-origins", origin)
    for peer in filter(None, v["peers"]):
        if not _ORIGIN.fullmatch(peer.lower()):
            raise _bad(path, "peers", peer)
    if v["hf-endpoint"] and not _URL.fullmatch(v["hf-endpoint"]):
        raise _bad(path, "hf-endpoint", v["hf-endpoint"])
    preset = v["models-preset"]
    if preset is None:
        preset = str(DEFAULT_PRESETS) if DEFAULT_PRESETS.exists() else ""
    server = v["llama-server"] or str(
        next((p for p in SERVER_CANDIDATES if p.exists()), SERVER_CANDIDATES[0]))
    out = {f.name: v.get(f.name.replace("_", "-")) for f in fields(Config)}
    out.update(
        path=path,
        models_dirs=tuple(Path(d) for d in v["models-dir"] if d),
        llama_cache_dir=_opt_path(v["llama-cache-dir"]),
        ollama_models=_opt_path(v["ollama-models"]),
        models_preset=_opt_path(preset),
        llama_server=Path(server),
        args=args,
        run_dir=Path(v["run-dir"]),
        state_dir=Path(v["state-dir"]),
        ui_dir=_opt_path(v["ui-dir"]),
        api_keys_file=_opt_path(v["api-keys-file"]),
        peer_key_file=_opt_path(v["peer-key-file"]),
        allowed_hosts=tuple(h.lower().rstrip(".") for h in v["allowed-hosts"] if h),
        cors_origins=tuple(o.lower() for o in v["cors-origins"] if o),
        peers=tuple(p.lower() for p in v["peers"] if p),
        slice_memory_max=v["slice-memory-max"] or None,
        kv_cache={"true": "yes", "on": "yes", "false": "no", "off": "no"}.get(
            v["kv-cache"], v["kv-cache"]),
        hf_token_file=_opt_path(v["hf-token-file"]),
    )
    return out


def cache_dir(config: Config) -> Path | None:
    """Where llama.cpp keeps downloads, looked up the way llama.cpp does."""
    if config.llama_cache_dir is not None:
        return config.llama_cache_dir
    env = os.environ
    for var, sub in (("LLAMA_CACHE", ""), ("HF_HUB_CACHE", ""), ("HUGGINGFACE_HUB_CACHE", ""),
                     ("HF_HOME", "hub"), ("XDG_CACHE_HOME", "huggingface/hub")):
        if env.get(var):
            return Path(env[var]) / sub if sub else Path(env[var])
    home = env.get("HOME")
    return Path(home) / ".cache/huggingface/hub" if home else None
