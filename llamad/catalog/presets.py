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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from llamad import redact
from llamad.catalog import argv, flagtable, modelkeys
from llamad.catalog import rpcargs as rpc
from llamad.catalog.argv import BY_KEY, Flag
from llamad.catalog.flagtable import DEFAULT, Table
from llamad.catalog.modelkeys import truthy
from llamad.catalog.presetini import DEFAULT_SECTION, RawSection, canonical_name, parse_ini
from llamad.errors import ConfigError

if TYPE_CHECKING:
    from llamad.catalog.gguf_info import GGUFInfo
    from llamad.config import Config

Options = dict[str, tuple[str, ...]]

__all__ = ["DEFAULT_SECTION", "Table", "canonical_name", "parse_ini"]
MODEL, MMPROJ, ALIAS, HF_REPO, TAGS, DRAFT_HF, DRAFT = (BY_KEY[k][0].canonical for k in (
    "model", "mmproj", "alias", "hf-repo", "tags", "spec-draft-hf", "spec-draft-model"))
# Flags whose value is a file or directory: relative ones are taken from the preset's place.
PATHS = frozenset(BY_KEY[k][0].canonical for k in (
    "model", "mmproj", "spec-draft-model", "lora", "control-vector", "chat-template-file",
    "grammar-file", "json-schema-file", "slot-save-path", "media-path", "lookup-cache-static",
    "lookup-cache-dynamic", "log-file", "ui-config-file", "mcp-servers-config"))
MMPROJ_AUTO = BY_KEY["mmproj-auto"][0].canonical
METRICS = BY_KEY["metrics"][0].canonical
# Flags llamad itself sets for every child or that only make sense for a router. llama.cpp's
# router sets or drops them too (server-models.cpp, unset_reserved_args and update_args): a
# preset written for the router may hold them, so they are ignored with a warning, as the
# router ignores them, instead of refused.
OWNED = frozenset(BY_KEY[k][0].canonical for k in (
    "host", "port", "api-key", "api-key-file", "ssl-key-file", "ssl-cert-file", "models-dir",
    "models-max", "models-preset", "models-autoload"))
# llama-server prints something and exits 0 with these (common/arg.cpp): the model would
# never become ready.
EXITS = frozenset(BY_KEY[k][0].canonical for k in (
    "help", "version", "list-devices", "cache-list", "completion-bash"))
PRESET_ONLY = ("load-on-startup", "stop-timeout", "dedup-cache-models")
LLAMAD_ONLY = ("pin", "ttl", "memory-max", "memory-high", "devices", "split", "restore",
               *("ctx-max", "memory-need"),  # fitting models to memory (memory/fit.py)
               *modelkeys.KEYS)  # per-model controls: concurrency-limit, env, llama-server


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
    flags: Table = DEFAULT  # the flags of the llama-server its keys were read for


@dataclass(frozen=True)
class Presets:
    """A preset file, parsed. `errors` holds the first error of each section that has one
    ("*" for [*], "" for the whole file): such a section keeps its last good body (or, never
    good, its good keys), and its model is refused with the error until the file is fixed."""

    path: Path | None
    defaults: Section
    sections: Mapping[str, Section]
    errors: Mapping[str, ConfigError] = field(default_factory=dict)

    @property
    def ignored(self) -> tuple[str, ...]:
        """A warning per key the router would set itself (the catalog's problems)."""
        return tuple(w for s in (self.defaults, *self.sections.values()) for w in s.ignored)

    @classmethod
    def empty(cls) -> Presets:
        return cls(None, Section("*"), MappingProxyType({}))

    def error_for(self, model_id: str) -> ConfigError | None:
        """The error that touches this model: the whole file's, [*]'s, or its section's."""
        return self.errors.get("") or self.errors.get("*") or self.errors.get(model_id)

    def check(self) -> Presets:
        """Raise the first error, for callers that want all or nothing."""
        for error in self.errors.values():
            raise error
        return self


@dataclass(frozen=True)
class ModelSettings:
    """What the presets say of one model, with its llama-server arguments."""

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
    # llama-server's /metrics, which llamad's merges: on unless a preset says `metrics = false`.
    metrics: bool = True
    # Loaded again once the memory that evicted it is free (guards/comeback.py); by
    # default for pinned and load-on-startup models.
    restore: bool = False
    # Fitting models to memory (memory/fit.py): a cap on the context llamad chooses, and
    # the memory to plan with instead of the estimate, (RAM, VRAM) bytes, None = estimate.
    ctx_max: int | None = None  # None: llamad.conf's applies; 0 lifts its cap
    memory_need: tuple[int | None, int | None] | None = None
    # Per-model controls (modelkeys.py).
    concurrency_limit: int | None = None  # None: llamad.conf's concurrency-limit
    env: tuple[str, ...] = ()  # NAME=value for the unit's Environment=
    server: Path | None = None  # its own llama-server binary; None: llamad.conf's


def _render(flag: Flag, negated: bool, value: str, where: str, key: str) -> tuple[str, ...]:
    """argv tokens for one option; () means 'leave the flag out'."""
    if flag.kind == "value":
        modelkeys.flag_value(key, value, where)  # no control character reaches ExecStart=
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


def parse_args(tokens: tuple[str, ...], where: str, table: Table = DEFAULT) -> Options:
    """Parse a llama-server command line (the config's `args`) into options."""
    out: Options = {}
    for option in argv.walk(tokens, table.by_arg):
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
    if flag.canonical in EXITS:
        raise ConfigError(f"{where}: {key} makes llama-server print something and exit "
                          "instead of serving the model; it cannot be given here.")
    if flag.canonical in OWNED:
        raise ConfigError(f"{where}: {key} is set by llamad itself and cannot be given here.")


def build_section(raw: RawSection, where: str, base: Path | None = None,
                  flags: Table = DEFAULT) -> tuple[Section, list[ConfigError]]:
    """One section's keys, read with the flag table of the llama-server that runs it;
    relative paths are resolved against `base` when given. A bad key is left out and
    returned among the errors (the section's unreadable lines first)."""
    options: Options = {}
    extra: dict[str, object] = {}
    found: dict[str, object] = {}
    ignored: list[str] = []
    errors = list(raw.errors)
    for key, value, line in raw.items:
        at = f"{where}:{line} [{raw.name}]"
        if key in flags.by_key and flags.by_key[key][0].canonical in OWNED:
            ignored.append(f"{at}: {key} is set by llamad itself (as llama.cpp's router "
                           "sets it for each model); ignored.")
            continue
        try:
            _read_key(key, value, at, base, flags, options, extra, found)
        except ConfigError as e:
            errors.append(e)
    model, hf_repo = found.get(MODEL), found.get(HF_REPO)
    if raw.name == "*" and (model or hf_repo or found.get(ALIAS)):
        errors.append(ConfigError(f"{where}:{raw.line} [*]: model, hf-repo and alias belong "
                                  "in a model's own section."))
    return Section(raw.name, MappingProxyType(options),
                   model if isinstance(model, Path) else None,
                   hf_repo if isinstance(hf_repo, str) else None,
                   _tuple(found.get(ALIAS)) or (), MappingProxyType(extra), raw.text,
                   _tuple(found.get(TAGS)), _str_or_none(found.get(DRAFT_HF)),
                   tuple(ignored), flags), errors


def _read_key(key: str, value: str, where: str, base: Path | None, flags: Table,
              options: Options, extra: dict[str, object], found: dict[str, object]) -> None:
    if key == "version":
        return  # reserved by llama.cpp for the file format
    if key in PRESET_ONLY or key in LLAMAD_ONLY:
        extra[key] = modelkeys.check(key, value, f"{where} {key}", base)
        return
    if key not in flags.by_key:
        raise ConfigError(f"{where}: unknown key {key!r}; keys are llama-server flags "
                          "without dashes, LLAMA_ARG_* names, or llamad's own keys"
                          + ("" if flags is DEFAULT else f" (flags of {flags.source})") + ".")
    flag, negated = flags.by_key[key]
    _check_owned(flag, where, key)
    if flag.canonical == rpc.FLAG:
        _check_rpc(value, where, key)
    if flag.canonical in PATHS and base is not None and value:
        value = str(base / value)  # an absolute value stays as it is
    if flag.canonical == MODEL:
        found[MODEL] = Path(value)
    elif flag.canonical == HF_REPO:
        found[HF_REPO] = canonical_name(value)
    elif flag.canonical in (ALIAS, TAGS):
        found[flag.canonical] = _names(value)
    elif flag.canonical == DRAFT_HF:
        found[DRAFT_HF] = value.strip()
    else:
        options[flag.canonical] = _render(flag, negated, value, where, key)


def _tuple(value: object) -> tuple[str, ...] | None:
    return value if isinstance(value, tuple) else None


def _names(value: str) -> tuple[str, ...]:
    """A comma-separated list of names (aliases, tags), blanks dropped."""
    return tuple(a.strip() for a in value.split(",") if a.strip())


def parse_presets(text: str, path: Path | None = None, previous: Presets | None = None,
                  server: Path | None = None) -> Presets:
    """The file's sections; never raises (Presets.check() does). A section with an error
    keeps its body from `previous` (the last good one) if it had one. `server`: the
    llama-server of llamad.conf, whose flags sections without their own are read with."""
    where = str(path) if path else "presets"
    base = path.parent if path else None
    raws = parse_ini(text, where)
    flags = global_flags(server)
    star = next((r for r in raws if r.name == "*"), RawSection("*"))
    defaults, errs = _section(star, where, base, flags, flags)
    errors: dict[str, ConfigError] = {}
    if errs:
        errors["*"] = errs[0]
        defaults = previous.defaults if previous is not None else defaults
    sections: dict[str, Section] = {}
    for raw in raws:
        if raw.name == "*":
            continue
        section, errs = _section(raw, where, base, defaults.flags, flags)
        if section.flags is not defaults.flags:  # [*]'s keys must suit this binary too
            errs += build_section(star, where, base, section.flags)[1]
        if errs:
            errors[raw.name] = errs[0]
            if previous is not None and raw.name in previous.sections:
                section = previous.sections[raw.name]
        sections[raw.name] = section
    return Presets(path, defaults, MappingProxyType(sections), MappingProxyType(errors))


def _section(raw: RawSection, where: str, base: Path | None, inherited: Table,
             fallback: Table) -> tuple[Section, list[ConfigError]]:
    """build_section with the flags of the section's own llama-server, else `inherited`."""
    flags, errors = inherited, []
    for key, value, line in raw.items:
        if key == modelkeys.SERVER:
            try:
                server = modelkeys.server_path(value, f"{where}:{line} [{raw.name}] {key}", base)
                flags = flagtable.for_binary(server)
            except ConfigError as e:
                errors.append(ConfigError(f"{where}:{line} [{raw.name}]: {key} = {value!r}: "
                                          f"{e.message}"))
                flags = fallback
    section, more = build_section(raw, where, base, flags)
    return section, errors + more


def global_flags(server: Path | None) -> Table:
    """The flags of llamad.conf's llama-server; the built-in table where it cannot be run
    (check-config says so on its own)."""
    if server is None:
        return DEFAULT
    try:
        return flagtable.for_binary(server)
    except ConfigError:
        return DEFAULT


def load_presets(path: Path | None, previous: Presets | None = None,
                 server: Path | None = None) -> Presets:
    """Read the preset file; None means no presets. Never raises: a file that cannot be
    read is an error of the whole file, and the previous sections stay."""
    if path is None:
        return Presets.empty()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        kept = previous if previous is not None else Presets.empty()
        error = ConfigError(f"{path}: the preset file cannot be read ({e}).")
        return Presets(path, kept.defaults, kept.sections, MappingProxyType({"": error}))
    return parse_presets(text, path, previous, server)


def _pick(key: str, section: Section | None, defaults: Section) -> object:
    if section is not None and key in section.extra:
        return section.extra[key]
    return defaults.extra.get(key)


def model_settings(model_id: str, path: Path, mmproj: Path | None, presets: Presets,
                   global_args: Options, draft: Path | None = None) -> ModelSettings:
    """Merge [*] < the model's section < global args, as router mode does, and render its
    argv. `draft`: the file a section's spec-draft-hf names in the cache, or the draft
    sidecar (mtp-*.gguf, ...) beside the model in its directory."""
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
    limit = _pick(modelkeys.CONCURRENCY, section, presets.defaults)
    server = _pick(modelkeys.SERVER, section, presets.defaults)
    env = modelkeys.merged_env(*(part.extra.get(modelkeys.ENV) if part is not None else None
                                 for part in (presets.defaults, section)))
    return ModelSettings(
        args=args,
        load_on_startup=startup,
        stop_timeout=float(stop) if isinstance(stop, float) else None,
        pin=pin,
        ttl=modelkeys.idle_ttl(ttl),
        memory_max=_str_or_none(_pick("memory-max", section, presets.defaults)),
        memory_high=_str_or_none(_pick("memory-high", section, presets.defaults)),
        devices=devices if isinstance(devices, tuple) else None,
        split=bool(_pick("split", section, presets.defaults)),
        preset_text=_ini(model_id, args, section, presets.defaults, env),
        tags=_tags(section, presets.defaults),
        metrics=options.get(METRICS, (METRICS,)) == (METRICS,),
        restore=restore if isinstance(restore, bool) else pin or startup,
        ctx_max=_ctx_max(section, presets.defaults),
        memory_need=_memory_need_of(section, presets.defaults),
        concurrency_limit=limit if isinstance(limit, int) else None,
        env=env,
        server=server if isinstance(server, Path) else None,
    )


def _ctx_max(section: Section | None, defaults: Section) -> int | None:
    value = _pick("ctx-max", section, defaults)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
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
         defaults: Section, env: tuple[str, ...]) -> str:
    """The model's effective preset as INI, like the router's status.preset."""
    lines = [f"[{model_id}]"]
    for option in argv.walk(args, (section or defaults).flags.by_arg):
        value = " ".join(option.values) if option.values else \
            ("false" if option.negated else "true")
        if option.name != ALIAS:  # the id; real aliases are listed below
            lines.append(f"{option.name.lstrip('-')} = {value}")
    extra = dict(defaults.extra)
    if section is not None:
        extra.update(section.extra)
    if env:  # merged from [*] and the section, secrets masked
        extra[modelkeys.ENV] = modelkeys.masked(env, redact.MASK)
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
