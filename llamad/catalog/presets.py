"""llama.cpp-compatible preset INI -> per-model settings; renders llama-server argv.

Options are kept as {canonical flag: rendered argv tokens}, merged by canonical flag
with router mode's precedence: [*] < the model's section < llamad.conf `args` (the
router's own command line). A model's argv lists flags in the order they first appear:
[*], then its section, then `args`.

The file is read as llama.cpp reads it: keys before the first section belong to a
section named "default" (`version` is skipped there as everywhere), a key given twice
keeps its last value, a section given twice keeps its last body, and relative file
paths are taken from the preset file's directory.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from llamad.catalog import argv
from llamad.catalog import rpcargs as rpc
from llamad.catalog.argv import BY_KEY, Flag
from llamad.errors import ConfigError
from llamad.sizes import SIZE, parse_size

if TYPE_CHECKING:
    from llamad.catalog.gguf_info import GGUFInfo
    from llamad.config import Config

TRUE = ("on", "enabled", "true", "1", "yes")
FALSE = ("off", "disabled", "false", "0", "no")
Options = dict[str, tuple[str, ...]]


MODEL, MMPROJ, ALIAS, HF_REPO, TAGS, DRAFT_HF, DRAFT = (BY_KEY[k][0].canonical for k in (
    "model", "mmproj", "alias", "hf-repo", "tags", "spec-draft-hf", "spec-draft-model"))
# Flags whose value is a file or directory: relative ones are taken from the preset's place.
PATHS = frozenset(BY_KEY[k][0].canonical for k in (
    "model", "mmproj", "spec-draft-model", "lora", "control-vector", "chat-template-file",
    "grammar-file", "json-schema-file", "slot-save-path", "media-path", "lookup-cache-static",
    "lookup-cache-dynamic", "log-file", "ui-config-file", "mcp-servers-config"))
DEFAULT_SECTION = "default"  # llama.cpp's name for keys before the first section
MMPROJ_AUTO = BY_KEY["mmproj-auto"][0].canonical
METRICS = BY_KEY["metrics"][0].canonical
# Flags llamad itself sets for every child or that only make sense for a router.
OWNED = frozenset(BY_KEY[k][0].canonical for k in (
    "host", "port", "api-key", "api-key-file", "ssl-key-file", "ssl-cert-file", "models-dir",
    "models-max", "models-preset", "models-autoload", "help", "version"))
# Of those, the ones llama.cpp's router sets itself or drops from a preset (server-models.cpp,
# unset_reserved_args and update_args): a preset written for the router may hold them, so
# they are ignored with a warning, as the router ignores them, instead of refused.
ROUTER_SETS = OWNED - {BY_KEY[k][0].canonical for k in ("help", "version")}
PRESET_ONLY = ("load-on-startup", "stop-timeout", "dedup-cache-models")
LLAMAD_ONLY = ("pin", "ttl", "memory-max", "memory-high", "devices", "split", "restore",
               *("ctx-max", "memory-need"))  # fitting models to memory (memory/fit.py)


@dataclass(frozen=True)
class Section:
    """One preset section: llama-server options plus llamad's own keys (None = unset)."""

    name: str
    options: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    model: Path | None = None
    hf_repo: str | None = None
    aliases: tuple[str, ...] = ()
    extra: Mapping[str, object] = field(default_factory=dict)  # preset-only / llamad-only
    text: str = ""
    tags: tuple[str, ...] | None = None  # informational, as router mode lists them
    draft_hf: str | None = None  # spec-draft-hf: a draft model from the llama.cpp cache
    ignored: tuple[str, ...] = ()  # keys the router sets itself: one sentence each


@dataclass(frozen=True)
class Presets:
    path: Path | None
    defaults: Section
    sections: Mapping[str, Section]

    @property
    def ignored(self) -> tuple[str, ...]:
        """A warning per key the router would set itself (the catalog's problems)."""
        return tuple(w for s in (self.defaults, *self.sections.values()) for w in s.ignored)

    @classmethod
    def empty(cls) -> Presets:
        return cls(None, Section("*"), MappingProxyType({}))


@dataclass(frozen=True)
class ModelSettings:
    args: tuple[str, ...]
    load_on_startup: bool
    stop_timeout: float | None
    pin: bool
    ttl: float | None
    memory_max: str | None
    memory_high: str | None
    devices: tuple[int, ...] | None
    split: bool
    preset_text: str
    tags: tuple[str, ...] = ()
    # llama-server's /metrics: on unless a preset says `metrics = false` (unitspec adds
    # the flag), since llamad's /metrics merges every ready model's.
    metrics: bool = True
    # Loaded again once the memory that evicted it is free (guards/comeback.py); by
    # default for pinned and load-on-startup models.
    restore: bool = False
    # Fitting models to memory (memory/fit.py): a cap on the context llamad chooses, and
    # the memory to plan with instead of the estimate, (RAM, VRAM) bytes, None = estimate.
    ctx_max: int | None = None
    memory_need: tuple[int | None, int | None] | None = None


def truthy(value: str) -> bool | None:
    v = value.strip().lower()
    return True if v in TRUE else False if v in FALSE else None


def _render(flag: Flag, negated: bool, value: str, where: str, key: str) -> tuple[str, ...]:
    """argv tokens for one option; () means 'leave the flag out'."""
    if flag.kind == "value":
        return (flag.canonical, value)
    if flag.kind == "two":
        raise ConfigError(f"{where}: {key} takes two values, which presets do not support.")
    on = truthy(value)
    if on is None:
        raise ConfigError(f"{where}: {key} = {value!r} is invalid; allowed: true or false.")
    on = on != negated
    if flag.kind == "bool":
        return (flag.canonical,) if on else (flag.neg[-1],)
    return (flag.canonical,) if on else ()


def parse_args(tokens: tuple[str, ...], where: str) -> Options:
    """Parse a llama-server command line (the config's `args`) into options."""
    out: Options = {}
    for option in argv.walk(tokens):
        flag = option.flag
        if flag is None:
            raise ConfigError(f"{where}: {option.given!r} is not a llama-server option.")
        _check_owned(flag, where, option.given)
        if len(option.values) < flag.arity:
            raise ConfigError(f"{where}: {option.given} needs a value.")
        if flag.canonical == rpc.FLAG:
            _check_rpc(option.value, where, option.given)
        if flag.arity:
            out[flag.canonical] = (flag.canonical, *option.values)
        else:
            out[flag.canonical] = _render(flag, option.negated, "true", where, option.given)
    return out


def _check_rpc(value: str, where: str, key: str) -> None:
    try:
        rpc.parse(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {key} = {value!r} is invalid ({e}); allowed: "
                          f"{rpc.ALLOWED}.") from None


def _check_owned(flag: Flag, where: str, key: str) -> None:
    if flag.canonical in OWNED:
        raise ConfigError(f"{where}: {key} is set by llamad itself and cannot be given here.")


def _extra(key: str, value: str, where: str) -> object:
    """Validate a preset-only or llamad-only key."""
    bad = ConfigError(f"{where}: {key} = {value!r} is invalid; allowed: {_ALLOWED[key]}.")
    try:
        if key in ("load-on-startup", "pin", "split", "dedup-cache-models", "restore"):
            on = truthy(value)
            if on is None:
                raise bad
            return on
        if key in ("stop-timeout", "ttl"):
            number = float(value)
            if not math.isfinite(number) or (number < 0 and not (key == "ttl" and number == -1)):
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


_ALLOWED = {
    "load-on-startup": "true or false", "pin": "true or false", "split": "true or false",
    "restore": "true or false",
    "dedup-cache-models": "true or false", "stop-timeout": "seconds >= 0",
    "ttl": "seconds >= 0, or -1 to inherit idle-ttl",
    "memory-max": "a systemd size such as 8G", "memory-high": "a systemd size such as 8G",
    "devices": "comma-separated GPU indices such as 0,1",
    "ctx-max": "a whole number of tokens >= 0 (0 = no cap)",
    "memory-need": "a size such as 6G (RAM), or ram=SIZE and/or vram=SIZE separated by commas",
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


_HEADER = re.compile(r"[ \t]*\[[ \t]*([^\]]*?)[ \t]*\][ \t]*([;#].*)?")
_KV = re.compile(r"[ \t]*([A-Za-z_][A-Za-z0-9_.-]*)[ \t]*=[ \t]*([^;#\r\n]*?)[ \t]*([;#].*)?")
_BLANK = re.compile(r"[ \t]*([;#].*)?")
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)


def canonical_name(section: str) -> str:
    """`user/repo:q4_k_m` -> `user/repo:Q4_K_M`, as the router spells cache models."""
    head, colon, tag = section.rpartition(":")
    if not colon or section == "*":
        return section
    m = _TAG.search(tag)
    return head + ":" + (m.group(1) if m else tag).upper()


def parse_ini(text: str, where: str) -> list[tuple[str, list[tuple[str, str]], str]]:
    """[(section, [(key, value)], section text)] in file order; llama.cpp's INI dialect.

    Keys before any section are section "default"; a repeated key or section replaces
    the earlier one, as llama.cpp's parser does."""
    out: dict[str, tuple[list[tuple[str, str]], str]] = {}
    current = DEFAULT_SECTION
    for n, line in enumerate(text.splitlines(), 1):
        if m := _HEADER.fullmatch(line):
            current = canonical_name(m.group(1))
            out.pop(current, None)  # a section given again starts afresh, and goes last
            out[current] = ([], line + "\n")
        elif m := _KV.fullmatch(line):
            items, body = out.setdefault(current, ([], ""))
            items[:] = [(k, v) for k, v in items if k != m.group(1)]
            items.append((m.group(1), m.group(2)))
            out[current] = (items, body + line + "\n")
        elif _BLANK.fullmatch(line):
            if current in out:
                out[current] = (out[current][0], out[current][1] + line + "\n")
        else:
            raise ConfigError(f"{where}:{n}: cannot parse {line.strip()!r}; "
                              "expected [section], key = value or a comment.")
    return [(name, items, body) for name, (items, body) in out.items()
            if name != DEFAULT_SECTION or any(k != "version" for k, _ in items)]


def build_section(name: str, items: list[tuple[str, str]], text: str, where: str,
                  base: Path | None = None) -> Section:
    """One section's keys; relative paths are resolved against `base` when given."""
    where = f"{where} [{name}]"
    options: Options = {}
    extra: dict[str, object] = {}
    model: Path | None = None
    hf_repo: str | None = None
    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] | None = None
    draft_hf: str | None = None
    ignored: list[str] = []
    for key, value in items:
        if key == "version":
            continue  # reserved by llama.cpp for the file format
        if key in BY_KEY and BY_KEY[key][0].canonical in ROUTER_SETS:
            ignored.append(f"{where}: {key} is set by llamad itself (as llama.cpp's router "
                           "sets it for each model); ignored.")
            continue
        if key in PRESET_ONLY or key in LLAMAD_ONLY:
            extra[key] = _extra(key, value, f"{where} {key}")
            continue
        if key not in BY_KEY:
            raise ConfigError(f"{where}: unknown key {key!r}; keys are llama-server flags "
                              "without dashes, LLAMA_ARG_* names, or llamad's own keys.")
        flag, negated = BY_KEY[key]
        _check_owned(flag, where, key)
        if flag.canonical == rpc.FLAG:
            _check_rpc(value, where, key)
        if flag.canonical in PATHS and base is not None and value:
            value = str(base / value)  # an absolute value stays as it is
        if flag.canonical == MODEL:
            model = Path(value)
        elif flag.canonical == HF_REPO:
            hf_repo = canonical_name(value)
        elif flag.canonical == ALIAS:
            aliases = _names(value)
        elif flag.canonical == TAGS:
            tags = _names(value)
        elif flag.canonical == DRAFT_HF:
            draft_hf = value.strip()
        else:
            options[flag.canonical] = _render(flag, negated, value, where, key)
    if name == "*" and (model or hf_repo or aliases):
        raise ConfigError(f"{where}: model, hf-repo and alias belong in a model's own section.")
    return Section(name, MappingProxyType(options), model, hf_repo, aliases,
                   MappingProxyType(extra), text, tags, draft_hf, tuple(ignored))


def _names(value: str) -> tuple[str, ...]:
    """A comma-separated list of names (aliases, tags), blanks dropped."""
    return tuple(a.strip() for a in value.split(",") if a.strip())


def parse_presets(text: str, path: Path | None = None) -> Presets:
    where = str(path) if path else "presets"
    defaults = Section("*")
    sections: dict[str, Section] = {}
    base = path.parent if path else None
    for name, items, body in parse_ini(text, where):
        section = build_section(name, items, body, where, base)
        if name == "*":
            defaults = section
        else:
            sections[name] = section
    return Presets(path, defaults, MappingProxyType(sections))


def load_presets(path: Path | None) -> Presets:
    """Read the preset file; None means no presets."""
    if path is None:
        return Presets.empty()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: the preset file cannot be read ({e}).") from e
    return parse_presets(text, path)


def _pick(key: str, section: Section | None, defaults: Section) -> object:
    if section is not None and key in section.extra:
        return section.extra[key]
    return defaults.extra.get(key)


def model_settings(model_id: str, path: Path, mmproj: Path | None, presets: Presets,
                   global_args: Options, draft: Path | None = None) -> ModelSettings:
    """Merge [*] < the model's section < global args, as router mode does, and render its
    argv. `draft`: the file a section's spec-draft-hf names in the cache."""
    section = presets.sections.get(model_id)
    options: Options = dict(presets.defaults.options)
    if section is not None:
        options.update(section.options)
    if draft is not None and DRAFT not in options:
        options[DRAFT] = (DRAFT, str(draft))
    options.update(global_args)
    head: list[str] = [MODEL, str(path)]
    # --no-mmproj in a preset turns off the automatically paired projector, as in llama.cpp.
    auto = options.get(MMPROJ_AUTO, (MMPROJ_AUTO,)) == (MMPROJ_AUTO,)
    if mmproj is not None and MMPROJ not in options and auto:
        head += [MMPROJ, str(mmproj)]
    head += [ALIAS, model_id]
    args = tuple(head) + tuple(t for tokens in options.values() for t in tokens)
    stop = _pick("stop-timeout", section, presets.defaults)
    pin = bool(_pick("pin", section, presets.defaults))
    startup = bool(_pick("load-on-startup", section, presets.defaults))
    restore = _pick("restore", section, presets.defaults)
    ttl = _pick("ttl", section, presets.defaults)
    devices = _pick("devices", section, presets.defaults)
    return ModelSettings(
        args=args,
        load_on_startup=startup,
        stop_timeout=float(stop) if isinstance(stop, float) else None,
        pin=pin,
        ttl=float(ttl) if isinstance(ttl, float) else None,
        memory_max=_str_or_none(_pick("memory-max", section, presets.defaults)),
        memory_high=_str_or_none(_pick("memory-high", section, presets.defaults)),
        devices=devices if isinstance(devices, tuple) else None,
        split=bool(_pick("split", section, presets.defaults)),
        preset_text=_ini(model_id, args, section, presets.defaults),
        tags=_tags(section, presets.defaults),
        metrics=options.get(METRICS, (METRICS,)) == (METRICS,),
        restore=restore if isinstance(restore, bool) else pin or startup,
        ctx_max=_ctx_max(section, presets.defaults),
        memory_need=_memory_need_of(section, presets.defaults),
    )


def _ctx_max(section: Section | None, defaults: Section) -> int | None:
    value = _pick("ctx-max", section, defaults)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else None


def _memory_need_of(section: Section | None,
                    defaults: Section) -> tuple[int | None, int | None] | None:
    value = _pick("memory-need", section, defaults)
    if isinstance(value, tuple) and len(value) == 2:
        return value[0], value[1]
    return None


def _tags(section: Section | None, defaults: Section) -> tuple[str, ...]:
    if section is not None and section.tags is not None:
        return section.tags
    return defaults.tags or ()


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _ini(model_id: str, args: tuple[str, ...], section: Section | None,
         defaults: Section) -> str:
    """The model's effective preset as INI, like the router's status.preset."""
    lines = [f"[{model_id}]"]
    for option in argv.walk(args):
        value = " ".join(option.values) if option.values else \
            ("false" if option.negated else "true")
        if option.name != ALIAS:  # the id; real aliases are listed below
            lines.append(f"{option.name.lstrip('-')} = {value}")
    extra = dict(defaults.extra)
    if section is not None:
        extra.update(section.extra)
    for key, extra_value in extra.items():
        lines.append(f"{key} = {_ini_value(key, extra_value)}")
    if section is not None and section.aliases:
        lines.append(f"alias = {','.join(section.aliases)}")
    return "\n".join(lines) + "\n"


def _ini_value(key: str, value: object) -> str:
    if key == "memory-need" and isinstance(value, tuple):  # (RAM, VRAM), bytes
        return ",".join(f"{k}={v}" for k, v in zip(("ram", "vram"), value, strict=True)
                        if v is not None)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return "-1" if value is None else str(value)


# -- what llamad adds to a model's own arguments ----------------------------------------------

SWA_FULL = "--swa-full"
CHAT_TEMPLATE, JINJA = (BY_KEY[k][0] for k in ("chat-template", "jinja"))
# Chat templates for a model whose header has none: llama-server would fall back to ChatML,
# whose tags such a model only continues as text. By general.architecture, llama.cpp's
# built-in template of that family (llama-chat.cpp). llama-server takes a built-in *name*
# only without Jinja, which refuses every request with tools (the web UI sends its own), so
# the template goes as Jinja, the same prompt as llama.cpp's `gemma` writes, on one line (no
# control character may reach systemd); the name where a preset turns Jinja off. A preset's
# own chat-template or chat-template-file keeps its choice.
BUILTIN_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma"}
JINJA_TEMPLATES = {"gemma": (
    "{%- set system = namespace(text='') -%}{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set system.text = message['content'] + '\\n\\n' -%}"
    "{%- else -%}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user')"
    " + '\\n' + system.text + message['content'] + '<end_of_turn>\\n' }}"
    "{%- set system.text = '' -%}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")}
_OWN_TEMPLATE = (CHAT_TEMPLATE.canonical, BY_KEY["chat-template-file"][0].canonical)
# Whether a sliding-window model may have `--swa-full` (its full-size cache): None if it
# may, else why not. The daemon's comes from the memory plan (kvpolicy.swa_full_fits).
SwaFits = Callable[["GGUFInfo", tuple[str, ...]], "str | None"]


def run_settings(config: Config, info: GGUFInfo, settings: ModelSettings,
                 swa_fits: SwaFits | None = None) -> ModelSettings:
    """The model's settings with what llamad adds: `--swa-full` where kept caches need it
    (llama-server restores a sliding-window model's cache without it but never reuses it;
    kv-cache = yes always, auto only where `swa_fits` says the larger cache fits), and the
    built-in chat template (above)."""
    args = settings.args
    if _swa_full(config, info, args, swa_fits):
        args = (*args, SWA_FULL)
    name = BUILTIN_TEMPLATES.get(info.architecture or "")
    if name and not info.chat_template and not any(argv.has(args, f) for f in _OWN_TEMPLATE):
        jinja = argv.last(args, JINJA.canonical)
        legacy = jinja is not None and jinja.negated
        args = (*args, CHAT_TEMPLATE.canonical, name if legacy else JINJA_TEMPLATES[name])
    return settings if args == settings.args else dataclasses.replace(settings, args=args)


def _swa_full(config: Config, info: GGUFInfo, args: tuple[str, ...],
              swa_fits: SwaFits | None) -> bool:
    if config.kv_cache == "no" or not info.sliding_window or argv.has(args, SWA_FULL):
        return False
    return config.kv_cache == "yes" or (swa_fits is not None
                                        and swa_fits(info, (*args, SWA_FULL)) is None)
