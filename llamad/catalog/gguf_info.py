"""Header-only GGUF metadata (ggufheader.py reads it, bounded), cached by (dev, inode, size,
mtime)."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llamad.catalog import files, ggufheader
from llamad.catalog.ggufheader import ARCH_FIELDS, FileHeader, GGUFError, Scalar, TensorBytes

# What a header says lives in ggufheader.py; the catalog imports these names from here.
__all__ = ["FileHeader", "GGUFError", "GGUFInfo", "InfoCache", "Scalar", "TensorBytes",
           "combine", "read_header"]

log = logging.getLogger("llamad.gguf")

StatKey = tuple[int, int, int, int]
CACHE_VERSION = 5


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str | None
    parameters: int | None
    context_length: int | None
    block_count: int | None
    head_count: int | None
    head_count_kv: int | None
    embedding_length: int | None
    key_length: int | None
    value_length: int | None
    size: int
    quantization: str | None
    modalities: tuple[str, ...]
    sliding_window: int | None = None  # tokens; memory.py sizes SWA layers' cache by it
    feed_forward_length: int | None = None
    expert_count: int | None = None
    expert_used_count: int | None = None
    expert_feed_forward_length: int | None = None
    tensors: TensorBytes | None = None  # where the weights' bytes sit, for offload estimates


def _not_gguf(head: bytes) -> str | None:
    """Why a file is not a GGUF file at all, from its first bytes, naming what a new user
    most often has instead; None where it begins as one. The bytes themselves are never
    told: the file may be a link to one only root may read (docs/security.md)."""
    if head[:4] == b"GGUF":
        return None
    if not head:
        return "is empty"
    if head.startswith(b"version https://git-lfs"):
        return ("is a Git LFS pointer, not the model: its repository was cloned without "
                "git-lfs (`git lfs pull` fetches the file)")
    if head.lstrip()[:1] == b"<":
        return ("is not a GGUF file but a web page: the download link leads to the model's "
                "page rather than to the file")
    return "is not a GGUF file: it does not begin with 'GGUF'"


def read_header(path: Path) -> FileHeader:
    """Parse one file's header; raise GGUFError if it is not a complete GGUF file, or not a
    regular file llamad may read (files.py: never blocks, never as root what a model unit
    could not read)."""
    try:
        fd, st = files.open_regular(path)
    except files.Refused as e:
        raise GGUFError(str(e)) from None
    try:
        why = _not_gguf(os.pread(fd, 64, 0))
        if why:
            raise GGUFError(why)
        return ggufheader.parse(fd, st.st_size)
    except OSError as e:
        raise GGUFError(f"cannot be read ({e.strerror or e})") from e
    except GGUFError as e:
        if str(e) != "truncated":
            raise
        raise GGUFError(f"is a truncated or damaged GGUF file ({st.st_size} bytes; an "
                        "interrupted copy or download?)") from None
    finally:
        os.close(fd)


def _quantization(head: FileHeader) -> str | None:
    return head.file_type or head.tensor_type


def _modalities(mmproj: FileHeader | None) -> tuple[str, ...]:
    if mmproj is None:
        return ("text",)
    vision = mmproj.fields.get("clip.has_vision_encoder")
    audio = mmproj.fields.get("clip.has_audio_encoder")
    if vision is None and audio is None:
        vision = True
    return ("text",) + (("image",) if vision else ()) + (("audio",) if audio else ())


def combine(shards: list[FileHeader], mmproj: FileHeader | None) -> GGUFInfo:
    """Build one model's GGUFInfo from its shards' headers (first shard first)."""
    first = shards[0]
    fields = first.fields
    arch = fields.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    p = f"{arch}." if arch else "-"
    # This runs for every model on every rescan: one pass over prefixed keys made once per
    # architecture. (type() rather than isinstance(): a bool is no count.)
    ints = {name: value if type(value) is int else None
            for name, key in _arch_keys(p) for value in (fields.get(key),)}
    return GGUFInfo(
        architecture=arch,
        parameters=sum(s.parameters for s in shards) or None,
        size=sum(s.size for s in shards),
        quantization=_quantization(first),
        modalities=_modalities(mmproj),
        tensors=first.tensors if len(shards) == 1 else functools.reduce(
            TensorBytes.plus, (s.tensors for s in shards)),
        **ints,
    )


@functools.cache
def _arch_keys(prefix: str) -> tuple[tuple[str, str], ...]:
    return tuple((name, prefix + key) for name, key in ARCH_FIELDS.items())


def _header(value: dict[str, Any]) -> FileHeader:
    layers, *rest = value.pop("tensors")
    return FileHeader(**value, tensors=TensorBytes(tuple(layers), *rest))


def _stat_key(st: os.stat_result) -> StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class InfoCache:
    """Headers (or why a file was rejected) by path, valid while the stat key matches.

    Optionally backed by a JSON file so a short-lived command (`llamad models`) is
    as fast on its second run as the daemon is on a rescan.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._entries: dict[str, tuple[StatKey, FileHeader | str]] = {}
        self._dirty = False
        if path is not None:
            self._load(path)

    def header(self, path: Path, st: os.stat_result | None = None,
               confine: Callable[[Path], None] | None = None) -> FileHeader:
        """The file's header; `confine` (files.confine) is asked before a file is read."""
        st = st or path.stat()
        key, name = _stat_key(st), str(path)
        hit = self._entries.get(name)
        if hit is None or hit[0] != key:
            try:
                if confine is not None:
                    confine(path)
                value: FileHeader | str = read_header(path)
            except files.Refused as e:
                value = str(e)
            except GGUFError as e:
                value = str(e)
            hit = (key, value)
            self._entries[name] = hit
            self._dirty = True
        if isinstance(hit[1], str):
            raise GGUFError(hit[1])
        return hit[1]

    def known(self, path: Path, st: os.stat_result) -> bool:
        """Whether the file's header (or why it was refused) is cached for this stat."""
        hit = self._entries.get(str(path))
        return hit is not None and hit[0] == _stat_key(st)

    def retain(self, paths: Iterable[str]) -> None:
        """Forget files that are gone, so the cache does not grow without bound."""
        keep = set(paths)
        for name in [n for n in self._entries if n not in keep]:
            del self._entries[name]
            self._dirty = True

    def __len__(self) -> int:
        return len(self._entries)

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        data = {"version": CACHE_VERSION, "gguf": "gguf", "entries": {
            n: [list(k), asdict(v) if isinstance(v, FileHeader) else v]
            for n, (k, v) in self._entries.items()}}
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, separators=(",", ":")))
            tmp.replace(self.path)
            self._dirty = False
        except OSError as e:
            log.debug("cannot write the metadata cache %s: %s", self.path, e)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            if data.get("version") != CACHE_VERSION:
                return
            for name, (key, value) in data["entries"].items():
                header = value if isinstance(value, str) else _header(value)
                self._entries[name] = (tuple(key), header)
        except (OSError, ValueError, TypeError, KeyError) as e:
            # A missing or damaged cache only costs a slower scan.
            log.debug("ignoring the metadata cache %s: %s", path, e)
            self._entries.clear()
