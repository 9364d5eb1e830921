"""Which flags a llama-server binary takes: the table generated from the pinned llama.cpp
(llama_flags.py), or, for another binary (a fork, a newer build: a preset's
`llama-server = PATH`), the table read from that binary's own `--help`.

`--help` lists each option as `-c,    --ctx-size N` (spellings, then a value's placeholder)
with `(env: LLAMA_ARG_...)` on a later line; a boolean lists its negated spellings after
the positive ones (`-kvo, --kv-offload, -nkvo, --no-kv-offload`). Read this way, the pinned
binary's help gives back exactly the generated table (tests/test_flagtable.py).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamad.catalog import argv
from llamad.catalog.argv import Entry, Flag
from llamad.errors import ConfigError
from llamad.statefile import read_json, write_json

log = logging.getLogger("llamad.flags")

HELP_TIMEOUT = 10.0  # seconds a binary gets to print its --help
HELP_MAX = 1 << 20  # bytes of --help read at most

@dataclass(frozen=True)
class Table:
    """One binary's flags: preset key -> (flag, negated), argv spelling -> (flag, negated)."""

    by_key: dict[str, tuple[Flag, bool]]
    by_arg: dict[str, tuple[Flag, bool]]
    source: str  # where the table came from, for messages

    @classmethod
    def of(cls, entries: list[Entry], source: str) -> Table:
        return cls(*argv.keys(entries), source)

    def spellings(self) -> frozenset[str]:
        return frozenset(self.by_arg)


DEFAULT = Table(argv.BY_KEY, argv.BY_ARG, "the llama-server llamad was built against")

_SPELLING = re.compile(r"--?[A-Za-z][\w.-]*")
_ENV = re.compile(r"\(env: ([A-Z0-9_]+)\)")


def parse_help(text: str) -> list[Entry]:
    """llama-server's --help -> the table's entries, in the order listed."""
    out: list[Entry] = []
    env: str | None = None
    entry: tuple[tuple[str, ...], tuple[str, ...], str] | None = None
    for line in text.splitlines():
        if line.startswith("-") and not line.startswith("-----"):
            if entry is not None:
                out.append((*entry, env))
            entry, env = _option(line), None
        elif entry is not None and (m := _ENV.search(line)):
            env = m.group(1)
    if entry is not None:
        out.append((*entry, env))
    return out


def _option(line: str) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    # Help text starts at column 40 unless the flags are too long to fit.
    head = line[:40] if line[38:40] == "  " else line
    parts = [p.strip() for p in head.strip().split(",")]
    spellings: list[str] = []
    placeholder = ""
    for i, part in enumerate(parts):
        word, _, rest = part.partition(" ")
        if not _SPELLING.fullmatch(word):
            placeholder = ",".join(parts[i:])
            break
        spellings.append(word)
        if rest.strip():
            placeholder = ",".join([rest, *parts[i + 1:]])
            break
    if placeholder:
        kind = "two" if len(placeholder.split()) == 2 and "[" not in placeholder else "value"
        return tuple(spellings), (), kind
    first_neg = next((i for i, s in enumerate(spellings) if s.startswith("--no-")), None)
    longs = [i for i, s in enumerate(spellings[:first_neg or 0]) if s.startswith("--")]
    if first_neg is None or not longs:
        return tuple(spellings), (), "flag"
    cut = longs[-1] + 1
    return tuple(spellings[:cut]), tuple(spellings[cut:]), "bool"


_tables: dict[tuple[str, int, int, int], Table] = {}
_lock = threading.Lock()
_store: Path | None = None  # remember_in()
STORE_VERSION = 1
STORE_MAX = 4 << 20  # bytes of the store read at most


def remember_in(path: Path | None) -> None:
    """Keep what binaries' --help said in this file (llamad's state-dir), valid while a
    binary's stat matches: a start of llamad then runs no llama-server --help (5 ms here,
    in the wait of a socket-activated start's first client)."""
    global _store
    _store = path


def for_binary(path: Path) -> Table:
    """The flag table of the llama-server at `path`: the generated one when its --help
    lists the same spellings, else the one its --help gives. Blocks (runs the binary):
    call it from a worker thread. Raises ConfigError when it cannot be run."""
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror}).") from None
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ConfigError(f"{path} is not an executable file.")
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _tables:
            return _tables[key]
        stored = _stored(key)
    entries = stored if stored is not None else _read(path)
    table = Table.of(entries, str(path)) if entries else DEFAULT
    with _lock:
        _tables[key] = table
        if stored is None:
            _keep(key, entries)
    return table


def _read(path: Path) -> list[Entry]:
    """The entries of the binary's --help; [] when they are the generated table's."""
    try:
        proc = subprocess.run([str(path), "--help"], capture_output=True, timeout=HELP_TIMEOUT,
                              check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"{path} --help cannot be run ({e}).") from None
    entries = parse_help(proc.stdout[:HELP_MAX].decode("utf-8", errors="replace"))
    if not entries:
        raise ConfigError(f"{path} --help lists no options; is it llama-server?")
    if Table.of(entries, str(path)).spellings() == DEFAULT.spellings():
        return []
    return entries


def _load_store() -> dict[str, Any]:
    data = read_json(_store, "llama-server's flags", STORE_MAX)  # it only saves a --help run
    if not isinstance(data, dict) or data.get("version") != STORE_VERSION:
        return {}
    try:
        return dict(data["binaries"])
    except (KeyError, TypeError, ValueError):
        return {}


def _stored(key: tuple[str, int, int, int]) -> list[Entry] | None:
    """What the store says the binary's --help gave, if it is unchanged since."""
    try:
        stat, entries = _load_store()[key[0]]
        if list(stat) != list(key[1:]):
            return None
        return [(tuple(spellings), tuple(negated), kind, env)
                for spellings, negated, kind, env in entries]
    except (KeyError, ValueError, TypeError):
        return None


def _keep(key: tuple[str, int, int, int], entries: list[Entry]) -> None:
    if _store is None:
        return
    binaries = _load_store()
    binaries[key[0]] = [list(key[1:]), entries]
    write_json(_store, {"version": STORE_VERSION, "binaries": binaries}, "llama-server's flags")
