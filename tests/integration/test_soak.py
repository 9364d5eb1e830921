"""A soak: random requests, streams, loads, unloads, evictions and backend crashes.

500 steps; no request may be lost, and at the end llamad's open descriptors, its RSS (over
the second half) and the model units are flat, with no failed unit and no llama-server
process outside a unit.
The steps are random with a logged seed; replay a run with LLAMAD_SOAK_SEED=<seed>.
Deselect it while iterating with `-m 'not soak'`.

Loading Gemma costs seconds where a request costs a fraction of one, so the mix keeps loads
(crashes, evictions, unloads) to about one step in ten: 500 steps take about 5 minutes on
an idle 2-core box. The duration is reported, not asserted (docs/reliability.md has it).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
import rig
from helpers.daemon import Factory, Llamad, chat, models, stream, tracebacks

pytestmark = pytest.mark.soak

STEPS = 500
MODELS = ("gemma-a", "gemma-b", "gemma-c")
# Per thousand steps.
WEIGHTS = {"chat": 680, "stream": 100, "burst": 100, "keep-alive-0": 10, "load": 30,
           "unload": 20, "crash": 25, "crash-mid-stream": 10, "evict": 15}
SETTLED = ("unloaded", "ready")


class Soak:
    def __init__(self, d: Llamad, s: aiohttp.ClientSession, rnd: random.Random) -> None:
        self.d, self.s, self.rnd = d, s, rnd
        self.sent = self.lost = self.faults = 0
        self.lost_detail: list[str] = []

    def model(self) -> str:
        # Mostly two models, so that most requests find theirs loaded (models-max 2).
        return self.rnd.choices(MODELS, weights=(50, 48, 2))[0]

    async def chat(self, model: str, **extra: Any) -> None:
        self.sent += 1
        status, body = await chat(self.s, self.d.url, model, max_tokens=1, **extra)
        if status != 200:
            self.lose(f"chat {model}: {status} {body}")

    def lose(self, what: str) -> None:
        self.lost += 1
        self.lost_detail.append(what)

    async def step(self, action: str) -> None:
        model = self.model()
        if action == "chat":
            await self.chat(model)
        elif action == "keep-alive-0":
            await self.chat(model, keep_alive=0)
        elif action == "burst":
            await asyncio.gather(*(self.chat(self.model()) for _ in range(4)))
        elif action == "stream":
            self.sent += 1
            events = await stream(self.s, self.d.url, model, max_tokens=4)
            if events[-1] != {"done": True}:
                self.lose(f"stream {model}: {events[-1]}")
        elif action in ("load", "unload"):
            model = self.rnd.choice(MODELS)
            async with self.s.post(f"{self.d.url}/models/{action}", json={"model": model}) as r:
                if r.status != 200:
                    self.lose(f"{action} {model}: {r.status} {await r.text()}")
        elif action == "evict":  # the model no request named lately makes room for another
            await self.chat(MODELS[2])
        elif action == "crash":
            self.kill(model)
        elif action == "crash-mid-stream":
            await self.crash_mid_stream(model)

    def kill(self, model: str) -> bool:
        pid = int(self.d.show(f"llama-server@{model}.service", "MainPID") or 0)
        if pid:
            self.d.box.run(["kill", "-9", str(pid)], check=False)
            self.faults += 1
        return bool(pid)

    async def crash_mid_stream(self, model: str) -> None:
        """The stream ends with an error event (or completes first); never hangs."""
        self.sent += 1
        events = await asyncio.wait_for(stream(
            self.s, self.d.url, model, max_tokens=200,
            on_event=lambda n: n == 2 and self.kill(model)), 120)
        if events[-1] != {"done": True} and "error" not in events[-1]:
            self.lose(f"crash-mid-stream {model}: {events[-1]}")


def figures(d: Llamad) -> dict[str, Any]:
    """llamad's descriptors and RSS, the model units, failed units, llama-server processes."""
    pid = d.show(d.unit, "MainPID")
    return {
        "fds": len(d.box.run(["ls", f"/proc/{pid}/fd"]).stdout.split()),
        "rss_kib": d.memory_of("VmRSS") // 1024,
        "units": sorted(d.model_units()),
        "failed": d.box.run(["systemctl", "list-units", "--failed", "--no-legend", "--plain",
                             "llama-server@*"]).stdout.strip(),
        "processes": len(d.box.run(["pgrep", "-x", "llama-server"], check=False)
                         .stdout.split()),
    }


def settle(d: Llamad) -> dict[str, str]:
    """Wait until every model is loaded or not (nothing starting or stopping), and systemd
    agrees: an active unit for each ready model, and no other."""
    def settled() -> dict[str, str] | None:
        states = {m: v["llamad"]["state"] for m, v in models(d.url).items()}
        active = {u.removeprefix("llama-server@").removesuffix(".service")
                  for u in d.model_units()}
        ready = {m for m, s in states.items() if s == "ready"}
        ok = all(s in SETTLED for s in states.values()) and active == ready
        return states if ok else None
    return rig.wait_for("llamad and systemd to settle", settled, timeout=120, interval=0.2)


async def test_soak(llamad_factory: Factory) -> None:
    seed = int(os.environ.get("LLAMAD_SOAK_SEED") or random.randrange(2**32))
    print(f"soak seed {seed} (replay: LLAMAD_SOAK_SEED={seed})")
    rnd = random.Random(seed)
    d = llamad_factory(list(MODELS), args="-c 1024 -np 4",
                       **{"models-max": 2, "start-limit-burst": 10000})
    actions = Counter[str]()
    async with aiohttp.ClientSession() as s:
        soak = Soak(d, s, rnd)
        for model in MODELS[:2]:  # warm up: both usual models loaded once before measuring
            await soak.chat(model)
        before = figures(d)
        started = time.monotonic()
        for i in range(STEPS):
            action = rnd.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
            actions[action] += 1
            t = time.monotonic()
            await soak.step(action)
            print(f"step {i} {action} {time.monotonic() - t:.2f}s")
            if i == STEPS // 2:
                # Memory is compared over the second half: the first grows the allocator's
                # arenas and the threads that start on first use; a leak keeps growing.
                settle(d)
                middle = figures(d)
        took = time.monotonic() - started
        # The end state: the two usual models loaded, as at the start.
        for model in MODELS[:2]:
            await soak.chat(model)
    settle(d)
    after = figures(d)
    summary = {"seed": seed, "steps": STEPS, "seconds": round(took, 1), "actions": actions,
               "requests": soak.sent, "lost": soak.lost, "faults": soak.faults,
               "before": before, "middle": middle, "after": after}
    print("soak figures " + json.dumps(summary))
    log = d.log()
    if soak.lost:  # what llamad said about it, for the report
        print("\n".join(line for line in log.splitlines()
                        if "failed" in line or "refused" in line or "wedged" in line))
    assert soak.lost == 0, (seed, soak.lost_detail)
    assert not after["failed"], (seed, after)
    assert after["processes"] == len(after["units"]) <= 2, (seed, after)
    assert after["fds"] <= before["fds"] + 4, (seed, before, after)
    assert after["rss_kib"] <= middle["rss_kib"] * 1.10, (seed, before, middle, after)
    assert "Traceback" not in log, (seed, tracebacks(log))
    assert "illegal state change" not in log, (seed, log[-3000:])
