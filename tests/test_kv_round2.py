"""Whether a restored KV cache took is told before the model serves, against the real
llama-server on the host (no systemd): a client's own request on the restored slot (an
unrelated prompt, `cache_prompt: false`) never turns KV caches off, and a restore that
really does not take is caught before any request pays for it."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import rig
from helpers import ggufgen
from helpers.llamaserver import complete_tokens, started
from helpers.supervised import Rig

from llamad.config import Config
from llamad.supervisor import backend as be
from llamad.supervisor.events import Cause, Change, State
from llamad.supervisor.guards import kvcache, kvprobe, kvstore
from llamad.supervisor.guards.kvcache import KvCache, dir_name

# Token ids of a generated vocabulary: a conversation, and an unrelated, longer prompt.
CONVERSATION = [1] + [3 + (i * 7) % 1000 for i in range(300)]
UNRELATED = [2] + [5 + (i * 13) % 900 for i in range(400)]

pytestmark = pytest.mark.skipif(not rig.LLAMA_SERVER.exists(), reason="no llama-server")


@pytest.fixture
async def kv_rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """A supervisor with two small llamas on systemd faked: `plain`, and `swa`, whose
    sliding window gets --swa-full from kv-cache = yes. Each test starts llama-server."""
    models = tmp_path / "models"
    shape: dict[str, Any] = {"embd": 256, "ff": 1024, "heads": 4, "head_dim": 64,
                             "blocks": 4, "context": 4096}
    os.utime(ggufgen.write_llama(models / "plain.gguf", heads_kv=2, **shape), (0, 0))
    os.utime(ggufgen.write_llama(models / "swa.gguf", heads_kv=4, arch="olmo2",
                                 sliding_window=64, **shape), (0, 0))
    config = Config.default(models_dirs=(models,), models_preset=None, llama_cache=False,
                            llama_server=rig.LLAMA_SERVER, state_dir=tmp_path / "state",
                            memory_reserve_mb=0, kv_cache="yes", kv_cache_timeout=30)
    r = Rig(config)
    yield r
    await r.close()


def server_args(kv: KvCache, model: str, *extra: str) -> tuple[str, ...]:
    assert kv.store is not None
    save = kv.store.model_dir(dir_name(model))
    return ("-c", "4096", "-np", "1", "-t", "1", "--metrics", "--slot-save-path", f"{save}/",
            *extra)


async def save_conversation(kv_rig: Rig, name: str, *extra: str,
                            conversation: list[int] = CONVERSATION) -> None:
    """The model's slot 0 holds `conversation` and is saved as an eviction saves it."""
    kv, model = kv_rig.sup.kv, kv_rig.slot(name).model
    assert kv.why_not(model) is None
    with started(*server_args(kv, name, *extra), model=model.shards[0]) as server:
        server.wait_ready()
        backend = be.Backend(f"tcp:127.0.0.1:{server.port}")
        await kv.restore(model, backend)
        complete_tokens(server.url, conversation)
        kv.on_change(Change(name, State.READY, State.STOPPING, Cause.EVICT_COUNT,
                            at=time.time()))
        await kv.save(model)
        await kv.close()
        await backend.close()
    assert kv.stored[name][0] == len(conversation)


async def restore_then(kv_rig: Rig, name: str, prompt: list[int], *extra: str,
                       **body: Any) -> dict[str, Any]:
    """A new llama-server for the model, its saved slot restored, then one request: its
    timings, once what that request tells has been checked."""
    kv, slot = kv_rig.sup.kv, kv_rig.slot(name)
    with started(*server_args(kv, name, *extra), model=slot.model.shards[0]) as server:
        server.wait_ready()
        backend = be.Backend(f"tcp:127.0.0.1:{server.port}")
        await kv.restore(slot.model, backend)
        await backend.close()
        out = complete_tokens(server.url, prompt, **body)
        kv.request_ended(slot)
        for task in list(kv._checks):
            await task
    timings: dict[str, Any] = out["timings"]
    return timings


@pytest.mark.parametrize("prompt,body", [(UNRELATED, {}),
                                         ([*CONVERSATION, 7, 8], {"cache_prompt": False})])
async def test_a_clients_own_request_never_fails_a_restore_that_took(
        kv_rig: Rig, prompt: list[int], body: dict[str, Any]) -> None:
    """A restored slot that computes a whole prompt again because its client asked for
    something else (another conversation; no cache) says nothing against the restore."""
    kv = kv_rig.sup.kv
    await save_conversation(kv_rig, "plain")
    timings = await restore_then(kv_rig, "plain", prompt, **body)
    assert timings["cache_n"] == 0 and timings["prompt_n"] >= len(CONVERSATION)
    assert kv.figures["plain"].restores_failed == 0
    assert kv.figures["plain"].restores_verified == 1
    assert kv.why_not(kv_rig.slot("plain").model) is None
    assert kv.stored["plain"][0] == len(CONVERSATION)


async def test_a_restore_that_does_not_take_is_caught_before_the_first_request(
        kv_rig: Rig) -> None:
    """A sliding-window cache restored where llama-server does not reuse it (here: its
    process run without --swa-full) fails open at once: the first request does not wait
    for a cache that cannot help, and no cache is kept for that build again."""
    kv = kv_rig.sup.kv
    swa = kv_rig.slot("swa").model
    await save_conversation(kv_rig, "swa", "--swa-full")
    kv_rig_failed = kv.figures["swa"].restores_failed
    with started(*server_args(kv, "swa"), model=swa.shards[0]) as server:
        server.wait_ready()
        backend = be.Backend(f"tcp:127.0.0.1:{server.port}")
        await kv.restore(swa, backend)
        await backend.close()
        assert kv.figures["swa"].restores_failed == kv_rig_failed + 1  # before any request
        # The probe computed the conversation again: its next turn reuses that.
        again = complete_tokens(server.url, [*CONVERSATION, 7, 8])
        assert again["timings"]["prompt_n"] <= 3, again["timings"]
    assert kv.why_not(swa) == kvcache.BROKEN and "swa" not in kv.stored


def test_the_tokens_of_a_slot_file_are_read_from_its_header(tmp_path: Path) -> None:
    """The probe's prompt: what llama-server packed (tokens, then a media count), a bare
    token list from older builds, nothing from media, another format or a short file."""
    def file(words: list[int], magic: int = kvprobe.MAGIC) -> Path:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.bin"
        head = [magic, kvprobe.VERSION, len(words)]
        path.write_bytes(b"".join(w.to_bytes(4, "little", signed=w < 0)
                                  for w in [*head, *words]) + b"state")
        return path
    assert kvprobe.saved_tokens(file([-1, 1, 3, 10, 11, 12, 0])) == [10, 11, 12]
    assert kvprobe.saved_tokens(file([10, 11, 12])) == [10, 11, 12]
    assert kvprobe.saved_tokens(file([-1, 1, 2, 10, 11, 1, 1])) is None  # media
    assert kvprobe.saved_tokens(file([-1, 1, 9, 10])) is None  # count past the end
    assert kvprobe.saved_tokens(file([10, 11], magic=0x1234)) is None
    short = tmp_path / "short.bin"
    short.write_bytes(b"ggsq")
    assert kvprobe.saved_tokens(short) is None


async def test_a_save_drops_the_saves_of_models_no_longer_in_the_catalog(
        kv_rig: Rig) -> None:
    """Saves of a model removed or renamed were kept (disk, /metrics) until other saves
    pushed them out: the next save drops them."""
    kv = kv_rig.sup.kv
    assert kv.store is not None
    orphan = kv.store.model_dir("gone") / "1-0.bin"
    orphan.write_bytes(b"\0" * 1000)
    kv.store.add([kvstore.Entry("gone", "gone", orphan.name, "k", 0, tokens=10, at=1.0)])
    assert kv.store.usage()["gone"] == (10, 1000)
    await save_conversation(kv_rig, "plain")
    assert set(kv.stored) == {"plain"} and not orphan.exists()


async def test_a_small_restore_is_not_worth_a_probe(kv_rig: Rig) -> None:
    """A probe costs the load 30-50 ms: a restore of fewer than kvprobe.MIN_TOKENS is not
    probed, nor judged by the requests after it (which cannot tell)."""
    kv = kv_rig.sup.kv
    short = CONVERSATION[:kvprobe.MIN_TOKENS - 10]
    await save_conversation(kv_rig, "plain", conversation=short)
    timings = await restore_then(kv_rig, "plain", UNRELATED)
    assert timings["cache_n"] == 0
    figures = kv.figures["plain"]
    assert (figures.restored_tokens, figures.restores_verified, figures.restores_failed) == (
        len(short), 0, 0)
    assert kv.why_not(kv_rig.slot("plain").model) is None
