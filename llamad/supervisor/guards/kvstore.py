"""Saved KV caches on disk: which file holds which model's slot, and the disk bound.

Layout under `state-dir/kv/` (mode 0700: only llamad, root, reaches anything below it):

- `index.json`: one entry per saved slot (model, file, identity key, slot, tokens, bytes,
  when, SHA-256 of the file), and per model the rates learned from its saves, restores
  and prefills (kvpolicy.Rates). Written by llamad alone; a file the index does not name
  is a leftover of an interrupted save and is removed.
- `<dir>/` per model (mode 0733), bind-mounted read-write into that model's unit, where
  llama-server writes the files. The model's dynamic user may create files there but not
  list them; llamad, owning the directory, may remove any of them.

Every method does file I/O: call them from a worker thread (asyncio.to_thread). A lock
keeps the index consistent between threads; hashing runs outside it.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Container, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llamad.config import Config
from llamad.statefile import read_json, write_json
from llamad.supervisor.guards.kvpolicy import Rates

if TYPE_CHECKING:
    from llamad.catalog.catalog import Model

log = logging.getLogger("llamad.kvcache")

INDEX = "index.json"
ROOT_MODE = 0o700  # nobody else may reach the per-model directories
MODEL_DIR_MODE = 0o733  # the model's dynamic user may add files, not list them
CHUNK = 1 << 20


def identity(config: Config, model: Model) -> str:
    """What a saved cache is valid for: the files (as stat sees them) and the arguments."""
    files = [config.llama_server, *model.shards, *([model.mmproj] if model.mmproj else [])]
    stats = [(str(p), *_stat(p)) for p in files]
    text = json.dumps([stats, list(model.settings.args)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _stat(path: os.PathLike[str]) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class Entry:
    """One slot's saved cache."""

    model: str
    dir: str  # the model's directory under kv/
    file: str
    key: str  # identity() of the model when it was saved
    slot: int
    tokens: int
    bytes: int = 0
    at: float = 0.0  # wall-clock seconds of the save
    sha256: str = ""


class Store:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: list[Entry] = []
        self._rates: dict[str, Rates] = {}

    def open(self) -> None:
        """Create the root, read the index, forget entries whose file is gone and remove
        files no entry names. Raises OSError when the root cannot be made."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, ROOT_MODE)
        entries, self._rates = _read_index(self.root / INDEX)
        self._entries = [e for e in entries if self.path(e).is_file()]
        for sub in self.root.iterdir():
            if sub.is_dir():
                self.remove_strays(sub.name)
        self._write()

    def path(self, e: Entry) -> Path:
        return self.root / e.dir / e.file

    def model_dir(self, name: str) -> Path:
        """The model's directory, made if missing, with the mode its unit needs."""
        path = self.root / name
        if not path.is_dir():
            path.mkdir(exist_ok=True)
            os.chmod(path, MODEL_DIR_MODE)
        return path

    def entries(self, model: str) -> list[Entry]:
        with self._lock:
            return [e for e in self._entries if e.model == model]

    def rates(self, model: str) -> Rates:
        """A copy of what was learned about the model: change it, then `learn` it."""
        with self._lock:
            return dataclasses.replace(self._rates.get(model, Rates()))

    def broken(self) -> dict[str, set[str]]:
        """model -> the identity keys whose restore did not take."""
        with self._lock:
            return {m: set(r.broken) for m, r in self._rates.items() if r.broken}

    def learn(self, model: str, rates: Rates) -> None:
        with self._lock:
            if self._rates.get(model) == rates:
                return
            self._rates[model] = rates
            self._write()

    def usage(self) -> dict[str, tuple[int, int]]:
        """model -> (tokens, bytes) stored."""
        out: dict[str, tuple[int, int]] = {}
        with self._lock:
            for e in self._entries:
                tokens, size = out.get(e.model, (0, 0))
                out[e.model] = (tokens + e.tokens, size + e.bytes)
        return out

    def add(self, saved: Iterable[Entry]) -> list[Entry]:
        """Record freshly written files: hashed, replacing the model's older save of the same
        slot and every save of it under another key, then the oldest files of any model
        beyond max_bytes are removed. Returns the entries dropped by the bound."""
        fresh = [e for e in map(self._hashed, saved) if e is not None]
        with self._lock:
            replaced = {(e.model, e.slot) for e in fresh}
            keys = {e.model: e.key for e in fresh}
            gone = [e for e in self._entries if (e.model, e.slot) in replaced
                    or (e.model in keys and e.key != keys[e.model])]
            kept = [e for e in self._entries if e not in gone] + fresh
            kept.sort(key=lambda e: e.at)
            total, over = sum(e.bytes for e in kept), list[Entry]()
            while kept and total > self.max_bytes:
                over.append(kept.pop(0))
                total -= over[-1].bytes
            self._entries = kept
            self._write()
        self._unlink([*gone, *over])
        return over

    def drop(self, entries: Iterable[Entry]) -> None:
        dropped = list(entries)
        with self._lock:
            self._entries = [e for e in self._entries if e not in dropped]
            self._write()
        self._unlink(dropped)

    def keep_only(self, models: Container[str]) -> list[Entry]:
        """Forget the saves and rates of models not among `models` (the catalog): removed or
        renamed, nothing would restore them, and they held disk until other saves pushed
        them out. Returns the saves dropped."""
        with self._lock:
            gone = [e for e in self._entries if e.model not in models]
            stale = [m for m in self._rates if m not in models]
            if not gone and not stale:
                return []
            self._entries = [e for e in self._entries if e.model in models]
            for m in stale:
                del self._rates[m]
            self._write()
        self._unlink(gone)
        for e in gone:
            log.info("dropped the KV cache of model %s, slot %d: the model is no longer in "
                     "the catalog", e.model, e.slot)
        return gone

    def verify(self, e: Entry) -> str | None:
        """None if the file is as saved, else why not."""
        try:
            _, digest = _size_and_sha256(self.path(e))
        except OSError as err:
            return f"cannot be read ({err.strerror or err})"
        return None if digest == e.sha256 else "does not match its checksum (corrupt)"

    def remove_strays(self, name: str) -> None:
        """Remove files in a model's directory that no entry names: saves that were cut off."""
        with self._lock:
            named = {e.file for e in self._entries if e.dir == name}
        for path in (self.root / name).iterdir():
            if path.name not in named and not path.is_dir():
                path.unlink(missing_ok=True)

    def _hashed(self, e: Entry) -> Entry | None:
        path = self.path(e)
        try:
            size, digest = _size_and_sha256(path)
            return dataclasses.replace(e, bytes=size, sha256=digest)
        except OSError as err:
            log.warning("model %s: the KV cache saved to %s cannot be read (%s); not kept",
                        e.model, path, err.strerror or err)
            path.unlink(missing_ok=True)
            return None

    def _unlink(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            try:
                self.path(e).unlink(missing_ok=True)
            except OSError as err:
                log.warning("cannot remove %s: %s", self.path(e), err.strerror or err)

    def _write(self) -> None:
        write_json(self.root / INDEX, {
            "version": 1, "entries": [dataclasses.asdict(e) for e in self._entries],
            "rates": {m: dataclasses.asdict(r) for m, r in sorted(self._rates.items())}},
            "the index of saved KV caches", indent=1)


def _read_index(path: Path) -> tuple[list[Entry], dict[str, Rates]]:
    raw = read_json(path, "the index of saved KV caches")
    if raw is None:
        return [], {}
    try:
        entries = [Entry(**{f.name: e[f.name] for f in dataclasses.fields(Entry)})
                   for e in raw["entries"]]
    except (KeyError, TypeError) as err:
        log.warning("ignoring the index of saved KV caches in %s: %s", path, err)
        return [], {}
    rates: dict[str, Rates] = {}
    found = raw.get("rates")
    for model, r in (found if isinstance(found, dict) else {}).items():
        try:
            rates[model] = Rates(**r) if isinstance(r, dict) else Rates()
        except TypeError as err:  # written by another version: learned again
            log.info("ignoring the learned KV cache rates of model %s: %s", model, err)
    return entries, rates


def _size_and_sha256(path: Path) -> tuple[int, str]:
    """A saved file's size and SHA-256. The directory is the model unit's to write in, so
    what is there is untrusted: a link (to /dev/zero, to a root-only file) is not followed,
    anything but a regular file is refused without blocking (a FIFO), and no more than the
    size it had when opened is read (a file the unit keeps growing)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        h, left = hashlib.sha256(), st.st_size
        while left > 0 and (chunk := f.read(min(CHUNK, left))):
            h.update(chunk)
            left -= len(chunk)
    return st.st_size - left, h.hexdigest()
