"""8. A conversation across a swap: the KV cache kept with default settings (issue #27).

Two more llamads in the box, one running at a time, the same Gemma file under other
names, models-max = 1, `-c 4096 -np 1 -t 1`:

- **llamad**: the defaults (kv-cache = auto: Gemma's sliding window gets --swa-full where it
  fits the memory plan, and a slot is saved where restoring beats recomputing it);
- **re-prefill**: kv-cache = no, with `--swa-full` given, so that both run the same model
  the same way and differ only in saving and restoring.

Each round, for each in turn (the order alternates):

1. turn 1 on A: a prefix of about 2,000 tokens and a question (A loads, prefills);
2. swap to B: a 1-token request to B, which evicts A (llamad: saving A's slot first);
3. swap back: an explicit load of A, waited for until ready (llamad: restoring first);
4. turn 2 on A: turn 1, its answer and a new question, streamed: the time to its first
   token, and llama-server's own count of the prompt tokens it processed.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from typing import TYPE_CHECKING, Any

import aiohttp
from helpers.daemon import Llamad, models, wait_http, wait_state

if TYPE_CHECKING:
    from bench.contenders import Setup
    from bench.sections import Counts, Results

ARGS = "-c 4096 -np 1 -t 1"
SAVED = re.compile(r"saved (\d+) cached tokens \(([\d.]+) MiB\) in ([\d.]+)s")
TTFT = "turn 2 time to first token"
SWAP_OUT = "swap to B (evicting A)"
SAVE = "saving A's slot (llamad's log)"
BASE = "re-prefill"


def prefix(lines: int, salt: int = 0) -> str:
    """About 30 tokens a line; `salt` makes each round's prefix its own from the first
    token on, so that no round finds the previous one's cache."""
    return f"Harbour log {salt}.\n" + "".join(
        f"Entry {i}: the harbour log lists {i * 3 % 97} crates of tea, "
        f"{i * 7 % 89} barrels of salt and {i % 13} passengers on day {i}.\n"
        for i in range(lines))


async def tokens(url: str, model: str, text: str) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s, \
            s.post(url + "/tokenize", json={"model": model, "content": text}) as r:
        assert r.status == 200, await r.text()
        return len((await r.json())["tokens"])


async def turn(s: aiohttp.ClientSession, url: str, model: str, prompt: str,
               n_predict: int) -> dict[str, Any]:
    """One streamed /completion, greedy: time to first token, the text, llama-server's timings."""
    body = {"model": model, "prompt": prompt, "n_predict": n_predict, "temperature": 0,
            "cache_prompt": True, "stream": True}
    started, first, text, timings = time.perf_counter(), 0.0, "", {}
    async with s.post(url + "/completion", json=body) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("content") and not first:
                first = time.perf_counter() - started
            text += event.get("content", "")
            timings = event.get("timings", timings)
    return {"ttft": first or time.perf_counter() - started, "text": text,
            "prompt_n": timings.get("prompt_n"), "prompt_ms": timings.get("prompt_ms")}


def post(url: str, path: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()


async def one_round(d: Llamad, names: tuple[str, str], text: str) -> dict[str, Any]:
    """Ends with A unloaded (llamad: its last turn saved; the next round's prefix differs)."""
    a, b = names
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        first_prompt = text + "Question: how many passengers came on day 5?\nAnswer:"
        first = await turn(s, d.url, a, first_prompt, 16)
        t = time.perf_counter()
        await turn(s, d.url, b, "Hello", 1)
        swap = time.perf_counter() - t
        saves = SAVED.findall(d.log())
        t = time.perf_counter()
        post(d.url, "/models/load", {"model": a})
        wait_state(d.url, a, "ready", timeout=300)
        back = time.perf_counter() - t
        second = await turn(s, d.url, a, first_prompt + first["text"] +
                            "\nQuestion: how many crates of tea on day 9?\nAnswer:", 16)
    post(d.url, "/models/unload", {"model": a})
    wait_state(d.url, a, "unloaded", timeout=120)
    return {"first": first, "swap": swap, "back": back, "second": second,
            "save": float(saves[-1][2]) if saves else None}


def section(setup: Setup, n: Counts, res: Results) -> None:
    from bench.sections import say
    say(f"8. a conversation across a swap, KV cache kept by default: {n.kv_rounds} rounds "
        f"of a {n.kv_tokens}-token prefix")
    names = {"llamad": ("kv-a", "kv-b"), BASE: ("prefill-a", "prefill-b")}
    settings = {"llamad": {"args": ARGS},
                BASE: {"args": ARGS + " --swa-full", "kv-cache": "no"}}
    ds = {k: Llamad(setup.box, setup.assets, list(names[k]),
                    **{"models-max": 1, **settings[k]}) for k in names}
    try:
        d = ds["llamad"]  # one llamad at a time: each stops units it does not know
        d.start()
        wait_http(d.url)
        kv = models(d.url)["kv-a"]
        res.notes.append(f"8: with the default settings Gemma's KV cache is kept: "
                         f"{kv['llamad']['kv_cache']['kept']}; its arguments "
                         f"{'include' if '--swa-full' in kv['status']['args'] else 'lack'} "
                         "--swa-full.")
        lines, found = n.kv_tokens // 40, 0
        while found < n.kv_tokens:
            lines += 1
            found = asyncio.run(tokens(d.url, "kv-a", prefix(lines)))
        d.cleanup()
        for i in range(n.kv_rounds):
            for k in ("llamad", BASE) if i % 2 == 0 else (BASE, "llamad"):
                d = ds[k]
                d.start()
                wait_http(d.url)
                r = asyncio.run(one_round(d, names[k], prefix(lines, i)))
                d.cleanup()
                record(res, k, r)
    finally:
        for d in ds.values():
            d.cleanup()


def record(res: Results, who: str, r: dict[str, Any]) -> None:
    res.add(8, "turn 1 prompt processed", who, "tok", r["first"]["prompt_n"] or 0)
    res.add(8, SWAP_OUT, who, "ms", r["swap"] * 1000)
    res.add(8, "load A again (restoring)", who, "ms", r["back"] * 1000)
    res.add(8, "turn 2 prompt processed", who, "tok", r["second"]["prompt_n"] or 0)
    res.add(8, TTFT, who, "ms", r["second"]["ttft"] * 1000)
    if who == "llamad" and r["save"] is not None:
        res.add(8, SAVE, who, "ms", r["save"] * 1000)
