"""Finding models on disk: the GGUF files of a models directory, as llama-server's router
names them (`X.gguf` is model `X`; a subdirectory `D/` is model `D` with its first shard or one
file, an `mmproj*` projector and an `mtp-`/`dspark-`/`dflash-` draft sidecar), each file's
header read within the scan's bounds. catalog.py turns what is found into models."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llamad.catalog import files
from llamad.catalog.gguf_info import FileHeader, GGUFError, InfoCache
from llamad.catalog.ggufheader import TooSlow
from llamad.catalog.presets import SwaFits

# CPU one scan spends reading headers it has not cached; the rest wait for the next scan,
# so hostile files (each bounded by ggufheader.CPU_SECONDS) cannot hold a scan for long.
SCAN_SECONDS = 10.0
_DRAFT_PREFIXES = ("mtp-", "dspark-", "dflash-")


@dataclass
class Found:
    """A model located on disk, before presets and metadata are applied."""

    id: str
    shards: tuple[Path, ...]
    mmproj: Path | None
    source: str
    draft: Path | None = None  # a preset's spec-draft-hf, found in the cache
    hidden: bool = False  # a cache entry a preset with dedup-cache-models stands for


def _placed_blob(path: Path) -> bool:
    """A blob, or a cache entry linked to one, which cannot be half written: llama.cpp,
    llamad and Ollama write a blob under another name and rename it once it is whole (and,
    llamad, verified)."""
    try:
        return (Path(os.readlink(path)) if path.is_symlink() else path).parent.name == "blobs"
    except OSError:
        return False


@dataclass
class Scan:
    """What one scan of the models' places carries along and gathers."""

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

    def _recent(self, st: os.stat_result) -> bool:
        """Modified within the settle window: maybe still being written. An mtime further
        ahead of the clock than the window (a copy from a machine whose clock runs ahead)
        tells nothing of a write; the length check (ggufheader) still catches a partial
        file. Waiting for the clock to pass it could hide the model for days."""
        return abs(self.now - st.st_mtime) < self.settle

    def header(self, path: Path) -> FileHeader | None:
        """The file's header, or None (with a problem noted) if it cannot be served now."""
        self.seen.add(str(path))
        try:
            st = files.regular_stat(path)  # FIFOs, devices, sockets, bad links: refused
        except files.Refused as e:
            self.problems.append(f"{path} {e}; skipped.")
            return None
        if self._recent(st) and not _placed_blob(path):
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
        except TooSlow as e:  # a busy machine's: the next scan reads it again
            self.pending = True
            self.unsettled.add(path)
            self.problems.append(f"{path} {e}; it is read again at the next scan.")
            return None
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


def shard_set(first: Path, scan: Scan) -> tuple[Path, ...] | None:
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


def _gguf_entries(directory: Path, scan: Scan) -> list[os.DirEntry[str]]:
    """The directory's *.gguf entries that are no directories, sorted: what is not a
    regular file (a FIFO, a broken link) is told once, by Scan.header, when read."""
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


def _scan_subdir(directory: Path, scan: Scan) -> Found | None:
    entries = _gguf_entries(directory, scan)
    mmproj = [e for e in entries if "mmproj" in e.name]
    drafts = [e for e in entries
              if "mmproj" not in e.name and e.name.startswith(_DRAFT_PREFIXES)]
    models = [e for e in entries
              if "mmproj" not in e.name and not e.name.startswith(_DRAFT_PREFIXES)]
    firsts = [e for e in models if "-00001-of-" in e.name]
    singles = [e for e in models if split_info(e.name) is None]
    choice = firsts or singles
    if not choice:
        return None
    if len(choice) > 1 or len(mmproj) > 1 or len(drafts) > 1:
        used = [choice[0].name, *(e[0].name for e in (mmproj, drafts) if e)]
        scan.problems.append(f"{directory} holds several model, projector or draft files; "
                             f"using {', '.join(used)}.")
    shards = shard_set(Path(choice[0].path), scan)
    if shards is None:
        return None
    # As llama.cpp's router: the draft sidecar becomes the model's --spec-draft-model.
    return Found(directory.name, shards, Path(mmproj[0].path) if mmproj else None, "models_dir",
                 draft=Path(drafts[0].path) if drafts else None)


def _top_level_name(filename: str) -> str:
    """The router's id for a file at the top of a models directory: every ".gguf" in its
    name removed, not only the suffix (`a.gguf.gguf` is `a`), since clients send its ids."""
    return filename.replace(".gguf", "")


def _subdirs(directory: Path) -> list[str]:
    """The directories in `directory`, sorted; none if it cannot be listed (EACCES under NFS
    root_squash, gone meanwhile): _gguf_entries has told why, and the scan goes on."""
    try:
        with os.scandir(directory) as it:
            return sorted(e.path for e in it if _is(e.is_dir))
    except OSError:
        return []


def discover_models_dir(directory: Path, scan: Scan) -> list[Found]:
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
        name = _top_level_name(entry.name)
        if not name:
            scan.problems.append(f"{entry.path} has no name left once '.gguf' is taken "
                                 "away; skipped.")
            continue
        shards = shard_set(Path(entry.path), scan)
        if shards is not None:
            found.append(Found(name, shards, None, "models_dir"))
    for sub in _subdirs(directory):
        if (model := _scan_subdir(Path(sub), scan)) is not None:
            found.append(model)
    return found
