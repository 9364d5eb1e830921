"""Scan model directories, the llama.cpp cache and presets -> an immutable Snapshot.

Naming follows llama-server's router mode: `X.gguf` at the top of a models directory
is model `X`; a subdirectory `D/` is model `D` (its `-00001-of-N` shard, or its one
GGUF file, plus an `mmproj*` projector); cached downloads are `user/repo:QUANT`;
preset sections with `model =` add more. Anything that cannot be served is left out
and described in Snapshot.problems, one sentence each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from llamad import redact
from llamad.catalog import argv, companions, files, hfcache, modelkeys, ollamastore
from llamad.catalog.discover import Found, Scan, discover_models_dir, shard_set
from llamad.catalog.gguf_info import GGUFInfo, InfoCache, combine
from llamad.catalog.presets import (
    MMPROJ,
    ModelSettings,
    Options,
    Presets,
    SwaFits,
    canonical_name,
    global_flags,
    load_presets,
    model_settings,
    parse_args,
    run_settings,
)
from llamad.config import Config, cache_dir
from llamad.safetext import one_line, unsafe
from llamad.systemd.unitname import unit_name

log = logging.getLogger("llamad.catalog")

SETTLE_SECONDS = 1.0  # a file modified more recently than this may still be being written
# What a scan keeps at most: a group member's 200,000 links to one tiny file would
# otherwise cost llamad more memory than MemoryMax= (~6.5 KB a model: docs/benchmarks.md).
MAX_MODELS = 10_000
MAX_PROBLEMS = 1_000


@dataclass(frozen=True)
class Model:
    """A model llamad serves: its files, names, unit and settings, as one scan found them."""

    id: str
    aliases: tuple[str, ...]
    unit: str
    path: Path
    shards: tuple[Path, ...]
    mmproj: Path | None
    source: str  # models_dir | cache | preset
    info: GGUFInfo | None
    settings: ModelSettings
    created: int
    # Served under its name but left out of GET /v1/models (a preset's dedup-cache-models).
    hidden: bool = False
    # The draft model its argv loads (--model-draft), for the memory estimate; None if none
    # or unreadable (llama-server then says why when it starts).
    draft: GGUFInfo | None = None
    # A preset error that touches it (its section's, [*]'s, the file's): requests get 503
    # with it, while its settings stay the last good ones.
    error: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """The catalog at one moment; replaced whole by each scan, never changed."""

    models: Mapping[str, Model]
    problems: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias -> model id
    pending: bool = False  # some file looked unfinished: scan again after SETTLE_SECONDS
    # New models whose files are still being written: a request for one waits for them.
    settling: frozenset[str] = frozenset()
    errors: tuple[str, ...] = ()  # the preset file's errors, one sentence each

    @property
    def error(self) -> str | None:
        """The configuration error to report (/health, STATUS=), if any."""
        if not self.errors:
            return None
        more = len(self.errors) - 1
        return self.errors[0] + (f" (and {more} more; llamad check-config lists them)"
                                 if more else "")

    def resolve(self, name: str) -> Model | None:
        """A model by its id or alias; `NAME:latest` is NAME, as Ollama lists it and its
        users then name it on every route."""
        model = self.models.get(name)
        if model is None and name in self.aliases:
            model = self.models.get(self.aliases[name])
        if model is None and name.endswith(":latest"):
            return self.resolve(name.removesuffix(":latest"))
        return model


def _read(found: Found, scan: Scan) -> GGUFInfo | None:
    headers = [scan.header(p) for p in found.shards]
    mmproj = scan.header(found.mmproj) if found.mmproj else None
    # The draft is loaded with the model: it must be complete too.
    draft = scan.header(found.draft) if found.draft else None
    if any(h is None for h in headers) or (found.mmproj and mmproj is None) or \
            (found.draft and draft is None):
        return None
    return combine([h for h in headers if h is not None], mmproj)


def _merge(found: Iterable[Found], problems: list[str]) -> dict[str, Found]:
    """One model per name: earlier sources win over later ones, and every clash is told."""
    out: dict[str, Found] = {}
    for f in found:
        first = out.get(f.id)
        if first is None:
            out[f.id] = f
        else:
            problems.append(f"model name {f.id!r} is used by both {first.shards[0]} and "
                            f"{f.shards[0]}; serving {first.shards[0]}.")
    return out


def _in_cache(cached: dict[str, Found], repo: str) -> Found | None:
    """`user/repo:TAG`, or the first cached quantization of `user/repo`."""
    repo = canonical_name(repo)
    return cached.get(repo) or next(
        (f for k, f in cached.items() if k.split(":")[0] == repo), None)


def _apply_presets(found: dict[str, Found], preset: Presets, cached: dict[str, Found],
                   problems: list[str]) -> dict[str, Found]:
    """Sections add paths (model =, hf-repo =) or settle which file a name means."""
    base = preset.path.parent if preset.path else Path.cwd()
    for name, section in preset.sections.items():
        target: Found | None = None
        backing: list[Found] = []  # cache entries this section's files come from
        if section.model is not None:
            path = section.model if section.model.is_absolute() else base / section.model
            here = found.get(name)
            target = Found(name, (path,), here.mmproj if here else None, "preset",
                           draft=here.draft if here else None)
        elif section.hf_repo is not None:
            hit = _in_cache(cached, section.hf_repo)
            if hit is None:
                problems.append(f"preset [{name}]: {section.hf_repo} is not in the llama.cpp "
                                "cache; download it first; skipped.")
                continue
            target = Found(name, hit.shards, hit.mmproj, "preset")
            backing.append(hit)
        elif name in found:
            target = Found(name, found[name].shards, found[name].mmproj, "preset",
                           draft=found[name].draft)
        else:
            problems.append(f"preset [{name}] matches no model found and has no model = path; "
                            "ignored.")
            continue
        if section.draft_hf is not None:
            draft = _in_cache(cached, section.draft_hf)
            if draft is None:
                problems.append(f"preset [{name}]: the draft model {section.draft_hf} is not in "
                                "the llama.cpp cache; download it first; skipped.")
                continue
            target.draft = draft.shards[0]
            backing.append(draft)
        dedup = section.extra.get("dedup-cache-models",
                                  preset.defaults.extra.get("dedup-cache-models"))
        for hit in backing:
            # Only a pure cache entry: a section of the same name makes it a preset model.
            if dedup and found.get(hit.id) is hit:
                hit.hidden = True
        found[name] = target
    return found


FLAG_NAME = "starts with '-', which llama-server would take for a flag"


def _unsafe(f: Found, reserved: Mapping[str, str]) -> str | None:
    """A problem line if the model's name or files could not reach systemd intact (the
    name becomes Description= and Environment=, the paths ExecStart=: safetext), if its
    name could pass for a flag, or if a file's name takes one the preset gives an alias."""
    where = one_line(str(f.shards[0]))
    for what, text in (("name", f.id), *(("file", str(p)) for p in f.shards),
                       *((("projector", str(f.mmproj)),) if f.mmproj else ())):
        why = unsafe(text)
        if why is not None:
            return f"{where}: the model's {what} {why}; skipped."
    if f.id.startswith("-"):
        return f"{where}: the model's name {one_line(f.id)!r} {FLAG_NAME}; skipped."
    if f.source != "preset" and f.id in reserved:
        # Root's names win: a file named like an alias must not capture the keys scoped to it.
        return (f"{where}: the model's name {f.id!r} is an alias of preset [{reserved[f.id]}], "
                "which wins; skipped.")
    return None


def _secrets(models: dict[str, Model], problems: list[str]) -> None:
    """Secret flags (hf-token) are masked wherever they would show, and not passed on."""
    with_secrets = [m.id for m in models.values() if argv.secret_values(m.settings.args)]
    in_env = sorted(m.id for m in models.values() if modelkeys.secret_values(m.settings.env))
    for m in models.values():
        redact.remember(argv.secret_values(m.settings.args))
        redact.remember(modelkeys.secret_values(m.settings.env))
    if in_env:
        problems.append(f"env of {', '.join(in_env[:3])}{', ...' if len(in_env) > 3 else ''} "
                        "sets a secret (a name such as *_TOKEN or *_API_KEY): llamad masks it "
                        "in what it shows, but systemd shows a unit's Environment= to every "
                        "local user (systemctl show).")
    if with_secrets:
        names = ", ".join(sorted(with_secrets)[:3]) + (", ..." if len(with_secrets) > 3 else "")
        problems.append(f"hf-token is set for {len(with_secrets)} models ({names}): "
                        "llama-server never downloads under llamad (llamad does, with "
                        "llamad.conf's hf-token-file), so it is not passed to llama-server, "
                        "whose command line every local user can read.")


def _aliases(models: dict[str, Model], problems: list[str],
             preset: Path | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    where = f"{preset}: " if preset else ""
    for model in models.values():
        for alias in model.aliases:
            why = unsafe(alias) or (FLAG_NAME if alias.startswith("-") else None)
            if why is not None:
                problems.append(f"{where}alias {alias!r} of model {model.id!r} {why}; ignored.")
            elif alias in models or alias in out:
                problems.append(f"{where}alias {alias!r} of model {model.id!r} clashes with "
                                "another model or alias; ignored.")
            else:
                out[alias] = model.id
    return out


def _model(f: Found, info: GGUFInfo, preset: Presets, global_args: Options,
           config: Config, st: Scan) -> Model:
    section = preset.sections.get(f.id)
    settings = model_settings(f.id, f.shards[0], f.mmproj, preset, global_args, f.draft)
    # --swa-full where it pays, a built-in chat template
    settings = run_settings(config, info, settings, st.swa_fits)
    mmproj = f.mmproj
    if section is not None and MMPROJ in section.options:
        mmproj = Path(section.options[MMPROJ][1])
        info = dataclasses.replace(info, projector=companions.projector(mmproj, st.cache,
                                                                         st.confine))
    return Model(
        id=f.id, aliases=section.aliases if section else (), unit=unit_name(f.id),
        path=f.shards[0], shards=f.shards, mmproj=mmproj, source=f.source, info=info,
        settings=settings, created=int(f.shards[0].stat().st_mtime), hidden=f.hidden,
        draft=companions.draft(settings.args, st.cache, st.confine),
        error=_error(preset, f.id))


def _error(preset: Presets, model_id: str) -> str | None:
    error = preset.error_for(model_id)
    return None if error is None else \
        f"model {model_id} is not served until the preset file is fixed: {error.message}"


def scan(config: Config, *, preset: Presets | None = None, cache: InfoCache | None = None,
         settle: float = SETTLE_SECONDS, previous: Snapshot | None = None,
         swa_fits: SwaFits | None = None) -> Snapshot:
    """Build a Snapshot of everything servable now. Raises ConfigError for bad `args`.

    With the `previous` snapshot, a known model whose file is still being written keeps
    its previous entry, and so do the models of a models directory that has gone.
    `swa_fits`: whether a sliding-window model's --swa-full fits the memory plan.
    """
    preset = preset if preset is not None else \
        load_presets(config.models_preset, server=config.llama_server)
    global_args = parse_args(config.args, f"{config.path or 'configuration'}: args",
                             global_flags(config.llama_server))
    cache = cache if cache is not None else _default_cache
    root = cache_dir(config) if config.llama_cache else None
    stores = [p for p in (root, config.ollama_models) if p is not None]
    st = Scan(cache, time.time(), settle, files.roots([*config.models_dirs, *stores]),
              swa_fits)
    found: list[Found] = []
    kept: list[Model] = []
    for directory in config.models_dirs:
        found += discover_models_dir(directory, st)
        if previous is not None and not directory.is_dir():
            kept += _keep_gone_dir(directory, previous, st)
    cached: dict[str, Found] = {}
    if root is not None:
        cached = {f.id: f for f in (Found(*c, source="cache")
                                    for c in hfcache.discover(root, st.problems))}
    if config.ollama_models is not None:
        found += [Found(*m, source="ollama")
                  for m in ollamastore.discover(config.ollama_models, st.problems)]
    merged = _apply_presets(_merge([*found, *cached.values()], st.problems), preset, cached,
                            st.problems)
    settling: set[str] = set()
    models = _models(merged, st, preset, global_args, previous, settling, config)
    for model in kept:
        models.setdefault(model.id, model)
    cache.retain(st.seen | {str(p) for m in models.values()
                            for p in companions.paths(m.mmproj, m.settings.args)})
    st.problems += preset.ignored
    _secrets(models, st.problems)
    aliases = _aliases(models, st.problems, preset.path)
    problems = st.problems[:MAX_PROBLEMS]
    if len(st.problems) > MAX_PROBLEMS:
        problems.append(f"... and {len(st.problems) - MAX_PROBLEMS} more problems.")
    return Snapshot(MappingProxyType(models), tuple(problems), MappingProxyType(aliases),
                    st.pending, frozenset(settling),
                    tuple(e.message for e in preset.errors.values()))


def _models(merged: dict[str, Found], st: Scan, preset: Presets, global_args: Options,
            previous: Snapshot | None, settling: set[str], config: Config) -> dict[str, Model]:
    """The servable models of those found, at most MAX_MODELS."""
    models: dict[str, Model] = {}
    units: dict[str, str] = {}
    # Only a section that serves a model holds its aliases: the shipped example presets.ini
    # names models that may never be installed, and gemma.gguf must stay model "gemma".
    reserved = {a: name for name, section in preset.sections.items() if name in merged
                for a in section.aliases}
    for n, f in enumerate(merged.values()):
        if len(models) >= MAX_MODELS:
            st.problems.append(f"more than {MAX_MODELS} models were found; the other "
                               f"{len(merged) - n} are left out.")
            break
        if (why := _unsafe(f, reserved)) is not None:
            st.problems.append(why)
            continue
        model = _build(f, st, preset, global_args, previous, settling, config)
        if model is None:
            continue
        if model.unit in units:
            st.problems.append(f"models {units[model.unit]!r} and {f.id!r} map to the same "
                               f"unit {model.unit}; skipped {f.id!r}.")
            continue
        units[model.unit] = f.id
        models[f.id] = model
    return models


def _build(f: Found, st: Scan, preset: Presets, global_args: Options,
           previous: Snapshot | None, settling: set[str], config: Config) -> Model | None:
    """The model found, or its previous entry while its file is still being written."""
    shards = shard_set(f.shards[0], st) if len(f.shards) == 1 else f.shards
    if shards is None:
        return None
    f.shards = shards
    info = _read(f, st)
    if info is not None:
        return _model(f, info, preset, global_args, config, st)
    if not st.unsettled & {*f.shards, *(p for p in (f.mmproj, f.draft) if p)}:
        return None
    old = previous.models.get(f.id) if previous is not None else None
    if old is None:
        settling.add(f.id)
    return old


def _keep_gone_dir(directory: Path, previous: Snapshot, st: Scan) -> list[Model]:
    """A models directory that went away (unmounted, renamed, mid-replace) keeps the
    models it had, rather than stopping them all: llamad says so and carries on."""
    kept = [m for m in previous.models.values()
            if m.source == "models_dir" and directory in m.path.parents]
    if kept:
        st.problems.append(f"models directory {directory} has gone; keeping its {len(kept)} "
                           "models from the previous scan until it is back.")
    return kept


def may_appear(config: Config, name: str) -> bool:
    """Whether a file or directory for model `name` lies in a models directory, one a
    rescan has not seen yet (copied in a moment ago). Two stats per directory, no reads."""
    if not name or "/" in name or "\0" in name or name.startswith((".", "-")) or len(name) > 250:
        return False
    return any((d / f"{name}.gguf").is_file() or (d / name).is_dir()
               for d in config.models_dirs)


_default_cache = InfoCache()
Listener = Callable[[Snapshot, Snapshot], None]


class Catalog:
    """Owns the current Snapshot; a rescan replaces it and tells subscribers what changed.

    Snapshots are immutable, so readers hold one without locks. compute() may run in
    a worker thread (one at a time); publish() and the listeners run on the caller's
    thread, which for the daemon is the event loop's.
    """

    def __init__(self, config: Config, cache: InfoCache | None = None,
                 settle: float = SETTLE_SECONDS) -> None:
        self.config = config
        self.cache = cache if cache is not None else InfoCache()
        self.settle = settle
        self.swa_fits: SwaFits | None = None  # the daemon's memory plan, set before a scan
        # Read by the first compute(), in a worker thread: a preset's llama-server is run
        # (--help) to learn its flags.
        self.presets = Presets.empty()
        self.snapshot = Snapshot(MappingProxyType({}))
        self._listeners: list[Listener] = []
        self._lock: asyncio.Lock | None = None

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call listener(old, new) after each change; returns an unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def compute(self) -> Snapshot:
        # A section with an error keeps its last good body; its model is refused with the
        # error (Model.error) until the file is fixed, the others are served as they are.
        self.presets = load_presets(self.config.models_preset, self.presets,
                                    self.config.llama_server)
        snapshot = scan(self.config, preset=self.presets, cache=self.cache, settle=self.settle,
                        previous=self.snapshot, swa_fits=self.swa_fits)
        self.cache.save()  # a no-op unless the cache has a file and changed
        return snapshot

    def publish(self, new: Snapshot) -> None:
        old, self.snapshot = self.snapshot, new
        for problem in new.problems:
            if problem not in old.problems:
                log.warning("%s", problem)
        for error in new.errors:
            if error not in old.errors:
                log.error("%s Requests for the models it touches get 503 until the file is "
                          "fixed.", error)
        if old.errors and not new.errors:
            log.info("the preset file has no errors any more")
        if new.models == old.models and new.aliases == old.aliases and \
                new.settling == old.settling and new.errors == old.errors:
            return
        added = sorted(set(new.models) - set(old.models))
        removed = sorted(set(old.models) - set(new.models))
        log.info("catalog: %d models (added: %s; removed: %s)", len(new.models),
                 ", ".join(added) or "none", ", ".join(removed) or "none")
        for listener in list(self._listeners):
            listener(old, new)

    def rescan(self) -> Snapshot:
        """Scan and publish on this thread (for commands and tests)."""
        self.publish(self.compute())
        return self.snapshot

    async def rescan_async(self) -> Snapshot:
        """Scan in a worker thread so a cold scan never blocks the loop, then publish."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            new = await asyncio.get_running_loop().run_in_executor(None, self.compute)
            self.publish(new)
        return self.snapshot
