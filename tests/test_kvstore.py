"""The KV cache store against what a model unit may leave in its directory (it writes
there): llamad hashes only regular files, never follows a link, never blocks."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from llamad.supervisor.guards.kvstore import MODEL_DIR_MODE, Entry, Store


def _entry(name: str) -> Entry:
    return Entry(model="m", dir="m", file=name, key="k", slot=0, tokens=1)


def test_links_and_fifos_from_a_model_are_not_followed(tmp_path: Path) -> None:
    store = Store(tmp_path / "kv", max_bytes=1 << 30)
    store.open()
    d = store.model_dir("m")
    assert d.stat().st_mode & 0o777 == MODEL_DIR_MODE
    (d / "good.bin").write_bytes(b"x" * 1000)
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only")
    os.symlink("/dev/zero", d / "zero.bin")  # read through, it would never end
    os.symlink(secret, d / "secret.bin")
    os.mkfifo(d / "fifo.bin")  # opened plainly, it would block until a writer comes
    files = ["good.bin", "zero.bin", "secret.bin", "fifo.bin"]
    dropped: list[list[Entry]] = []
    # A daemon thread: before the fix, add() never returned (reading /dev/zero).
    adding = threading.Thread(target=lambda: dropped.append(store.add(map(_entry, files))),
                              daemon=True)
    adding.start()
    adding.join(timeout=30)
    assert dropped == [[]], "add() did not return"
    kept = {e.file: e for e in store.entries("m")}
    assert set(kept) == {"good.bin"} and kept["good.bin"].bytes == 1000
    assert sorted(p.name for p in d.iterdir()) == ["good.bin"]  # the others removed
    assert secret.read_bytes() == b"root only"
    assert store.verify(kept["good.bin"]) is None
    os.unlink(d / "good.bin")
    os.symlink(secret, d / "good.bin")
    assert "cannot be read" in (store.verify(kept["good.bin"]) or "")
