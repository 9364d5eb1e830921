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
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from llamad import redact
from llamad.catalog import argv, companions, files, hfcache
from llamad.catalog.gguf_info import FileHeader, GGUFError, GGUFInfo, InfoCache, combine
from llamad.catalog.presets import (
    MMPROJ,
    ModelSettings,
    Options,
    Presets,
    SwaFits,
    canonical_name,
    load_presets,
    model_settings,
    parse_args,
    run_settings,
)
from llamad.config import Config, cache_dir
from llamad.errors import ConfigError
from llamad.safetext import one_line, unsafe
from llamad.systemd.unitname import unit_name

log = logging.getLogger("llamad.catalog")

SETTLE_SECONDS = 1.0  # a file modified more recently than this may still be being written
# CPU one scan spends reading headers it has not cached; the rest wait for the next scan,
# so hostile files (each bounded by ggufheader.CPU_SECONDS) cannot hold a scan for long.
SCAN_SECONDS = 10.0
# What a scan keeps at most: a group member's 200,000 links to one tiny file would
# otherwise cost llamad more memory than MemoryMax= (~6.5 KB a model: docs/benchmarks.md).
MAX_MODELS = 10_000
MAX_PROBLEMS = 1_000
SOURCE_RANK = {"models_dir": 0, "cache": 1}
_DRAFT_PREFIXES = ("mtp-", "dspark-", "dflash-")


@dataclass(frozen=True)
class Model:
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


@dataclass(frozen=True)
class Snapshot:
    models: Mapping[str, Model]
    problems: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias -> model id
    pending: bool = False  # some file looked unfinished: scan again after SETTLE_SECONDS
    # New models whose files are still being written: a request for one waits for them.
    settling: frozenset[str] = frozenset()

    def resolve(self, name: str) -> Model | None:
        model = self.models.get(name)
        if model is None and name in self.aliases:
            model = self.models.get(self.aliases[name])
        return model


@dataclass
class Found:
    """A model located on disk, before presets and metadata are applied."""

    id: str
    shards: tuple[Path, ...]
    mmproj: Path | None
    source: str
    draft: Path | None = None  # a preset's spec-draft-hf, found in the cache
    hidden: bool = False  # a cache entry a preset with dedup-cache-models stands for


@dataclass
class _Scan:
    cache: InfoCache
    now: float
    settle: float
    within: tuple[Path, ...] = ()  # real paths of the directories scanned (files.confine)
    swa_fits: SwaFits | None = None
    problems: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    pending: bool = False
    unsettled: set[Path] = field(default_factory=set)
    spent: float = 0.0  # CPU seconds spent reading headers

    def confine(self, path: Path) -> None:
        """files.confine to the directories scanned (raises files.Refused)."""
        files.confine(path, self.within)

    def header(self, path: Path) -> FileHeader | None:
        """The file's header, or None (with a problem noted) if it cannot be served now."""
        self.seen.add(str(path))
        try:
            st = files.regular_stat(path)  # FIFOs, devices, sockets, bad links: refused
        except files.Refused as e:
            self.problems.append(f"{path} {e}; skipped.")
            return None
        if self.now - st.st_mtime < self.settle:
            self.pending = True
            self.unsettled.add(path)
            self.problems.append(f"{path} is still being written; it will be added when done.")
            return None
        known = self.cache.known(path, st)
        if self.spent > SCAN_SECONDS and not known:
            self.pending = True  # waits like a file being written: see _build
            self.unsettled.add(path)
            self.problems.append(f"{path} is not read yet: this scan spent {SCAN_SECONDS:.0f} s "
                                 "reading other headers; the next scan reads it.")
            return None
        start = time.thread_time()
        try:
            return self.cache.header(path, st, self.confine)
        except GGUFError as e:
            self.problems.append(f"{path} {e}; skipped.")
            return None
        finally:
            self.spent += 0.0 if known else time.thread_time() - start


def split_info(name: str) -> tuple[str, int, int] | None:
    """'m-00001-of-00003.gguf' -> ('m', 1, 3); None if the name is not a split shard."""
    stem = name.removesuffix(".gguf")
    head, sep, count = stem.rpartition("-of-")
    prefix, dash, index = head.rpartition("-")
    if sep and dash and len(index) == len(count) == 5 and (index + count).isdigit():
        return prefix, int(index), int(count)
    return None


def _shard_set(first: Path, scan: _Scan) -> tuple[Path, ...] | None:
    info = split_info(first.name)
    if info is None:
        return (first,)
    prefix, _, count = info
    shards = tuple(first.with_name(f"{prefix}-{n:05d}-of-{count:05d}.gguf")
                   for n in range(1, count + 1))
    missing = [s.name for s in shards if not os.path.lexists(s)]  # header() judges links
    if missing:
        scan.problems.append(f"{first} is part of a split set missing {', '.join(missing)}; "
                             "skipped.")
        return None
    return shards


def _gguf_entries(directory: Path, scan: _Scan) -> list[os.DirEntry[str]]:
    """The directory's *.gguf entries that are no directories, sorted: what is not a
    regular file (a FIFO, a broken link) is told once, by _Scan.header, when read."""
    out = []
    try:
        files.confine(directory, scan.within, files.LIST)
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except files.Refused as e:
        scan.problems.append(f"{directory} {e}; skipped.")
        return []
    except OSError as e:
        scan.problems.append(f"{directory} cannot be listed ({e.strerror}); skipped.")
        return []
    for entry in entries:
        if not entry.name.endswith(".gguf"):
            if _is(entry.is_file) and not entry.name.startswith("."):
                scan.problems.append(f"{entry.path} is not a GGUF file (no .gguf suffix); "
                                     "skipped.")
        elif not _is(entry.is_dir):
            out.append(entry)
    return out


def _is(test: Callable[[], bool]) -> bool:
    """entry.is_file() or .is_dir(), False for a link that loops: its ELOOP would end the
    whole scan, and with it llamad's start."""
    try:
        return test()
    except OSError:
        return False


def _scan_subdir(directory: Path, scan: _Scan) -> Found | None:
    entries = _gguf_entries(directory, scan)
    mmproj = [e for e in entries if "mmproj" in e.name]
    models = [e for e in entries
              if "mmproj" not in e.name and not e.name.startswith(_DRAFT_PREFIXES)]
    firsts = [e for e in models if "-00001-of-" in e.name]
    singles = [e for e in models if split_info(e.name) is None]
    choice = firsts or singles
    if not choice:
        return None
    if len(choice) > 1 or len(mmproj) > 1:
        scan.problems.append(f"{directory} holds several model or projector files; using "
                             f"{choice[0].name}" + (f" and {mmproj[0].name}." if mmproj else "."))
    shards = _shard_set(Path(choice[0].path), scan)
    if shards is None:
        return None
    return Found(directory.name, shards, Path(mmproj[0].path) if mmproj else None, "models_dir")


def discover_models_dir(directory: Path, scan: _Scan) -> list[Found]:
    if not directory.is_dir():
        scan.problems.append(f"models directory {directory} does not exist or is not a "
                             "directory.")
        return []
    found = []
    for entry in _gguf_entries(directory, scan):
        if "mmproj" in entry.name or entry.name.startswith(_DRAFT_PREFIXES):
            continue  # a companion file cannot be served on its own
        split = split_info(entry.name)
        if split is not None and split[1] != 1:
            continue  # served as part of its first shard
        shards = _shard_set(Path(entry.path), scan)
        if shards is not None:
            found.append(Found(entry.name.removesuffix(".gguf"), shards, None, "models_dir"))
    with os.scandir(directory) as it:
        subdirs = sorted(e.path for e in it if _is(e.is_dir))
    for sub in subdirs:
        if (model := _scan_subdir(Path(sub), scan)) is not None:
            found.append(model)
    return found


def _read(found: Found, scan: _Scan) -> GGUFInfo | None:
    headers = [scan.header(p) for p in found.shards]
    mmproj = scan.header(found.mmproj) if found.mmproj else None
    if any(h is None for h in headers) or (found.mmproj and mmproj is None):
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
            target = Found(name, (path,), found[name].mmproj if name in found else None,
                           "preset")
        elif section.hf_repo is not None:
            hit = _in_cache(cached, section.hf_repo)
            if hit is None:
                problems.append(f"preset [{name}]: {section.hf_repo} is not in the llama.cpp "
                                "cache; download it first; skipped.")
                continue
            target = Found(name, hit.shards, hit.mmproj, "preset")
            backing.append(hit)
        elif name in found:
            target = Found(name, found[name].shards, found[name].mmproj, "preset")
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
    for m in models.values():
        redact.remember(argv.secret_values(m.settings.args))
    if with_secrets:
        names = ", ".join(sorted(with_secrets)[:3]) + (", ..." if len(with_secrets) > 3 else "")
        problems.append(f"hf-token is set for {len(with_secrets)} models ({names}): llamad "
                        "never downloads, "
                        "so it is not passed to llama-server, whose command line every local "
                        "user can read.")


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
           config: Config, st: _Scan) -> Model:
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
        draft=companions.draft(settings.args, st.cache, st.confine))


def scan(config: Config, *, preset: Presets | None = None, cache: InfoCache | None = None,
         settle: float = SETTLE_SECONDS, previous: Snapshot | None = None,
         swa_fits: SwaFits | None = None) -> Snapshot:
    """Build a Snapshot of everything servable now. Raises ConfigError for bad `args`.

    With the `previous` snapshot, a known model whose file is still being written keeps
    its previous entry, and so do the models of a models directory that has gone.
    `swa_fits`: whether a sliding-window model's --swa-full fits the memory plan.
    """
    preset = preset if preset is not None else load_presets(config.models_preset)
    global_args = parse_args(config.args, f"{config.path or 'configuration'}: args")
    cache = cache if cache is not None else _default_cache
    root = cache_dir(config) if config.llama_cache else None
    st = _Scan(cache, time.time(), settle,
               files.roots([*config.models_dirs, *([root] if root is not None else [])]),
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
                    st.pending, frozenset(settling))


def _models(merged: dict[str, Found], st: _Scan, preset: Presets, global_args: Options,
            previous: Snapshot | None, settling: set[str], config: Config) -> dict[str, Model]:
    """The servable models of those found, at most MAX_MODELS."""
    models: dict[str, Model] = {}
    units: dict[str, str] = {}
    reserved = {a: name for name, section in preset.sections.items() for a in section.aliases}
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


def _build(f: Found, st: _Scan, preset: Presets, global_args: Options,
           previous: Snapshot | None, settling: set[str], config: Config) -> Model | None:
    """The model found, or its previous entry while its file is still being written."""
    shards = _shard_set(f.shards[0], st) if len(f.shards) == 1 else f.shards
    if shards is None:
        return None
    f.shards = shards
    info = _read(f, st)
    if info is not None:
        return _model(f, info, preset, global_args, config, st)
    if not st.unsettled & {*f.shards, *([f.mmproj] if f.mmproj else [])}:
        return None
    old = previous.models.get(f.id) if previous is not None else None
    if old is None:
        settling.add(f.id)
    return old


def _keep_gone_dir(directory: Path, previous: Snapshot, st: _Scan) -> list[Model]:
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
        self.presets = load_presets(config.models_preset)
        self.snapshot = Snapshot(MappingProxyType({}))
        self._listeners: list[Listener] = []
        self._lock: asyncio.Lock | None = None

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call listener(old, new) after each change; returns an unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def compute(self) -> Snapshot:
        try:
            self.presets = load_presets(self.config.models_preset)
        except ConfigError as e:
            # Keep serving with the last good presets; the file may be mid-edit.
            log.warning("%s Keeping the previous presets.", e.message)
        snapshot = scan(self.config, preset=self.presets, cache=self.cache, settle=self.settle,
                        previous=self.snapshot, swa_fits=self.swa_fits)
        self.cache.save()  # a no-op unless the cache has a file and changed
        return snapshot

    def publish(self, new: Snapshot) -> None:
        old, self.snapshot = self.snapshot, new
        for problem in new.problems:
            if problem not in old.problems:
                log.warning("%s", problem)
        if new.models == old.models and new.aliases == old.aliases and \
                new.settling == old.settling:
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
