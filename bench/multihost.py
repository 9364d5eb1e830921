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
from helpers.daemon import Llamad, models, wait_http, wait_state
from helpers.fleet import Haproxy, Traffic, ask, join
from helpers.rpcworker import RpcWorker

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


GRACE = 3.0  # shutdown-grace of the HAProxy hosts


async def latencies(url: str, n: int) -> list[float]:
    """Seconds of `n` small chat requests for the model "a", one after another."""
    async with aiohttp.ClientSession() as s:
        out = []
        for _ in range(n):
            sent = await ask(s, url, "a")
            assert sent.status == 200, sent
            out.append(sent.took)
        return out


async def hop(direct: str, through: str, n: int, path: str = "") -> list[float]:
    """Per pair of requests, one straight to llamad and one through HAProxy, taken in
    turn (the machine's load changes less within a pair): HAProxy's extra seconds.
    `path` "": a 2-token chat; else a GET of that path (the proxy hop alone)."""
    async def one(s: aiohttp.ClientSession, url: str) -> float:
        if not path:
            return (await ask(s, url, "a")).took
        began = time.perf_counter()
        async with s.get(url + path) as r:
            await r.read()
        return time.perf_counter() - began
    async with aiohttp.ClientSession() as s:
        return [await one(s, through) - await one(s, direct) for _ in range(n)]


async def one_request(url: str) -> str:
    """Which host answered a request for "a"."""
    async with aiohttp.ClientSession() as s:
        return (await ask(s, url, "a")).host


def listing_time(url: str, query: str = "", n: int = 10) -> float:
    async def go() -> float:
        async with aiohttp.ClientSession() as s:
            began = time.perf_counter()
            for _ in range(n):
                async with s.get(url + "/v1/models" + query) as r:
                    await r.read()
            return (time.perf_counter() - began) / n
    return asyncio.run(go())


def failover(lb: Haproxy, gone: Llamad, other: Llamad, how: str) -> dict[str, float]:
    """Requests for "a" (2 clients) while its host goes away, as
    tests/integration/test_haproxy_fleet.py does; then the host is back and so is "a"."""
    there = f"{other.host}:{other.port}"
    unload(other, "a")  # so that every round's failover includes loading it there
    with Traffic(lb.url, "a") as traffic:
        rig.wait_for("requests", lambda: len(traffic.sent) >= 4, timeout=60)
        began = time.monotonic()
        signal = ["stop", "--no-block"] if how == "stop" else ["kill", "--signal=SIGKILL"]
        gone.box.run(["systemctl", *signal, gone.unit])
        rig.wait_for("the other host", lambda: traffic.served_by(there, began) >= 5,
                     timeout=120)
    after = [x for x in traffic.sent if x.at + x.took >= began]  # ended after
    first = min(x.at + x.took for x in after if x.host == there) - began
    load = float(models(other.url)["a"]["llamad"]["load_seconds"])
    gone.stop()
    gone.start()
    wait_http(gone.url)
    home = f"{gone.host}:{gone.port}"
    rig.wait_for("a back on its host", lambda: asyncio.run(one_request(lb.url)) == home,
                 timeout=60)
    return {"failed": len(traffic.failed()), "sent": len(after), "first": first,
            "slowest": max(x.took for x in after), "load": load}


def haproxy_section(rounds: int) -> str:
    with rig.Box() as box1, rig.Box() as box2:
        one = Llamad(box1, rig.Assets(box1.workdir), ["a", "b"], host="127.0.0.2", args=ARGS)
        two = Llamad(box2, rig.Assets(box2.workdir), ["a", "b"], host="127.0.0.3", args=ARGS)
        try:
            join([one, two], GRACE)
            with Haproxy(box1.workdir, [one, two], {"a": one, "b": two}) as lb:
                asyncio.run(latencies(lb.url, 3))  # loads "a" on its host
                direct = asyncio.run(latencies(one.url, 20 * rounds))
                extra = {"chat": asyncio.run(hop(one.url, lb.url, 20 * rounds)),
                         "health": asyncio.run(hop(one.url, lb.url, 100 * rounds, "/health"))}
                lists = {"alone": listing_time(one.url, "?peers=no"),
                         "fleet": listing_time(one.url)}
                runs = {how: [failover(lb, one, two, how) for _ in range(rounds)]
                        for how in ("stop", "kill")}
        finally:
            for d in (one, two):
                d.cleanup()
    return _haproxy_table(direct, extra, lists, runs, rounds)


def _haproxy_table(direct: list[float], extra: dict[str, list[float]], lists: dict[str, float],
                   runs: dict[str, list[dict[str, float]]], rounds: int) -> str:
    def med(xs: list[float]) -> float:
        return statistics.median(xs) * 1000

    rows = [f"| {how} | {sum(r['failed'] for r in rs)} of {sum(r['sent'] for r in rs)} | "
            f"{statistics.median(r['first'] for r in rs):.2f} s | "
            f"{statistics.median(r['slowest'] for r in rs):.2f} s | "
            f"{statistics.median(r['load'] for r in rs):.2f} s |"
            for how, rs in (("SIGTERM (systemctl stop), shutdown-grace 3 s", runs["stop"]),
                            ("SIGKILL (a crash)", runs["kill"]))]
    return "\n".join([
        "## HAProxy in front of two llamad hosts (bench/multihost.py)", "",
        "llamad on 127.0.0.2 and 127.0.0.3 (a box each, peers of each other), HAProxy 2.6 "
        "on 127.0.0.1 with `llamad haproxy-config` (checks every 1 s, down after 2), "
        f"Gemma 3 270M, `{ARGS}`, 2-token chat requests.", "",
        "HAProxy's hop, medians of requests sent in turn straight to llamad and through "
        f"HAProxy: {med(extra['health']):+.2f} ms on GET /health "
        f"({len(extra['health'])} pairs), {med(extra['chat']):+.1f} ms on a 2-token chat "
        f"({len(extra['chat'])} pairs; the chat itself {med(direct):.0f} ms). "
        f"GET /v1/models: {lists['alone'] * 1000:.1f} ms for one host's 2 models, "
        f"{lists['fleet'] * 1000:.1f} ms with its peer's (`peers`).", "",
        f"Failover, {rounds} rounds each: two clients send requests for the model while its "
        "host goes away, until the other host has answered five; medians of the rounds, "
        "times from the signal.", "",
        "| the host's llamad gets | failed requests | first answer from the other host "
        "| slowest request | the model's load there |",
        "|---|---|---|---|---|", *rows, "",
        f"Load average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs).", ""])


SECTIONS: dict[str, Callable[[int], str]] = {"rpc": rpc_section, "haproxy": haproxy_section}


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
