"""KV caches kept across swaps (kv-cache = yes), on real systemd with the real Gemma model.

llamad runs here in the shipped unit's sandbox (root without capabilities, other users'
files seen as nobody's, the file system read-only but its state directory), and the model
units as dynamic users: the cache directory has to work for both.

Gemma 3 uses sliding-window attention, so the units get --swa-full (presets.run_settings).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from typing import Any

import aiohttp
import pytest
import rig
from helpers.daemon import Factory, Llamad, models, wait_http, wait_state

# About 250 tokens: long enough that a re-prefill is plain in prompt_n, short enough for a
# busy 2-core machine.
PREFIX = "".join(f"Note {i}: the lighthouse keeper counted {i * 7} ships passing the "
                 f"northern cape before the storm of year {1800 + i}.\n" for i in range(12))
PROMPT = PREFIX + "The keeper wrote in his log that"


@pytest.fixture
def kv_llamad(llamad_factory: Factory) -> Factory:
    """llamad in the shipped unit's sandbox, KV caches kept, one model loaded at a time."""
    def make(names: list[str], **settings: Any) -> Llamad:
        return llamad_factory(names, sandbox=True,
                              **{"kv-cache": "yes", "models-max": 1, **settings})
    return make


async def complete(s: aiohttp.ClientSession, d: Llamad, model: str,
                   prompt: str = PROMPT) -> dict[str, Any]:
    """llama-server's own /completion, greedy: its answer says how much prompt it computed."""
    body = {"model": model, "prompt": prompt, "n_predict": 12, "temperature": 0,
            "cache_prompt": True}
    async with s.post(d.url + "/completion", json=body) as r:
        assert r.status == 200, f"{await r.text()}; llamad's log:\n{d.log()[-3000:]}"
        out: dict[str, Any] = await r.json()
        return out


def kv(d: Llamad, model: str) -> dict[str, int]:
    fields: dict[str, int] = models(d.url)[model]["llamad"]["kv_cache"]
    return fields


def saved(d: Llamad, model: str) -> dict[str, int]:
    """The model's kv_cache figures once its save is on disk (indexed)."""
    try:
        return rig.wait_for(f"{model}'s KV cache on disk",
                            lambda: (lambda f: f if f["stored_tokens"] else None)(kv(d, model)))
    except TimeoutError as e:
        raise TimeoutError(f"{e}: {kv(d, model)}; llamad's log:\n{d.log()[-3000:]}") from None


def index(d: Llamad) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(
        (d.dir / "state" / "kv" / "index.json").read_text())["entries"]
    return entries


async def swap_out(s: aiohttp.ClientSession, d: Llamad, model: str, other: str) -> None:
    """Load `other`, which evicts `model` (models-max = 1), and wait until it is stopped."""
    await complete(s, d, other, "Hello")
    wait_state(d.url, model, "unloaded")


async def test_answer_after_swap_and_restore_equals_the_answer_without_a_swap(
        kv_llamad: Factory) -> None:
    a, b = "kv-same-a", "kv-same-b"
    d = kv_llamad([a, b])
    async with aiohttp.ClientSession() as s:
        first = await complete(s, d, a)
        again = await complete(s, d, a)  # no swap: llama-server reuses its own cache
        assert again["timings"]["prompt_n"] < 5, again["timings"]
        await swap_out(s, d, a, b)
        f = saved(d, a)
        assert f["saved_tokens"] >= first["timings"]["prompt_n"] > 100, (f, first["timings"])
        restored = await complete(s, d, a)
    print(f"\nprefill {first['timings']['prompt_n']} tokens in "
          f"{first['timings']['prompt_ms']:.0f} ms; after the swap and restore "
          f"{restored['timings']['prompt_n']} tokens in {restored['timings']['prompt_ms']:.0f} ms")
    assert restored["content"] == again["content"], (restored["content"], again["content"])
    assert restored["timings"]["prompt_n"] < 5, restored["timings"]
    f = kv(d, a)
    assert f["restored_tokens"] == f["saved_tokens"] > 100, f
    assert "--swa-full" in models(d.url)[a]["status"]["args"]
    unit = f"llama-server@{a}.service"
    assert str(d.dir / "state" / "kv" / a) in d.show(unit, "BindPaths")
    with urllib.request.urlopen(d.url + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert f'llamad_kv_cache_restored_tokens_total{{model="{a}"}} {f["restored_tokens"]}.0' \
        in metrics, [line for line in metrics.splitlines() if "kv_cache" in line]
    # Only root reaches the files; the model's dynamic user may add files but not list them.
    assert (d.dir / "state" / "kv").stat().st_mode & 0o777 == 0o700
    assert (d.dir / "state" / "kv" / a).stat().st_mode & 0o777 == 0o733


async def test_a_changed_file_or_changed_arguments_restore_nothing(kv_llamad: Factory) -> None:
    a, b = "kv-changed-a", "kv-changed-b"
    d = kv_llamad([a, b])
    async with aiohttp.ClientSession() as s:
        await complete(s, d, a)
        await swap_out(s, d, a, b)
        saved(d, a)
        # A new file under the same name (a new inode, as an update writes it).
        path = d.models_dir / f"{a}.gguf"
        created = models(d.url)[a]["created"]
        shutil.copyfile(path, path.with_suffix(".new"))
        os.utime(path.with_suffix(".new"), (0, created + 5))
        path.with_suffix(".new").replace(path)
        rig.wait_for("the catalog to see the new file",
                     lambda: models(d.url)[a]["created"] != created)
        after_file = await complete(s, d, a)
        assert after_file["timings"]["prompt_n"] > 100, after_file["timings"]
        assert "its file or arguments changed since its KV cache was saved" in d.log()
        assert kv(d, a)["restored_tokens"] == 0

        await swap_out(s, d, a, b)
        saved(d, a)
        d.stop()
        d.config.write_text(d.config.read_text().replace("-t 1", "-t 1 --temp 0.5"))
        d.start()
        wait_http(d.url)
    async with aiohttp.ClientSession() as s:  # a new one: the old llamad's connections closed
        after_args = await complete(s, d, a)
        assert after_args["timings"]["prompt_n"] > 100, after_args["timings"]
        assert kv(d, a)["restored_tokens"] == 0


async def test_disk_bound_drops_the_oldest(kv_llamad: Factory) -> None:
    a, b = "kv-bound-a", "kv-bound-b"
    # One save of the prompt is about 6.3 MiB (--swa-full, 1,024-token slots), two are
    # not within 10.
    d = kv_llamad([a, b], **{"kv-cache-max-mb": 10})
    async with aiohttp.ClientSession() as s:
        await complete(s, d, a)
        await complete(s, d, b)  # evicts a: saved
        saved(d, a)
        await complete(s, d, a, PREFIX + "Another question:")  # evicts b: saved, a's dropped
        saved(d, b)
        rig.wait_for("a's save to be dropped", lambda: kv(d, a)["stored_tokens"] == 0)
    files = [p for p in (d.dir / "state" / "kv").rglob("*.bin")]
    on_disk = sum(p.stat().st_size for p in files)
    print(f"\n{len(files)} file(s), {on_disk / 2**20:.2f} MiB on disk, bound 10 MiB")
    assert 0 < on_disk <= 10 * 2**20
    assert {e["model"] for e in index(d)} == {b}
    assert "the oldest, to stay within kv-cache-max-mb" in d.log()


async def test_a_corrupt_cache_file_is_ignored_with_a_log_line(kv_llamad: Factory) -> None:
    a, b = "kv-corrupt-a", "kv-corrupt-b"
    d = kv_llamad([a, b])
    async with aiohttp.ClientSession() as s:
        await complete(s, d, a)
        await swap_out(s, d, a, b)
        saved(d, a)
        (entry,) = index(d)
        path = d.dir / "state" / "kv" / entry["dir"] / entry["file"]
        # Past the tokens, in the cache itself: llama-server alone would load it.
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            f.write(b"\x7f" * 4096)
        again = await complete(s, d, a)
    assert again["timings"]["prompt_n"] > 100, again["timings"]
    assert "does not match its checksum (corrupt)" in d.log()
    assert not path.exists() and kv(d, a)["restored_tokens"] == 0
    assert models(d.url)[a]["llamad"]["state"] == "ready"

