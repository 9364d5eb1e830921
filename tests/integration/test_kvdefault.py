"""KV caches kept by default (kv-cache = auto), on real systemd with the real llama-server.

The model that keeps its cache is a small llama without a sliding window (ggufgen.write_llama:
its weights are zeros, its buffers and its prefill are real); prompts are token ids, since
its vocabulary has no spaces. The Gemma test model is the other one, which evicts it
(models-max = 1).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
import urllib.request
from typing import Any

import aiohttp
import pytest
import rig
from helpers import ggufgen
from helpers.daemon import Factory, Llamad, models, state, wait_http, wait_state
from helpers.watch import eventually

# About 1,500 tokens: its prefill takes hundreds of ms even for this small model, its
# restore a few.
CONVERSATION = [1] + [3 + (i * 7) % 1000 for i in range(1500)]
SMALL = [1, 5]  # two tokens: recomputed faster than any restore


@pytest.fixture
def kv_default(llamad_factory: Factory) -> Factory:
    """A llamad with the default kv-cache setting and the small llama `plain` besides the
    Gemma models `names`."""
    def make(plain: str, names: list[str], preset: str = "") -> Llamad:
        d = llamad_factory(names, preset, start=False,
                           **{"models-max": 1, "args": "-c 4096 -np 2 -t 1"})
        path = ggufgen.write_llama(d.models_dir / f"{plain}.gguf", embd=256, ff=1024,
                                   heads=4, heads_kv=2, head_dim=64, blocks=4, context=4096)
        os.utime(path, (0, 0))  # older than the catalog's settle window
        d.start()
        wait_http(d.url)
        return d
    return make


async def complete(s: aiohttp.ClientSession, d: Llamad, model: str, prompt: Any,
                   **extra: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "n_predict": 1, "temperature": 0,
            "cache_prompt": True, **extra}
    async with s.post(d.url + "/completion", json=body) as r:
        assert r.status == 200, f"{await r.text()}; llamad's log:\n{d.log()[-3000:]}"
        out: dict[str, Any] = await r.json()
        return out


def kv(d: Llamad, model: str) -> dict[str, Any]:
    fields: dict[str, Any] = models(d.url)[model]["llamad"]["kv_cache"]
    return fields


def metrics(d: Llamad) -> str:
    with urllib.request.urlopen(d.url + "/metrics", timeout=10) as r:
        return str(r.read().decode())


def index(d: Llamad) -> dict[str, Any]:
    found: dict[str, Any] = json.loads((d.dir / "state" / "kv" / "index.json").read_text())
    return found


def stored(d: Llamad, model: str) -> dict[str, Any]:
    try:
        return rig.wait_for(f"{model}'s KV cache on disk",
                            lambda: (lambda f: f if f["stored_tokens"] else None)(kv(d, model)))
    except TimeoutError as e:
        raise TimeoutError(f"{e}: {kv(d, model)}; llamad's log:\n{d.log()[-3000:]}") from None


async def until(s: aiohttp.ClientSession, d: Llamad, model: str, test: Any, what: str,
                timeout: float = 60) -> None:
    """Poll GET /v1/models without blocking the event loop (requests of this test are in
    flight on it) until `test` holds for the model's entry."""
    async def holds() -> bool:
        async with s.get(d.url + "/v1/models") as r:
            entry = {m["id"]: m for m in (await r.json())["data"]}[model]
        return bool(test(entry))
    await eventually(what, holds, timeout=timeout, every=0.05)


async def swap_out(s: aiohttp.ClientSession, d: Llamad, model: str, other: str) -> None:
    await complete(s, d, other, "Hello")
    wait_state(d.url, model, "unloaded")


async def test_default_config_restores_a_plain_models_conversation_not_a_small_slot(
        kv_default: Factory) -> None:
    a, b = "kvd-plain", "kvd-gemma"
    d = kv_default(a, [b])
    assert kv(d, a)["kept"] and kv(d, a)["why_not"] is None
    async with aiohttp.ClientSession() as s:
        first = await complete(s, d, a, CONVERSATION, id_slot=0)
        assert first["timings"]["prompt_n"] == len(CONVERSATION)
        await complete(s, d, a, SMALL, id_slot=1)
        await swap_out(s, d, a, b)
        f = stored(d, a)
        entries = [e for e in index(d)["entries"] if e["model"] == a]
        assert [(e["slot"], e["tokens"]) for e in entries] == [(0, len(CONVERSATION))], entries
        assert f["stored_tokens"] == len(CONVERSATION)
        assert "not saving slot 1's KV cache (2 tokens): recomputing its 2 tokens" in d.log()
        again = await complete(s, d, a, [*CONVERSATION, 7, 8, 9], id_slot=0)
    print(f"\nprefill {first['timings']['prompt_n']} tokens in "
          f"{first['timings']['prompt_ms']:.0f} ms; after the swap and restore "
          f"{again['timings']['prompt_n']} tokens in {again['timings']['prompt_ms']:.0f} ms; "
          f"learned {index(d)['rates'][a]}")
    assert again["timings"]["prompt_n"] <= 4, again["timings"]
    assert kv(d, a)["restored_tokens"] == len(CONVERSATION)
    took = f'llamad_kv_cache_restores_total{{model="{a}",outcome="took"}} 1.0'
    rig.wait_for("the restore to be checked", lambda: took in metrics(d))
    assert f'llamad_kv_cache_discarded_total{{model="{a}",reason="not_worth"}} 1.0' \
        in metrics(d)
    rates = index(d)["rates"][a]
    assert rates["prefill"] > 0 and rates["restore"] is not None and not rates["broken"]


def _spoil_positions(d: Llamad, model: str) -> None:
    """Move the positions of the cells the model's saved slot holds far past its tokens,
    and its checksum in the index to match (llamad is stopped): llama-server restores it,
    but finds no cache before the prompt's positions and computes it all again, as when a
    restore bug leaves the cache unusable."""
    path = d.dir / "state" / "kv" / "index.json"
    idx = json.loads(path.read_text())
    (entry,) = [e for e in idx["entries"] if e["model"] == model]
    file = d.dir / "state" / "kv" / entry["dir"] / entry["file"]
    data = bytearray(file.read_bytes())
    # llama_state_seq_save_file: magic, version, count, that many words of llama-server's
    # packed tokens; then the cache: streams, and in each its cells (position, how many
    # sequences, their ids) before their tensors.
    _, _, words = struct.unpack_from("<III", data)
    at = 12 + 4 * words
    (streams,) = struct.unpack_from("<I", data, at)
    at += 4
    for _ in range(streams):
        (cells,) = struct.unpack_from("<I", data, at)
        at += 4
        if cells:
            break
    assert cells == len(CONVERSATION), cells
    for _ in range(cells):
        pos, n_seq = struct.unpack_from("<iI", data, at)
        struct.pack_into("<i", data, at, pos + 100_000)
        at += 8 + 4 * n_seq
    file.write_bytes(bytes(data))
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    path.write_text(json.dumps(idx))


async def test_a_restore_that_does_not_take_is_detected_and_turns_restores_off(
        kv_default: Factory) -> None:
    a, b = "kvf-plain", "kvf-gemma"
    d = kv_default(a, [b])
    async with aiohttp.ClientSession() as s:
        await complete(s, d, a, CONVERSATION, id_slot=0)
        await swap_out(s, d, a, b)
        stored(d, a)
    d.stop()
    _spoil_positions(d, a)
    d.start()
    wait_http(d.url)
    async with aiohttp.ClientSession() as s:
        # Found out before the model serves (its saved prompt sent to the restored slot,
        # which computes it all again): the request after it finds that prompt computed.
        again = await complete(s, d, a, [*CONVERSATION, 7, 8, 9], id_slot=0)
        assert again["timings"]["prompt_n"] <= 4, again["timings"]
        assert kv(d, a)["restored_tokens"] == len(CONVERSATION)
        failed = f'llamad_kv_cache_restores_total{{model="{a}",outcome="failed"}} 1.0'
        rig.wait_for("the failed restore to be counted", lambda: failed in metrics(d))
        assert f"model {a}: the KV cache it restored did not take: {len(CONVERSATION)} " \
            "prompt tokens were computed again, none from the cache" in d.log()
        f = kv(d, a)
        assert not f["kept"] and "a restore did not take" in f["why_not"], f
        assert f["stored_tokens"] == 0, f
        assert index(d)["rates"][a]["broken"], index(d)["rates"]
        # Off from now on: the next swap saves nothing for it.
        seen = len(d.log())
        await swap_out(s, d, a, b)
    saves = [line for line in d.log()[seen:].splitlines() if f"model {a}: saved" in line]
    assert not saves, saves
    assert kv(d, a)["stored_tokens"] == 0


async def test_restore_yes_brings_a_model_back_once_there_is_room_but_after_waiting_requests(
        kv_default: Factory) -> None:
    a, big, c = "kvr-plain", "kvr-big", "kvr-c"
    d = kv_default(a, [big, c], preset=f"[{a}]\nrestore = true\n")
    async with aiohttp.ClientSession() as s:
        await complete(s, d, a, CONVERSATION, id_slot=0)
        await swap_out(s, d, a, big)  # evicted for models-max: wanted back
        stored(d, a)
        # A long answer keeps big busy while a request for c waits for it; when big
        # stops for c, that request goes first and a stays unloaded.
        long = asyncio.create_task(complete(s, d, big, "Once upon a time", n_predict=48,
                                            ignore_eos=True))
        await until(s, d, big, lambda m: m["llamad"]["in_flight"] > 0, "big to be busy")
        waiting = await complete(s, d, c, "Hello")
        assert waiting["timings"]["prompt_n"] > 0
        await long
        assert state(d.url, c) == "ready" and state(d.url, a) == "unloaded"
        assert d.starts(a) == 1
        assert f"loading model {a} again" not in d.log()
        # c leaves: nothing waits and a fits again, so it comes back with its cache.
        async with s.post(d.url + "/models/unload", json={"model": c}) as r:
            assert r.status == 200
        wait_state(d.url, a, "ready")
        assert f"loading model {a} again: the memory it was evicted for is free" in d.log()
        assert kv(d, a)["restored_tokens"] == len(CONVERSATION)
        again = await complete(s, d, a, [*CONVERSATION, 7, 8, 9], id_slot=0)
    assert again["timings"]["prompt_n"] <= 4, again["timings"]
    assert d.starts(a) == 2
