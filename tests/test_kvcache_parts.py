"""KV caches kept across swaps: the store on a real directory, the identity a cache is kept
for, the --swa-full decision and the unit's bind mount. The save and restore themselves,
with the real llama-server, are in tests/integration/test_kvcache.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

from helpers import ggufgen

from llamad.catalog.catalog import scan
from llamad.config import Config
from llamad.supervisor.guards import kvcache
from llamad.supervisor.guards.kvstore import Entry, Store
from llamad.supervisor.unitspec import build
from llamad.systemd.units import transient_properties

MIB = 1024 * 1024


def saved(store: Store, model: str, slot: int, size: int, at: float, key: str = "k") -> Entry:
    """A file as llama-server writes it into the model's directory, not yet indexed."""
    d = store.model_dir(model)
    name = f"{int(at * 1e6)}-{slot}.bin"
    (d / name).write_bytes(os.urandom(size))
    return Entry(model, model, name, key, slot, tokens=size // 100, bytes=size, at=at)


def test_the_disk_bound_drops_the_oldest_first(tmp_path: Path) -> None:
    store = Store(tmp_path / "kv", 3 * MIB)
    store.open()
    now = time.time()
    assert store.add([saved(store, "a", 0, MIB, now - 30)]) == []
    assert store.add([saved(store, "b", 0, MIB, now - 20)]) == []
    over = store.add([saved(store, "c", 0, 2 * MIB, now - 10)])
    assert [e.model for e in over] == ["a"]
    assert not store.path(over[0]).exists()
    assert set(store.usage()) == {"b", "c"}
    assert sum(size for _, size in store.usage().values()) <= 3 * MIB


def test_a_new_save_replaces_the_slot_and_every_save_under_another_key(tmp_path: Path) -> None:
    store = Store(tmp_path / "kv", 100 * MIB)
    store.open()
    old = saved(store, "a", 0, 1000, 1.0, key="old")
    other_slot = saved(store, "a", 1, 1000, 2.0, key="old")
    store.add([old, other_slot])
    new = saved(store, "a", 0, 1000, 3.0, key="new")
    store.add([new])
    assert [(e.slot, e.key) for e in store.entries("a")] == [(0, "new")]
    assert not store.path(old).exists() and not store.path(other_slot).exists()


def test_a_corrupt_file_fails_its_checksum_and_strays_go_on_open(tmp_path: Path) -> None:
    store = Store(tmp_path / "kv", 100 * MIB)
    store.open()
    store.add([saved(store, "a", 0, 5000, 1.0)])
    (e,) = store.entries("a")
    assert store.verify(e) is None
    with open(store.path(e), "r+b") as f:
        f.seek(2500)
        f.write(b"\0" * 16)
    assert store.verify(e) == "does not match its checksum (corrupt)"
    stray = saved(store, "a", 1, 100, 2.0)  # a save cut off before it was indexed
    again = Store(tmp_path / "kv", 100 * MIB)
    again.open()
    assert again.entries("a") == [e]
    assert not again.path(stray).exists()
    assert (tmp_path / "kv").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "kv" / "a").stat().st_mode & 0o777 == 0o733


def model_config(tmp_path: Path, **kw: object) -> Config:
    models = tmp_path / "models"
    ggufgen.write_model(models / "plain.gguf")
    ggufgen.write_model(models / "swa.gguf", arch="gemma3",
                        extra={"gemma3.attention.sliding_window": 512})
    then = time.time() - 60
    for p in models.iterdir():
        os.utime(p, (then, then))
    server = tmp_path / "llama-server"
    server.write_text("#!/bin/sh\n")
    return Config.default(models_dirs=(models,), models_preset=None, llama_cache=False,
                          llama_server=server, state_dir=tmp_path / "state", **kw)


def test_swa_full_only_for_sliding_window_models_with_kv_cache_on(tmp_path: Path) -> None:
    on = scan(model_config(tmp_path, kv_cache=True)).models
    off = scan(model_config(tmp_path, kv_cache=False)).models
    assert "--swa-full" in on["swa"].settings.args
    assert "--swa-full" not in on["plain"].settings.args
    assert "--swa-full" not in off["swa"].settings.args


def test_the_identity_changes_with_the_file_and_the_arguments(tmp_path: Path) -> None:
    config = model_config(tmp_path, kv_cache=True)
    model = scan(config).models["plain"]
    key = kvcache.identity(config, model)
    assert kvcache.identity(config, model) == key
    other_args = scan(model_config(tmp_path, kv_cache=True, args=("-c", "512"))).models["plain"]
    assert kvcache.identity(config, other_args) != key
    path = model.shards[0]
    path.with_suffix(".new").write_bytes(path.read_bytes())
    path.with_suffix(".new").replace(path)  # the same bytes, a new file
    assert kvcache.identity(config, model) != key


def test_the_unit_gets_its_own_cache_directory_and_nothing_else(tmp_path: Path) -> None:
    config = model_config(tmp_path, kv_cache=True)
    model = scan(config).models["plain"]
    spec = build(config, model, "/run/llamad/plain/llama.sock", (), None)
    props = {name: value for name, _, value in transient_properties(spec)}
    inside = "/run/llamad/plain/kv"
    assert ("--slot-save-path", inside) in zip(spec.argv, spec.argv[1:], strict=False)
    host = str(tmp_path / "state" / "kv" / "plain")
    writable = [p for p in props["BindPaths"] if p[0] != p[1]]
    assert writable == [(host, inside, True, 0)]
    assert "llamad/plain/kv" in props["RuntimeDirectory"]
    off = build(model_config(tmp_path, kv_cache=False), model, "/run/llamad/plain/llama.sock",
                (), None)
    assert "--slot-save-path" not in off.argv and off.binds == ()
