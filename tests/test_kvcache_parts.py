"""KV caches kept across swaps: the store on a real directory, the identity a cache is kept
for, the --swa-full decision and the unit's bind mount. The save and restore themselves,
with the real llama-server, are in tests/integration/test_kvcache.py."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from unittest import mock

from helpers import ggufgen

from llamad.catalog.catalog import scan
from llamad.config import Config
from llamad.supervisor.guards import kvcache, kvpolicy, kvstore
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
    on = scan(model_config(tmp_path, kv_cache="yes")).models
    off = scan(model_config(tmp_path, kv_cache="no")).models
    assert "--swa-full" in on["swa"].settings.args
    assert "--swa-full" not in on["plain"].settings.args
    assert "--swa-full" not in off["swa"].settings.args


def test_the_identity_changes_with_the_file_and_the_arguments(tmp_path: Path) -> None:
    config = model_config(tmp_path, kv_cache="yes")
    model = scan(config).models["plain"]
    key = kvstore.identity(config, model)
    assert kvstore.identity(config, model) == key
    other_args = scan(model_config(tmp_path, kv_cache="yes", args=("-c", "512"))).models["plain"]
    assert kvstore.identity(config, other_args) != key
    path = model.shards[0]
    path.with_suffix(".new").write_bytes(path.read_bytes())
    path.with_suffix(".new").replace(path)  # the same bytes, a new file
    assert kvstore.identity(config, model) != key


def test_the_unit_gets_its_own_cache_directory_and_nothing_else(tmp_path: Path) -> None:
    config = model_config(tmp_path, kv_cache="yes")
    model = scan(config).models["plain"]
    spec = build(config, model, "/run/llamad/plain/llama.sock", (), None)
    props = {name: value for name, _, value in transient_properties(spec)}
    inside = "/run/llamad/plain/kv"
    assert ("--slot-save-path", inside) in zip(spec.argv, spec.argv[1:], strict=False)
    host = str(tmp_path / "state" / "kv" / "plain")
    writable = [p for p in props["BindPaths"] if p[0] != p[1]]
    assert writable == [(host, inside, True, 0)]
    assert "llamad/plain/kv" in props["RuntimeDirectory"]
    off = build(model_config(tmp_path, kv_cache="no"), model, "/run/llamad/plain/llama.sock",
                (), None)
    assert "--slot-save-path" not in off.argv and off.binds == ()


# -- kv-cache = auto: which models, which slots (kvpolicy) ---------------------------

class NoGpus:
    """What kvpolicy asks of the memory measurement: no GPU here."""

    def gpu_list(self) -> tuple[()]:
        return ()


def test_auto_keeps_plain_models_and_swa_ones_only_where_swa_full_fits(tmp_path: Path) -> None:
    roomy = model_config(tmp_path, kv_cache="auto")
    fits = kvpolicy.swa_full_fits(roomy, NoGpus())  # type: ignore[arg-type]
    models = scan(roomy, swa_fits=fits).models
    assert "--swa-full" in models["swa"].settings.args
    assert "--swa-full" not in models["plain"].settings.args
    for m in models.values():
        assert kvpolicy.why_not_kept(roomy, m, fits) is None, m.id
    # A budget below what the larger cache needs: no flag, and the listing says why.
    tight = model_config(tmp_path, kv_cache="auto", memory_budget_mb=1)
    fits = kvpolicy.swa_full_fits(tight, NoGpus())  # type: ignore[arg-type]
    models = scan(tight, swa_fits=fits).models
    assert "--swa-full" not in models["swa"].settings.args
    why = kvpolicy.why_not_kept(tight, models["swa"], fits)
    assert why is not None and "sliding window" in why and "GiB llamad plans with" in why
    assert kvcache.unit_parts(tight, models["swa"]) is None
    assert kvpolicy.why_not_kept(tight, models["plain"], fits) is None
    # Without a memory plan (no swa_fits) auto gives no flag; yes always does.
    assert "--swa-full" not in scan(roomy).models["swa"].settings.args
    no = model_config(tmp_path, kv_cache="no")
    assert kvpolicy.why_not_kept(no, scan(no).models["plain"], None) == "kv-cache = no"


def test_a_model_with_a_projector_keeps_no_cache(tmp_path: Path) -> None:
    config = model_config(tmp_path, kv_cache="auto")
    for path in (ggufgen.write_model(tmp_path / "models" / "vis" / "vis.gguf"),
                 ggufgen.write_mmproj(tmp_path / "models" / "vis" / "mmproj-vis.gguf")):
        os.utime(path, (0, 0))
    model = scan(config).models["vis"]
    assert model.mmproj is not None
    why = kvpolicy.why_not_kept(config, model, None)
    assert why is not None and "projector" in why
    assert kvcache.unit_parts(config, model) is None


def test_a_slot_is_saved_only_where_restoring_beats_recomputing() -> None:
    # 0.4 ms a token to recompute; 2 KiB a token on disk, read at 1 GB/s.
    rates = kvpolicy.Rates(prefill=0.0004, restore=1e-9, bytes_per_token=2048)
    assert kvpolicy.worth_saving(rates, 1500) is None
    small = kvpolicy.worth_saving(rates, 2)
    assert small is not None and "recomputing its 2 tokens takes about 0.8 ms" in small
    # The fixed cost of a restore decides the break-even: 10 ms / 0.4 ms = 25 tokens.
    assert kvpolicy.worth_saving(rates, 24) is not None
    assert kvpolicy.worth_saving(rates, 26) is None
    # A slow disk moves it: 1 s per MB makes 2 KiB a token cost more than its prefill.
    assert kvpolicy.worth_saving(kvpolicy.Rates(0.0004, 1e-6, None, 2048), 1500) is not None
    # Before the first restore the save's rate stands in; before any prefill, save.
    assert kvpolicy.worth_saving(kvpolicy.Rates(0.0004, None, 1e-6, 2048), 1500) is not None
    assert kvpolicy.worth_saving(kvpolicy.Rates(), 1) is None


def test_restores_are_judged_from_llama_servers_prompt_counters() -> None:
    text = ("# HELP llamacpp:prompt_tokens_total x\nllamacpp:prompt_tokens_total 1504\n"
            "llamacpp:prompt_tokens_cached_total 0\nllamacpp:prompt_seconds_total 0.5\n"
            "llamacpp:tokens_predicted_total 1\n")
    c = kvpolicy.counters(text)
    assert c == kvpolicy.Counters(processed=1504, cached=0, seconds=0.5)
    assert kvpolicy.counters("llamacpp:prompt_tokens_total 3\n") is None
    zero = kvpolicy.Counters(0, 0, 0)
    assert kvpolicy.restore_took(zero, kvpolicy.Counters(3, 1501, 0.1), 1501) is True
    assert kvpolicy.restore_took(zero, kvpolicy.Counters(1504, 0, 0.5), 1501) is False
    # A short unrelated prompt says nothing either way; neither does no request.
    assert kvpolicy.restore_took(zero, kvpolicy.Counters(20, 0, 0.01), 1501) is None
    assert kvpolicy.restore_took(zero, zero, 1501) is None


def test_the_disk_budget_is_a_tenth_of_the_free_space_unless_set(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    budget = kvpolicy.disk_budget(model_config(tmp_path), tmp_path)
    assert abs(budget - free // 10) <= free // 1000
    assert kvpolicy.disk_budget(model_config(tmp_path, kv_cache_max_mb=5), tmp_path) == 5 * MIB


def test_learned_rates_and_broken_builds_survive_a_restart(tmp_path: Path) -> None:
    store = Store(tmp_path / "kv", MIB)
    store.open()
    rates = store.rates("a")
    rates.prefill, rates.broken = 0.001, ["k1"]
    store.learn("a", rates)
    again = Store(tmp_path / "kv", MIB)
    again.open()
    assert again.rates("a") == rates and again.broken() == {"a": {"k1"}}
    assert again.rates("b") == kvpolicy.Rates()


def test_saves_and_rates_of_models_gone_from_the_catalog_are_dropped(tmp_path: Path) -> None:
    """A model removed or renamed left its saves on disk (and in /metrics) until other
    saves pushed them out, and its learned rates for good."""
    store = Store(tmp_path / "kv", 100 * MIB)
    store.open()
    a, gone = saved(store, "a", 0, 1000, 1.0), saved(store, "gone", 0, 1000, 2.0)
    store.add([a, gone])
    for model in ("a", "gone"):
        store.learn(model, kvpolicy.Rates(prefill=0.001))
    assert store.keep_only({"a", "b"}) == [dataclasses.replace(gone, sha256=mock.ANY)]
    assert set(store.usage()) == {"a"} and store.path(a).exists()
    assert not store.path(gone).exists()
    again = Store(tmp_path / "kv", 100 * MIB)
    again.open()
    assert [e.model for e in again.entries("a")] == ["a"] and not again.entries("gone")
    assert again.rates("gone") == kvpolicy.Rates() and again.rates("a").prefill == 0.001
    assert store.keep_only({"a"}) == []
