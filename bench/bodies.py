"""Does llamad stay responsive while big request bodies arrive? /health latency while ten
32 MiB JSON bodies are posted at once, round after round, and llamad's peak memory.

Run: .venv/bin/python -m bench.bodies [--rounds N] [--source DIR] [--out FILE]

Five bodies carry a 32 MiB string (a long document), five a 32 MiB array of numbers (the
shape that costs most as Python objects). They name an unknown model, so llamad reads and
checks each one and answers 404: nothing but llamad is measured. A separate process asks
/health every 20 ms over one keep-alive connection. `--source` runs the llamad package
found in DIR instead (e.g. an export of an older commit), for a before/after comparison.
Writes bench/bodies.md, which `python -m bench` appends to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import rig
from helpers.daemon import PYTHON, Llamad, wait_http

OUT = Path(__file__).with_name("bodies.md")
BODY = 32 * 1024 * 1024 - 4096  # just under the default max-body-mb
CONCURRENT = 10
PROBE_EVERY = 0.02


def bodies() -> list[bytes]:
    text = json.dumps({"model": "no-such-model", "messages": [
        {"role": "user", "content": "word " * (BODY // 5 - 40)}]}).encode()
    # "1000000, " is 9 bytes.
    numbers = json.dumps({"model": "no-such-model",
                          "input": list(range(10**6, 10**6 + BODY // 9 - 20))}).encode()
    assert BODY - 1024 < len(text) <= BODY and BODY - 1024 < len(numbers) <= BODY
    return [text, numbers]


def probe(url: str, stop: Any, out: Any) -> None:
    """In its own process: /health latencies (ms) until `stop` is set."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    lat = []
    while not stop.is_set():
        t = time.perf_counter()
        conn.request("GET", "/health")
        conn.getresponse().read()
        lat.append((time.perf_counter() - t) * 1000)
        time.sleep(PROBE_EVERY)
    out.put(lat)


async def rounds(url: str, n: int) -> tuple[list[int], list[float]]:
    kinds = bodies()
    statuses, took = [], []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async def post(body: bytes) -> int:
            async with s.post(url + "/v1/chat/completions", data=body,
                              headers={"Content-Type": "application/json"}) as r:
                await r.read()
                return r.status
        for _ in range(n):
            t = time.perf_counter()
            statuses += await asyncio.gather(*(post(kinds[i % 2]) for i in range(CONCURRENT)))
            took.append(time.perf_counter() - t)
    return statuses, took


def probed(url: str, work: Any) -> list[float]:
    """/health latencies while `work()` runs."""
    stop, out = mp.Event(), mp.Queue()
    prober = mp.Process(target=probe, args=(url, stop, out))
    prober.start()
    work()
    stop.set()
    lat: list[float] = out.get(timeout=120)
    prober.join()
    return lat


def peak_rss(d: Llamad) -> int:
    pid = d.show(d.unit, "MainPID")
    status = d.box.run(["cat", f"/proc/{pid}/status"]).stdout
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure(box: rig.Box, assets: rig.Assets, n: int, source: Path | None,
            **settings: Any) -> dict[str, Any]:
    d = Llamad(box, assets, ["gemma-a"], **settings)
    if source is not None:
        # The venv's editable install would win over PYTHONPATH: drop its finder.
        d.command = [str(PYTHON), "-c", "import runpy, sys; sys.meta_path[:] = [f for f in "
                     "sys.meta_path if '__editable__' not in type(f).__module__]; "
                     f"sys.path.insert(0, {str(source)!r}); "
                     "runpy.run_module('llamad', run_name='__main__', alter_sys=True)"]
    d.start()
    try:
        wait_http(d.url)
        idle = peak_rss(d)
        quiet = probed(d.url, lambda: time.sleep(5))  # the machine's own noise
        result: dict[str, Any] = {}
        lat = probed(d.url, lambda: result.update(zip(("statuses", "rounds"),
                                                      asyncio.run(rounds(d.url, n)),
                                                      strict=True)))
        return {"statuses": sorted(set(result["statuses"])), "rounds": result["rounds"],
                "health": lat, "quiet": quiet, "idle": idle, "peak": peak_rss(d)}
    finally:
        d.cleanup()


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def markdown(r: dict[str, Any], label: str) -> str:
    h, q = r["health"], r["quiet"]
    return (f"| {label} | {statistics.median(q):.1f} / {pct(q, 99):.1f} ms | {len(h)} | "
            f"{statistics.median(h):.1f} ms | {pct(h, 99):.1f} ms | "
            f"{max(h):.0f} ms | {statistics.median(r['rounds']):.1f} s | "
            f"{r['idle'] / 2**20:.0f} MiB | {r['peak'] / 2**20:.0f} MiB | "
            f"{', '.join(map(str, r['statuses']))} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--source", type=Path, help="run the llamad package in this directory")
    ap.add_argument("--before", type=Path, help="also measure the llamad package in this "
                    "directory, as the 'before' row")
    ap.add_argument("--out", type=Path, default=OUT)
    opts = ap.parse_args()
    rows = []
    with rig.booted() as (box, assets):
        if opts.before:
            rows.append(markdown(measure(box, assets, opts.rounds, opts.before), "before"))
        rows.append(markdown(measure(box, assets, opts.rounds, opts.source,
                                     **{"max-bodies-mb": 512}), "llamad"))
    text = "\n".join([
        "## Big request bodies (bench/bodies.py)", "",
        f"/health latency (a separate process, every {PROBE_EVERY * 1000:.0f} ms) while "
        f"{CONCURRENT} bodies of 32 MiB are posted at once, {opts.rounds} rounds (half a "
        "32 MiB string, half a 32 MiB array of numbers; unknown model, so llamad reads, "
        "checks and answers 404). Goal: p99 <= 50 ms. `max-bodies-mb = 512` so that all "
        "ten are read; with the default 256, two of ten get 503 at once.", "",
        "| llamad | no bodies: p50 / p99 | probes | p50 | p99 | max | round of 10 | idle RSS "
        "| peak RSS | answers |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"Load average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs); other "
        "jobs on the machine show in the 'no bodies' column.", ""])
    opts.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
