"""Beyond one machine, measured on loopback (issue #15): a model over a llama.cpp RPC worker
against the same model served locally, and HAProxy in front of two llamad hosts.

Run: .venv/bin/python -m bench.multihost [--rounds N] [--only rpc|haproxy]

Boxes play the machines, each on a loopback address of its own (tests/rig.py): llamad on
127.0.0.2 (and 127.0.0.3 for HAProxy's second host), the shipped llamad-rpc-worker unit on
127.0.0.4. Writes bench/rpc.md and bench/haproxy.md, which `python -m bench` appends to
docs/benchmarks.md; docs/scaling.md quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import rig
from llamad_fixture import Llamad, models, wait_http, wait_state
from rpcworker import RpcWorker

HERE = Path(__file__).parent
MIB = 1024**2
ARGS = "-c 4096 -np 4 -t 1"  # the tests' arguments; the worker runs one thread too
PROMPT = "Summarise the history of the printing press in Europe. " * 20
GENERATE = 128


async def completion(url: str, model: str, max_tokens: int,
                     prompt: str = "Hi") -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "cache_prompt": False}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as s, \
            s.post(url + "/v1/completions", json=body) as r:
        data: dict[str, Any] = await r.json()
        assert r.status == 200, data
        return data


def unload(d: Llamad, model: str) -> None:
    if models(d.url)[model]["llamad"]["state"] != "unloaded":
        d.box.run(["curl", "-sf", "-H", "Content-Type: application/json", "-d",
                   f'{{"model": "{model}"}}', d.url + "/models/unload"])
        wait_state(d.url, model, "unloaded", timeout=120)


def rss(d: Llamad, model: str) -> tuple[int, int]:
    """(VmRSS, VmHWM) of the model's llama-server."""
    pid = d.show(f"llama-server@{model}.service", "MainPID")
    status = d.box.run(["cat", f"/proc/{pid}/status"]).stdout
    found = {k: int(v.split()[0]) * 1024 for k, _, v in
             (line.partition(":") for line in status.splitlines()) if k in ("VmRSS", "VmHWM")}
    return found["VmRSS"], found["VmHWM"]


def one_model(d: Llamad, model: str, worker: RpcWorker | None) -> dict[str, float]:
    unload(d, model)
    worker_before = worker.rss() if worker else 0
    t = time.perf_counter()
    asyncio.run(completion(d.url, model, 1))
    cold = time.perf_counter() - t
    load = float(models(d.url)[model]["llamad"]["load_seconds"])
    gen = asyncio.run(completion(d.url, model, GENERATE, PROMPT))["timings"]
    now, peak = rss(d, model)
    return {"cold": cold, "load": load, "gen": gen["predicted_per_second"],
            "prompt": gen["prompt_per_second"], "prompt_n": gen["prompt_n"],
            "rss": now, "peak": peak, "need": models(d.url)[model]["llamad"]["need"]["ram"],
            "worker": (worker.rss() - worker_before) if worker else 0}


def rpc_section(rounds: int) -> str:
    with rig.Box() as box, rig.Box() as wbox:
        assets = rig.Assets(box.workdir)
        worker = RpcWorker(wbox, host="127.0.0.4")
        worker.start()
        d = Llamad(box, assets, ["local", "remote"],
                   preset=f"[remote]\nrpc = {worker.address}\n", host="127.0.0.2",
                   args=ARGS)
        d.start()
        try:
            wait_http(d.url)
            runs: dict[str, list[dict[str, float]]] = {"local": [], "remote": []}
            for r in range(rounds):
                order = ("local", "remote") if r % 2 == 0 else ("remote", "local")
                for model in order:
                    runs[model].append(one_model(d, model, worker if model == "remote" else None))
                    unload(d, model)
        finally:
            d.cleanup()
            worker.stop()
    return _rpc_table(runs, rounds)


def _rpc_table(runs: dict[str, list[dict[str, float]]], rounds: int) -> str:
    def med(model: str, key: str, scale: float = 1.0) -> float:
        return statistics.median(x[key] for x in runs[model]) / scale

    rows = []
    for model, label in (("local", "local llama-server"),
                         ("remote", "llama-server + 1 RPC worker")):
        rows.append(
            f"| {label} | {med(model, 'load'):.2f} s | {med(model, 'cold'):.2f} s | "
            f"{med(model, 'prompt'):.1f} | {med(model, 'gen'):.1f} | "
            f"{med(model, 'rss', MIB):.0f} / {med(model, 'peak', MIB):.0f} MiB | "
            f"{med(model, 'need', MIB):.0f} MiB | "
            + (f"{med(model, 'worker', MIB):.0f} MiB |" if model == "remote" else "- |"))
    ratio = med("remote", "gen") / med("local", "gen")
    return "\n".join([
        "## A model over a llama.cpp RPC worker (bench/multihost.py)", "",
        f"Gemma 3 270M Q4_K_M, `{ARGS}`, through llamad on 127.0.0.2; once served by its "
        "own llama-server, once with `rpc = 127.0.0.4:PORT` (the shipped "
        "llamad-rpc-worker unit in a second box, `--threads 1`). Medians of "
        f"{rounds} rounds, alternating which goes first; each round unloads the model, "
        f"times a 1-token request from cold, then generates {GENERATE} tokens after a "
        f"{int(runs['local'][0]['prompt_n'])}-token prompt (llama-server's own timings).",
        "",
        "| served by | load | cold request | prompt tokens/s | generated tokens/s | "
        "llama-server RSS now / peak | llamad's need | worker RSS added |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        f"Generation over the worker: {ratio:.2f}x local. Load average at the end: "
        f"{os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs).", ""])


SECTIONS: dict[str, Callable[[int], str]] = {"rpc": rpc_section}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", choices=sorted(SECTIONS))
    opts = ap.parse_args()
    for name, section in SECTIONS.items():
        if opts.only in (None, name):
            text = section(opts.rounds)
            (HERE / f"{name}.md").write_text(text)
            print(text)


if __name__ == "__main__":
    main()
