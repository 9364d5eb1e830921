"""A conversation across a swap, with and without its KV cache kept (kv-cache, issue #16).

Run: .venv/bin/python -m bench.kvswap [--rounds N] [--prefix-tokens N] [--out FILE]

Two llamads in one box, taking turns (one runs at a time), the same model file under
other names, the same arguments (`--swa-full` for both, so the only difference is saving
and restoring): `kept` has kv-cache = yes, `plain` kv-cache = no; models-max = 1 in both.
Each round, for each llamad in turn (the order alternates):

1. turn 1 on A: a prefix of about 2,000 tokens and a question (A loads, prefills);
2. swap to B: a 1-token request to B, which evicts A (kept: saving A's slot first);
3. swap back: an explicit load of A, waited for until ready (kept: restoring first);
4. turn 2 on A: turn 1, its answer and a new question, streamed: the time to its first
   token, and llama-server's own count and time of the prompt it processed.

Writes bench/kvswap.md, which `python -m bench` appends to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import rig
from helpers.daemon import Llamad, wait_http, wait_state

OUT = Path(__file__).with_name("kvswap.md")
ARGS = "-c 4096 -np 1 -t 2 --swa-full"
SAVED = re.compile(r"saved (\d+) cached tokens \(([\d.]+) MiB\) in ([\d.]+)s")


def prefix(lines: int, salt: int = 0) -> str:
    """About 30 tokens a line; `salt` makes each round's prefix its own from the first
    token on, so that no round finds the previous one's cache."""
    return f"Harbour log {salt}.\n" + "".join(
        f"Entry {i}: the harbour log lists {i * 3 % 97} crates of tea, "
        f"{i * 7 % 89} barrels of salt and {i % 13} passengers on day {i}.\n"
        for i in range(lines))


async def tokens(s: aiohttp.ClientSession, url: str, model: str, text: str) -> int:
    async with s.post(url + "/tokenize", json={"model": model, "content": text}) as r:
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
    """Ends with A unloaded (kept: its last turn saved; the next round's prefix differs)."""
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
            "save": float(saves[-1][2]) if saves else None,
            "save_mib": float(saves[-1][1]) if saves else None}


def med(rows: list[dict[str, Any]], key: str, sub: str | None = None) -> float:
    values = [(r[key][sub] if sub else r[key]) for r in rows]
    return float(statistics.median(v for v in values if v is not None))


def markdown(res: dict[str, list[dict[str, Any]]], n_prefix: int, rounds: int) -> str:
    kept, plain = res["kept"], res["plain"]
    ttft_k, ttft_p = med(kept, "second", "ttft"), med(plain, "second", "ttft")
    swap_k, swap_p = med(kept, "swap"), med(plain, "swap")
    save = med(kept, "save")
    rows = []
    for label, r in (("kv-cache = yes (restored)", kept), ("kv-cache = no (re-prefill)", plain)):
        rows.append(
            f"| {label} | {med(r, 'first', 'prompt_n'):.0f} tok, "
            f"{med(r, 'first', 'prompt_ms') / 1000:.2f} s | {med(r, 'swap'):.2f} s | "
            f"{med(r, 'back'):.2f} s | {med(r, 'second', 'prompt_n'):.0f} tok, "
            f"{med(r, 'second', 'prompt_ms') / 1000:.2f} s | **{med(r, 'second', 'ttft'):.2f} s** "
            f"| {med(r, 'back') + med(r, 'second', 'ttft'):.2f} s |")
    pairs = list(zip(kept, plain, strict=True))
    same = all(k["second"]["text"] == p["second"]["text"] for k, p in pairs)
    per_round = ", ".join(f"{k['second']['ttft']:.2f} vs {p['second']['ttft']:.2f} s "
                          f"({k['second']['ttft'] / p['second']['ttft']:.1%})" for k, p in pairs)
    # The save is timed by llamad itself (its log line); the difference of the swaps'
    # medians is shown too, but on a busy machine it is mostly the noise of loading B.
    ratio, added = ttft_k / ttft_p, save / swap_p
    return "\n".join([
        "## A conversation across a swap: KV cache kept (bench/kvswap.py)", "",
        f"Gemma 3 270M, `{ARGS}` in both llamads (one with kv-cache = yes, one with no), "
        f"models-max = 1. Turn 1 on A: a {n_prefix}-token prefix and a question; swap to B "
        "(a 1-token request that evicts A); explicit load of A until ready; turn 2 on A "
        "(turn 1, its answer, a new question), streamed. Medians of "
        f"{rounds} rounds, the two llamads alternating.", "",
        "| | turn 1 prompt | swap to B | load A again | turn 2 prompt processed "
        "| turn 2 time to first token | load + first token |",
        "|---|---|---|---|---|---|---|", *rows, "",
        "| Goal | Measured | Met |", "|---|---|---|",
        f"| time to first token after the swap back ≤ 25% of the re-prefill | "
        f"{ttft_k:.2f} s vs {ttft_p:.2f} s: {ratio:.1%} | {'yes' if ratio <= 0.25 else '**no**'} |",
        f"| saving adds ≤ 10% to the swap | the save {save:.3f} s "
        f"({med(kept, 'save_mib'):.1f} MiB) = {added:.1%} of a swap without it "
        f"({swap_p:.2f} s); swaps' medians {swap_k:.2f} s vs {swap_p:.2f} s | "
        f"{'yes' if added <= 0.10 else '**no**'} |", "",
        f"Turn 2's time to first token by round, restored vs re-prefilled: {per_round}. "
        "The machine is shared: the same 2,077-token prefill took 10 to 52 s across runs, "
        "so compare within a round. "
        f"Turn 2's answer the same with and without restore in every round: "
        f"{'yes' if same else '**no**'}. Load average at the end: "
        f"{os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs).", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefix-tokens", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=OUT)
    opts = ap.parse_args()
    res: dict[str, list[dict[str, Any]]] = {"kept": [], "plain": []}
    with rig.booted() as (box, assets):
        names = {"kept": ("kept-a", "kept-b"), "plain": ("plain-a", "plain-b")}
        ds = {k: Llamad(box, assets, list(names[k]), **{"args": ARGS, "models-max": 1,
                                                        "kv-cache": "yes" if k == "kept"
                                                        else "no"}) for k in names}
        try:
            # One llamad at a time: each stops model units it does not know as stale.
            d = ds["kept"]
            d.start()
            wait_http(d.url)
            lines, n = opts.prefix_tokens // 40, 0
            while n < opts.prefix_tokens:
                lines += 1
                n = asyncio.run(tokens_of(d.url, "kept-a", prefix(lines)))
            d.cleanup()
            for i in range(opts.rounds):
                order = ("kept", "plain") if i % 2 == 0 else ("plain", "kept")
                for k in order:
                    d = ds[k]
                    d.start()
                    wait_http(d.url)
                    r = asyncio.run(one_round(d, names[k], prefix(lines, i)))
                    d.cleanup()
                    print(k, json.dumps(r))
                    res[k].append(r)
        finally:
            for d in ds.values():
                d.cleanup()
    out = markdown(res, n, opts.rounds)
    opts.out.write_text(out)
    print(out)


async def tokens_of(url: str, model: str, text: str) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        return await tokens(s, url, model, text)


if __name__ == "__main__":
    main()
