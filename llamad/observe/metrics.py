"""GET /metrics (no ?model=): llamad's Prometheus metrics and, with a `model` label, the
llama-server metrics (llamacpp:*) of each ready model. Never loads a model.

Where the figures come from, so that nothing is counted inside the supervisor:
- model state changes (`Supervisor.events`): load durations, evictions by reason,
  crash restarts, failures;
- finished requests (`record.Record`): requests by status, rejections by reason;
- the supervisor's state, read at scrape time: states, in flight, queued, memory, GPUs;
- each ready model's own /metrics, fetched at scrape time, all at once, each cut off
  after MODEL_TIMEOUT so a stuck backend cannot stall the scrape.
The metric names are listed in docs/operations.md.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from llamad.http import keys
from llamad.http.context import app_key
from llamad.http.record import Record
from llamad.memory.gpu import mem_available
from llamad.supervisor import unitspec
from llamad.supervisor.backend import read_capped
from llamad.supervisor.events import Cause, Change, State
from llamad.supervisor.slot import SlotView
from llamad.supervisor.supervisor import Supervisor

MODEL_TIMEOUT = 2.0  # seconds for one model's /metrics
MODEL_BYTES = 4 << 20  # bytes of one model's /metrics (llama-server's are ~3 KiB)
BACKEND = "llamacpp:"  # the only families passed through from a model's /metrics
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_WRITTEN = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", re.M)  # sample names as written
LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
EVICTIONS = frozenset({Cause.EVICT_COUNT, Cause.EVICT_MEMORY, Cause.TTL, Cause.KEEP_ALIVE,
                       Cause.UNLOAD, Cause.REMOVED})
# llamad's own "not now": queue full, timeout, cannot fit... (429: a concurrency limit's
# full queue).
REJECTIONS = frozenset({503, 429})


class Metrics:
    """llamad's own series; one per daemon, in app[METRICS]."""

    def __init__(self, connections: Callable[[], int] = lambda: 0) -> None:
        self.sup: Supervisor | None = None
        self.connections = connections
        self.seen: set[str] = set()  # models that changed state since llamad started
        self._loading: dict[str, float] = {}  # model -> when its timed load began
        counted = CollectorRegistry()
        self.requests = Counter("llamad_requests", "Requests to a model, by HTTP status",
                                ["model", "code"], registry=counted)
        self.rejections = Counter(
            "llamad_rejections", "Requests llamad refused with 503, by reason (queue_full, "
            "timeout, cannot_fit, model_failed, ...)", ["model", "reason"], registry=counted)
        self.loads = Histogram("llamad_model_load_duration_seconds",
                               "Seconds from starting a model's unit to its first healthy "
                               "answer", ["model"], buckets=LOAD_BUCKETS, registry=counted)
        self.evictions = Counter(
            "llamad_evictions", "Models stopped, by reason (lru, memory, ttl, keep_alive, "
            "unload, file_removed)", ["model", "reason"], registry=counted)
        self.restarts = Counter("llamad_model_restarts",
                                "Crashes of a model that systemd restarted", ["model"],
                                registry=counted)
        self.wakes = Counter("llamad_model_wakes",
                             "Times a request woke a sleeping model (not counted as loads)",
                             ["model"], registry=counted)
        self.failures = Counter("llamad_model_failures",
                                "Times a model was given up on (start limit, out of memory, "
                                "load timeout)", ["model"], registry=counted)
        self.registry = CollectorRegistry()
        self.registry.register(_WithoutCreated(counted))
        self.registry.register(_Live(self))
        ProcessCollector(registry=self.registry)  # llamad's RSS, CPU, open files

    def watch(self, sup: Supervisor) -> None:
        self.sup = sup
        sup.events.subscribe(self.on_change)

    def on_change(self, c: Change) -> None:
        self.seen.add(c.model)
        if c.new is State.STARTING and c.cause in (Cause.LOAD, Cause.CRASH):
            self._loading[c.model] = c.at
        elif c.new is State.READY and c.cause is Cause.HEALTHY:
            began = self._loading.pop(c.model, None)
            if began is not None:
                self.loads.labels(c.model).observe(max(0.0, c.at - began))
        elif c.new in (State.UNLOADED, State.STOPPING, State.FAILED):
            self._loading.pop(c.model, None)
        if c.new is State.STOPPING and c.cause in EVICTIONS:
            self.evictions.labels(c.model, c.cause.value).inc()
        if c.cause is Cause.CRASH:
            self.restarts.labels(c.model).inc()
        if c.new is State.FAILED:
            self.failures.labels(c.model).inc()
        if c.old is State.SLEEPING and c.new is State.READY:
            self.wakes.labels(c.model).inc()

    def on_request(self, rec: Record) -> None:
        self.requests.labels(rec.model, str(rec.status)).inc()
        if rec.status in REJECTIONS and rec.code:
            self.rejections.labels(rec.model, rec.code).inc()

    async def render(self) -> bytes:
        """The whole exposition: llamad's series, then the ready models'."""
        models = await model_metrics(self.sup.loaded_models() if self.sup else [])
        # Read on the loop, which owns the supervisor's state; written on a thread: with a
        # thousand models the text is ~0.2 s of pure Python that requests would wait for.
        fixed = CollectorRegistry()
        fixed.register(_Fixed([*self.registry.collect(), *models.values()]))
        return await asyncio.to_thread(generate_latest, fixed)


class _WithoutCreated(Collector):
    """A registry's series minus the `_created` timestamps prometheus_client adds to
    counters and histograms (older versions cannot turn them off)."""

    def __init__(self, inner: CollectorRegistry) -> None:
        self.inner = inner

    def collect(self) -> Iterable[Metric]:
        for family in self.inner.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


class _Live(Collector):
    """The supervisor's state, read when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        sup = self.metrics.sup
        if sup is None:
            return []
        shown = [s for s in sup.models.values()
                 if s.state is not State.UNLOADED or s.model.id in self.metrics.seen]
        return [*_states(sup, shown), *_requests(sup, shown), *_memory(sup, shown),
                *_machine(sup, self.metrics.connections()), *sup.kv.families()]


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _states(sup: Supervisor, shown: list[SlotView]) -> Iterator[Metric]:
    state = _gauge("llamad_model_state", "1 for the state the model is in, else 0",
                   ("model", "state"))
    for slot in shown:
        for s in State:
            state.add_metric([slot.model.id, s.value], float(slot.state is s))
    count = _gauge("llamad_models", "Catalogued models by state", ("state",))
    by_state = {s: 0 for s in State}
    for slot in sup.models.values():
        by_state[slot.state] += 1
    for s, n in by_state.items():
        count.add_metric([s.value], n)
    yield from (state, count)


def _requests(sup: Supervisor, shown: list[SlotView]) -> Iterator[Metric]:
    in_flight = _gauge("llamad_model_requests_in_flight", "Requests the model is answering",
                       ("model",))
    queued = _gauge("llamad_model_requests_queued", "Requests waiting for the model",
                    ("model",))
    limit = _gauge("llamad_model_concurrency_limit", "Requests forwarded to the model at "
                   "once at most (concurrency-limit); 0 = no limit", ("model",))
    for slot in shown:
        in_flight.add_metric([slot.model.id], slot.in_flight)
        queued.add_metric([slot.model.id], slot.queued)
        limit.add_metric([slot.model.id], sup.concurrency(slot))
    yield from (in_flight, queued, limit)


def _memory(sup: Supervisor, shown: list[SlotView]) -> Iterator[Metric]:
    """Per model and kind of memory: measured now and at peak, the estimate, the need the
    scheduler plans with (learned, else the estimate). Bytes."""
    labels = ("model", "memory")
    used = _gauge("llamad_model_memory_used_bytes", "Memory the model uses now (measured)",
                  labels)
    peak = _gauge("llamad_model_memory_peak_bytes", "Most memory the model's process used",
                  labels)
    estimate = _gauge("llamad_model_memory_estimate_bytes",
                      "Memory the model should need, estimated from its GGUF", labels)
    need = _gauge("llamad_model_memory_need_bytes",
                  "Memory the scheduler plans with: learned, else the estimate", labels)
    for slot in shown:
        m = slot.model.id
        running = slot.state in (State.READY, State.SLEEPING) and \
            slot.sampled_pid == slot.main_pid != 0
        est, planned = sup.measure.estimate(slot.model), sup.measure.need(slot.model)
        for kind in ("ram", "vram"):
            if running:
                used.add_metric([m, kind], getattr(slot.used, kind))
                peak.add_metric([m, kind], getattr(slot.peak, kind))
            estimate.add_metric([m, kind], getattr(est, kind))
            need.add_metric([m, kind], getattr(planned, kind))
    yield from (used, peak, estimate, need)


def _machine(sup: Supervisor, connections: int) -> Iterator[Metric]:
    labels = ("gpu", "name")
    total = _gauge("llamad_gpu_memory_total_bytes", "A GPU's memory", labels)
    free = _gauge("llamad_gpu_memory_free_bytes", "A GPU's free memory", labels)
    for g in sup.measure.gpu_list():
        total.add_metric([str(g.index), g.name], g.total)
        free.add_metric([str(g.index), g.name], g.free)
    ram = _gauge("llamad_memory_available_bytes", "The machine's available RAM (MemAvailable)")
    ram.add_metric([], mem_available())
    conns = _gauge("llamad_open_connections", "Client connections open to llamad")
    conns.add_metric([], connections)
    yield from (total, free, ram, conns)


async def model_metrics(slots: list[SlotView]) -> dict[str, Metric]:
    """llamacpp:* families of every ready model, each sample labelled with its model."""
    # A sleeping llama-server answers /metrics from its cache without waking. One started
    # without --metrics (`metrics = false`) answers 501: not asked, and not down.
    ready = [s for s in slots if s.state in (State.READY, State.SLEEPING)
             and s.backend is not None and unitspec.serves_metrics(s.model)]
    texts = await asyncio.gather(*(_fetch(s) for s in ready))
    # Parsing is pure Python: on a thread, so a big answer does not hold the event loop
    # in one piece (its size is bounded by MODEL_BYTES).
    families = await asyncio.to_thread(
        passthrough, [(s.model.id, t) for s, t in zip(ready, texts, strict=True)])
    return {f.name: f for f in families}


def passthrough(texts: list[tuple[str, str | None]]) -> list[Metric]:
    """The families of each model's /metrics text (None: it did not answer), each sample
    labelled with its model, and whether each answered (llamad_model_metrics_up)."""
    merged: dict[str, Metric] = {}
    up = _gauge("llamad_model_metrics_up", "1 if the model's own /metrics answered in time",
                ("model",))
    for model, text in texts:
        families = _parse(text) if text is not None else None
        up.add_metric([model], float(families is not None))
        for family in families or ():
            into = merged.setdefault(family.name, Metric(family.name, family.documentation,
                                                         family.type))
            for s in family.samples:
                into.add_sample(s.name, {**s.labels, "model": model}, s.value)
    merged[up.name] = up
    return list(merged.values())


def _parse(text: str) -> list[Metric]:
    """A backend's llamacpp:* families whose names and labels the exposition format
    allows, named as the backend wrote them. Only llama-server's own prefix: any other
    family (process_*, llamad_*) could be one llamad writes, and a second TYPE line for a
    name makes strict parsers (promtool, Prometheus' expfmt) refuse the whole page."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:  # not Prometheus text: leave that model out
        return []
    written = set(_WRITTEN.findall(text))
    return [_as_written(f, written) for f in families
            if f.name.startswith(BACKEND) and _NAME.fullmatch(f.name)
            and all(_NAME.fullmatch(s.name) and all(
                _LABEL.fullmatch(k) and k != "model" for k in s.labels) for s in f.samples)]


def _as_written(family: Metric, written: set[str]) -> Metric:
    """prometheus_client's parser names a counter's samples *_total where the text did
    not (llama-server's `llamacpp:n_tokens_max`), and its writer announces the family as
    such: that family keeps the backend's name, untyped, as dashboards on llama-server
    query it."""
    if family.type != "counter" or all(s.name in written for s in family.samples):
        return family
    out = Metric(family.name, family.documentation, "unknown")
    for s in family.samples:
        name = s.name if s.name in written else s.name.removesuffix("_total")
        out.add_sample(name, s.labels, s.value)
    return out


async def _fetch(slot: SlotView) -> str | None:
    backend = slot.backend
    if backend is None:
        return None
    try:
        async with backend.session().get(backend.base_url + "/metrics",
                                         timeout=aiohttp.ClientTimeout(total=MODEL_TIMEOUT)) as r:
            if r.status != 200:
                return None
            return (await read_capped(r, MODEL_BYTES)).decode(errors="replace")
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
        return None


METRICS: Any = app_key("metrics", Metrics)


async def handle(request: web.Request) -> web.Response:
    keys.require_admin(request, "llamad's /metrics")  # it names every model
    metrics: Metrics = request.app[METRICS]
    return web.Response(body=await metrics.render(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})
