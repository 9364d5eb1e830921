"""KV caches kept across swaps, checked against the real llama-server on the host (no
systemd): whether a restore took is judged before the model serves (kvprobe.py), never
on a request that went to another slot or sent the restored slot an unrelated prompt."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import rig
from helpers import ggufgen
from helpers.llamaserver import complete_tokens, started
from helpers.supervised import Rig

from llamad.catalog.catalog import scan
from llamad.config import Config
from llamad.sizes import MIB
from llamad.supervisor import backend as be
from llamad.supervisor.events import Cause, Change, State
from llamad.supervisor.guards import kvcache, kvpolicy, kvstore
from llamad.supervisor.guards.kvcache import KvCache, dir_name

MODEL = "plain"
# Token ids (the generated vocabulary has no words): a conversation worth restoring, and a
# longer, unrelated one whose first token differs.
CONVERSATION = [1] + [3 + (i * 7) % 1000 for i in range(300)]
UNRELATED = [2] + [5 + (i * 13) % 900 for i in range(400)]

pytestmark = pytest.mark.skipif(not rig.LLAMA_SERVER.exists(), reason="no llama-server")


@pytest.fixture
async def kv_rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """A supervisor whose one model is a small llama without a sliding window (kv-cache =
    auto keeps its cache), on systemd faked; llama-server is started by each test."""
    path = ggufgen.write_llama(tmp_path / "models" / f"{MODEL}.gguf", embd=256, ff=1024,
                               heads=4, heads_kv=2, head_dim=64, blocks=4, context=4096)
    os.utime(path, (0, 0))  # older than the catalog's settle window
    config = Config.default(models_dirs=(tmp_path / "models",), models_preset=None,
                            llama_cache=False, llama_server=rig.LLAMA_SERVER,
                            state_dir=tmp_path / "state", memory_reserve_mb=0)
    r = Rig(config)
    yield r
    await r.close()


def server_args(kv: KvCache) -> tuple[str, ...]:
    """Two slots, writing to the model's cache directory as its unit would."""
    assert kv.store is not None
    save = kv.store.model_dir(dir_name(MODEL))
    return ("-c", "4096", "-np", "2", "-t", "1", "--metrics", "--slot-save-path", f"{save}/")


async def checked(kv: KvCache) -> None:
    """Until the checks request_ended began have run."""
    await asyncio.wait_for(asyncio.gather(*kv._checks), 30)


async def save_conversation(kv_rig: Rig) -> None:
    """The model's slot 0 holds CONVERSATION and is saved as an eviction saves it."""
    kv, model = kv_rig.sup.kv, kv_rig.slot(MODEL).model
    assert kv.why_not(model) is None
    with started(*server_args(kv), model=model.shards[0]) as server:
        server.wait_ready()
        backend = be.Backend(f"tcp:127.0.0.1:{server.port}")
        await kv.restore(model, backend)  # nothing saved yet: only noted as ready
        complete_tokens(server.url, CONVERSATION, id_slot=0)
        kv.on_change(Change(MODEL, State.READY, State.STOPPING, Cause.EVICT_COUNT,
                            at=time.time()))
        await kv.save(model)
        await kv.close()  # checksummed and indexed
        await backend.close()
    assert kv.stored[MODEL][0] == len(CONVERSATION)


@contextlib.asynccontextmanager
async def restored(kv_rig: Rig) -> AsyncIterator[str]:
    """A new llama-server for the model, its saved slot restored; its URL."""
    kv, model = kv_rig.sup.kv, kv_rig.slot(MODEL).model
    with started(*server_args(kv), model=model.shards[0]) as server:
        server.wait_ready()
        backend = be.Backend(f"tcp:127.0.0.1:{server.port}")
        before = kv.figures[MODEL].restored_tokens
        await kv.restore(model, backend)
        await backend.close()
        assert kv.figures[MODEL].restored_tokens - before == len(CONVERSATION)
        yield server.url


async def test_a_request_on_another_slot_does_not_fail_the_restore(kv_rig: Rig) -> None:
    kv, slot = kv_rig.sup.kv, kv_rig.slot(MODEL)
    await save_conversation(kv_rig)
    async with restored(kv_rig) as url:
        # Another client's longer conversation comes first: llama-server gives it the
        # other, empty slot. It computes all of it and takes nothing from any cache...
        other = complete_tokens(url, UNRELATED)
        assert other["id_slot"] == 1 and other["timings"]["prompt_n"] == len(UNRELATED)
        kv.request_ended(slot)
        await checked(kv)
        # ...which says nothing about the restored slot.
        assert kv.figures[MODEL].restores_failed == 0
        assert kv.why_not(slot.model) is None and kv.stored[MODEL][0] == len(CONVERSATION)
        # The conversation itself continues from the restored slot: the restore took.
        again = complete_tokens(url, [*CONVERSATION, 7, 8])
        assert again["id_slot"] == 0 and again["timings"]["prompt_n"] <= 4, again["timings"]
        kv.request_ended(slot)
        await checked(kv)
        assert kv.figures[MODEL].restores_verified == 1
        assert kv.figures[MODEL].restores_failed == 0


async def test_a_short_request_on_the_restored_slot_says_nothing_against_it(
        kv_rig: Rig) -> None:
    kv, slot = kv_rig.sup.kv, kv_rig.slot(MODEL)
    await save_conversation(kv_rig)
    async with restored(kv_rig) as url:
        # Probed before the model serves (kvprobe.py): the restore took.
        assert kv.figures[MODEL].restores_verified == 1
        # A short request on the restored slot, then a longer unrelated one: neither is
        # a restore that did not take (tests/test_kv_round2.py has one that is).
        complete_tokens(url, [9, 9, 9], id_slot=0)
        kv.request_ended(slot)
        await checked(kv)
        out = complete_tokens(url, UNRELATED, id_slot=0)
        assert out["timings"]["prompt_n"] == len(UNRELATED)
        kv.request_ended(slot)
        await checked(kv)
    assert kv.figures[MODEL].restores_failed == 0 and kv.why_not(slot.model) is None


def test_a_model_named_as_the_index_gets_a_directory_of_its_own(tmp_path: Path) -> None:
    """A model file index.json.gguf is model `index.json`: its unit must not get the index
    of every model's saved caches as its save directory."""
    path = ggufgen.write_model(tmp_path / "models" / f"{kvstore.INDEX}.gguf")
    os.utime(path, (0, 0))
    config = Config.default(models_dirs=(tmp_path / "models",), models_preset=None,
                            llama_cache=False, llama_server=rig.LLAMA_SERVER,
                            state_dir=tmp_path / "state", kv_cache="yes")
    model = scan(config).models[kvstore.INDEX]
    store = kvstore.Store(config.state_dir / "kv", MIB)
    store.open()
    parts = kvcache.unit_parts(config, model)
    assert parts is not None
    assert Path(parts.bind[0]) == store.model_dir(kvcache.dir_name(model.id))
    assert Path(parts.bind[0]).is_dir() and parts.bind[0] != str(store.root / kvstore.INDEX)
    store.learn("a", kvpolicy.Rates(prefill=0.001))  # the index is still written
    assert (store.root / kvstore.INDEX).is_file()
