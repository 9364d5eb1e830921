"""The seven measurements. Contenders take turns request by request (or round by
round), in an order rotated every round, so drift of this shared machine (other
jobs, thermal state, page cache) falls on all of them alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import rig
from helpers.daemon import wait_http

from bench.client import Conn, parallel_streams
from bench.contenders import (
    MODELS,
    Setup,
    bare_start_to_first_token,
    catalog_tree,
    extra_llamad,
    listed,
    main_pid_rss_mb,
    shipped_sandbox,
    socket_activated,
)

MODEL = MODELS[0]
TOKENIZE = {"model": MODEL, "content": "The quick brown fox jumps over the lazy dog."}
ONE_TOKEN = {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 0}


SWAP = "swap request (evict + load + answer)"
SOCKET = "socket-activated cold start to GET /v1/models"
SOCKET_SANDBOXED = SOCKET + ", in the package's sandbox"


def generate(tokens: int, model: str = MODEL) -> dict[str, object]:
    # ignore_eos: every run makes exactly `tokens` tokens, whatever the model would say.
    return {"model": model, "prompt": "Once upon a time", "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}


@dataclass(frozen=True)
class Counts:
    latency: int = 200        # requests per contender and request kind
    warmup: int = 20
    stream_rounds: int = 6
    stream_tokens: int = 256
    cold_rounds: int = 6
    swap_rounds: int = 8      # requests per contender, alternating models
    clients: int = 32
    parallel_tokens: int = 16    # 32 x 16 tokens: compute-bound batches of 32
    parallel_rounds: int = 4
    socket_rounds: int = 5
    catalog_small: int = 1000
    catalog_large: int = 10_000
    listings: int = 50
    kv_rounds: int = 3  # 8. a conversation across a swap
    kv_tokens: int = 2000


QUICK = Counts(latency=20, warmup=3, stream_rounds=1, stream_tokens=32, cold_rounds=1,
               swap_rounds=2, parallel_tokens=8, parallel_rounds=1, socket_rounds=1,
               catalog_small=100, catalog_large=500, listings=5, kv_rounds=1,
               kv_tokens=200)


@dataclass
class Series:
    """Samples of one metric for one contender."""

    section: int
    metric: str
    contender: str
    unit: str
    values: list[float] = field(default_factory=list)
    higher_is_better: bool = False


class Results:
    def __init__(self) -> None:
        self.series: dict[tuple[int, str, str], Series] = {}
        self.notes: list[str] = []

    def add(self, section: int, metric: str, contender: str, unit: str, value: float,
            higher_is_better: bool = False) -> None:
        key = (section, metric, contender)
        if key not in self.series:
            self.series[key] = Series(section, metric, contender, unit,
                                      higher_is_better=higher_is_better)
        self.series[key].values.append(value)

    def get(self, section: int, metric: str, contender: str) -> Series | None:
        return self.series.get((section, metric, contender))


def rotated(items: Sequence[str], i: int) -> list[str]:
    k = i % len(items)
    return [*items[k:], *items[:k]]


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# -- 1. added latency ---------------------------------------------------------------

def latency(setup: Setup, n: Counts, res: Results) -> None:
    conns = {name: Conn(url) for name, url in setup.urls.items()}
    kinds: dict[str, tuple[str, dict[str, object]]] = {
        "/tokenize": ("/tokenize", TOKENIZE),
        "1-token completion": ("/v1/completions", ONE_TOKEN),
    }
    for metric, (path, body) in kinds.items():
        say(f"1. latency of {metric}: {n.latency} requests each, interleaved")
        for i in range(n.warmup + n.latency):
            for name in rotated(list(conns), i):
                seconds = conns[name].ok("POST", path, body)
                if i >= n.warmup:
                    res.add(1, metric, name, "ms", seconds * 1000)
    for c in conns.values():
        c.close()


# -- 2. streaming -------------------------------------------------------------------

def streaming(setup: Setup, n: Counts, res: Results) -> None:
    say(f"2. streaming {n.stream_tokens} tokens, {n.stream_rounds} rounds")
    conns = {name: Conn(url) for name, url in setup.urls.items()}
    for name in conns:  # warm: the prompt is cached from here on, for everyone
        conns[name].stream("/v1/completions", generate(8))
    for i in range(n.stream_rounds):
        for name in rotated(list(conns), i):
            s = conns[name].stream("/v1/completions", generate(n.stream_tokens))
            if s.tokens < n.stream_tokens * 0.9:
                raise RuntimeError(f"{name} streamed {s.tokens} of {n.stream_tokens} tokens")
            res.add(2, "tokens/s", name, "tok/s", s.rate, higher_is_better=True)
            res.add(2, "time to first token", name, "ms", (s.arrivals[0] - s.start) * 1000)
            for gap in s.gaps_ms:
                res.add(2, "inter-chunk delay", name, "ms", gap)
    for c in conns.values():
        c.close()


# -- 3. cold start ------------------------------------------------------------------

def cold_start(setup: Setup, n: Counts, res: Results) -> None:
    say(f"3. cold start: {n.cold_rounds} rounds")
    body = dict(ONE_TOKEN)

    def served(who: str) -> Callable[[], float]:
        def run() -> float:
            setup.unload(who, MODEL)
            conn = Conn(setup.urls[who])
            try:
                return conn.ok("POST", "/v1/completions", body)
            finally:
                conn.close()
        return run

    runs = {"llamad": served("llamad"), "router": served("router"),
            "bare": lambda: bare_start_to_first_token(setup.assets, body)}
    for i in range(n.cold_rounds):
        for name in rotated(list(runs), i):
            res.add(3, "request to first token", name, "ms", runs[name]() * 1000)


# -- 4. swap ------------------------------------------------------------------------

def swap(setup: Setup, n: Counts, res: Results) -> None:
    say(f"4. swap: {n.swap_rounds} alternating requests each, one model loaded at a time")
    conns = {name: Conn(setup.urls[name]) for name in ("llamad", "router")}
    for c in conns.values():
        c.ok("POST", "/v1/completions", ONE_TOKEN)  # MODELS[0] is loaded: the first swaps
    for i in range(n.swap_rounds):
        model = MODELS[(i + 1) % 2]
        for name in rotated(list(conns), i):
            seconds = conns[name].ok("POST", "/v1/completions", {**ONE_TOKEN, "model": model})
            res.add(4, SWAP, name, "ms", seconds * 1000)
    for c in conns.values():
        c.close()


# -- 5. concurrency -----------------------------------------------------------------

def concurrency(setup: Setup, n: Counts, res: Results) -> None:
    say(f"5. {n.clients} parallel streams of {n.parallel_tokens} tokens, "
        f"{n.parallel_rounds} rounds")
    urls = {name: setup.urls[name] for name in ("llamad", "direct")}
    for url in urls.values():  # llamad has the model loaded after this
        Conn(url).ok("POST", "/v1/completions", ONE_TOKEN)
    for i in range(n.parallel_rounds):
        for name in rotated(list(urls), i):
            cpu = cpu_seconds(setup, setup.llamad.unit)
            tokens, wall = parallel_streams(urls[name], "/v1/completions",
                                            generate(n.parallel_tokens), n.clients)
            if tokens < n.clients * n.parallel_tokens * 0.9:
                raise RuntimeError(f"{name}: {tokens} tokens of "
                                   f"{n.clients * n.parallel_tokens} came back")
            res.add(5, f"aggregate tokens/s, {n.clients} streams", name, "tok/s",
                    tokens / wall, higher_is_better=True)
            if name == "llamad":
                # What the proxy takes from the model's CPU share, per streamed token.
                used = cpu_seconds(setup, setup.llamad.unit) - cpu
                res.add(5, "llamad CPU per streamed token", name, "us", used / tokens * 1e6)


def cpu_seconds(setup: Setup, unit: str) -> float:
    """User + system CPU time of a unit's main process so far (from /proc/PID/stat)."""
    pid = setup.box.run(["systemctl", "show", "-P", "MainPID", unit]).stdout.strip()
    fields = setup.box.run(["cat", f"/proc/{pid}/stat"]).stdout.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- 6. footprint and 7. scale ------------------------------------------------------

def wait_settled_rss(setup: Setup, unit: str) -> float:
    """RSS once it stops changing (startup work done), polled, bounded."""
    last = [main_pid_rss_mb(setup.box, unit)]

    def settled() -> float | None:
        now = main_pid_rss_mb(setup.box, unit)
        done = abs(now - last[0]) < 0.2
        last[0] = now
        return now if done else None
    return rig.wait_for(f"{unit}'s RSS to settle", settled, timeout=30, interval=0.5)


def footprint(setup: Setup, n: Counts, res: Results) -> None:
    say("6. footprint: idle RSS with 4 and with "
        f"{n.catalog_small} models; socket-activated first answer")
    four = setup.assets.models_dir("models-four", [f"idle-{i}" for i in range(1, 5)])
    small = catalog_tree(setup.box.workdir / f"catalog-{n.catalog_small}", n.catalog_small)
    config = None
    for count, models_dir in ((4, four), (n.catalog_small, small)):
        label = f"{count} models"
        d = extra_llamad(setup, models_dir)
        try:
            d.start()
            wait_http(d.url, timeout=120)
            listed(d.url, count)
            # The very first start parses every header (and imports gguf/numpy); later
            # starts take them from the cache in state-dir. Both are reported.
            res.add(6, f"idle RSS, {label}, first start", "llamad", "MB",
                    wait_settled_rss(setup, d.unit))
            d.restart()
            wait_http(d.url, timeout=120)
            listed(d.url, count)
            res.add(6, f"idle RSS, {label}", "llamad", "MB", wait_settled_rss(setup, d.unit))
        finally:
            d.cleanup()
        config = config or d.config
    assert config is not None
    # The target is llamad's own start; beside it, what a user of the package waits for,
    # in the shipped unit's sandbox, which systemd sets up before llamad runs.
    with socket_activated(setup, config) as bare, socket_activated(
            setup, config, "bench-llamad-sandboxed",
            shipped_sandbox(setup.box, config.parent / "state")) as sandboxed:
        for _ in range(n.socket_rounds):
            for metric, (url, service) in ((SOCKET, bare), (SOCKET_SANDBOXED, sandboxed)):
                res.add(6, metric, "llamad", "ms", first_answer(setup, url, service) * 1000)


def first_answer(setup: Setup, url: str, service: str) -> float:
    """Seconds from a connection to `service`'s socket, with the service stopped, to the
    answer of GET /v1/models."""
    setup.box.run(["systemctl", "stop", service])
    rig.wait_for(f"{service} to stop", lambda: setup.box.run(
        ["systemctl", "is-active", service], check=False).stdout.strip()
        in ("inactive", "failed"), timeout=30)
    conn = Conn(url)
    try:
        return conn.ok("GET", "/v1/models")
    finally:
        conn.close()


def scale(setup: Setup, n: Counts, res: Results) -> None:
    say(f"7. GET /v1/models with {n.catalog_large} models catalogued")
    tree = catalog_tree(setup.box.workdir / f"catalog-{n.catalog_large}", n.catalog_large)
    d = extra_llamad(setup, tree)
    try:
        start = time.perf_counter()
        d.start()
        wait_http(d.url, timeout=300)
        res.add(7, f"start to ready, {n.catalog_large} models", "llamad", "ms",
                (time.perf_counter() - start) * 1000)
        listed(d.url, n.catalog_large)
        conn = Conn(d.url)
        for _ in range(n.listings):
            res.add(7, f"GET /v1/models, {n.catalog_large} models", "llamad", "ms",
                    conn.ok("GET", "/v1/models") * 1000)
        conn.close()
        res.add(7, f"idle RSS, {n.catalog_large} models", "llamad", "MB",
                wait_settled_rss(setup, d.unit))
    finally:
        d.cleanup()
