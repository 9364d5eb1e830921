"""A conversation survives its model being swapped out: llama-server's KV cache is saved
when llamad stops a model it may load again, and restored when it loads, before it serves.

- **When.** A ready model that llamad stops for eviction, idle TTL, `keep_alive` or an
  unload (`SAVED_ON`) first saves every slot that holds a cache (`save`, called by
  lifecycle.py's stop path); when the model next answers /health, its saved slots are
  restored before it is marked ready (`restore`). Crashes, removed or changed files and
  llamad's own exit save nothing.
- **Which cache.** Each save is keyed by `identity()`: the model files' and llama-server's
  (device, inode, size, mtime) and the model's exact arguments. A load whose identity
  differs drops the saved caches and restores nothing.
- **Bounds.** Saving stops at `kv-cache-timeout` (a slot whose save is predicted to take
  longer, from the model's last save, is skipped); files beyond `kv-cache-max-mb` go,
  oldest first. A file that fails its checksum or that llama-server refuses is logged
  and dropped: the model then serves without it, never fails for it.
- **Where.** kvstore.py: `state-dir/kv/<model>/` bind-mounted into the model's unit.
- **Sliding-window models** (Gemma 2/3, gpt-oss, Cohere 2 ...): llama-server restores their
  cache without `--swa-full` but never reuses it, so with kv-cache on they get the flag
  (`presets.run_settings`), and memory/estimate.py counts the larger cache it makes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from llamad.config import Config
from llamad.sizes import MIB
from llamad.supervisor import backend as be
from llamad.supervisor.events import Cause, Change, Hub, State
from llamad.supervisor.guards.kvstore import Entry, Store
from llamad.supervisor.hooks import Hook
from llamad.systemd.unitname import instance_name

if TYPE_CHECKING:
    from llamad.catalog.catalog import Model
    from llamad.supervisor.slot import Slot

log = logging.getLogger("llamad.kvcache")

SAVED_ON = frozenset({Cause.EVICT_COUNT, Cause.EVICT_MEMORY, Cause.TTL, Cause.KEEP_ALIVE,
                      Cause.UNLOAD})
SAVE_PATH = "--slot-save-path"


class KvError(Exception):
    """llama-server refused a slot action; the message is its own."""


# -- what a model's unit gets -------------------------------------------------

def dir_name(model_id: str) -> str:
    """The model's directory under state-dir/kv, named as its runtime directory."""
    return be.runtime_dir(instance_name(model_id)).removeprefix("llamad/")


@dataclass(frozen=True)
class UnitParts:
    args: tuple[str, ...]
    runtime_dir: str  # relative to /run
    bind: tuple[str, str]  # (host directory, directory in the unit)


def unit_parts(config: Config, model: Model) -> UnitParts | None:
    """The flags and bind mount that give the unit its save directory (None: kv-cache off)."""
    if not config.kv_cache:
        return None
    runtime = be.runtime_dir(instance_name(model.id))
    inside = f"/run/{runtime}/kv"
    host = str(config.state_dir / "kv" / dir_name(model.id))
    return UnitParts((SAVE_PATH, inside), runtime, (host, inside))


def identity(config: Config, model: Model) -> str:
    """What a saved cache is valid for: the files (as stat sees them) and the arguments."""
    files = [config.llama_server, *model.shards, *([model.mmproj] if model.mmproj else [])]
    stats = [(str(p), *_stat(p)) for p in files]
    text = json.dumps([stats, list(model.settings.args)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _stat(path: os.PathLike[str]) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


# -- talking to llama-server -----------------------------------------------------

def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("kv-cache-timeout ran out")
    return left


async def _slots(backend: be.Backend, deadline: float) -> list[dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=_left(deadline))
    async with backend.session().get(backend.base_url + "/slots", timeout=timeout) as r:
        body = await be.capped_json(r, be.SMALL_ANSWER)
        if r.status != 200 or not isinstance(body, list):
            raise KvError(f"GET /slots answered {r.status}: {str(body)[:200]}")
        return [s for s in body if isinstance(s, dict)]


async def _action(backend: be.Backend, slot: int, action: str, filename: str,
                  deadline: float) -> dict[str, Any]:
    url = f"{backend.base_url}/slots/{slot}?action={action}"
    timeout = aiohttp.ClientTimeout(total=_left(deadline))
    async with backend.session().post(url, json={"filename": filename}, timeout=timeout) as r:
        body = await be.capped_json(r, be.SMALL_ANSWER)
        if r.status != 200 or not isinstance(body, dict):
            error = body.get("error", body) if isinstance(body, dict) else body
            message = error.get("message", error) if isinstance(error, dict) else error
            raise KvError(str(message)[:300])
        return body


def _held(slot: dict[str, Any]) -> int:
    """Tokens a slot of GET /slots holds (shown once it has served a request)."""
    n = slot.get("n_prompt_tokens", 0)
    return n if isinstance(n, int) else 0


# -- the cache -------------------------------------------------------------------

@dataclass
class Figures:
    """Per model, since llamad started."""

    saved_tokens: int = 0
    restored_tokens: int = 0
    discarded: dict[str, int] = field(default_factory=dict)  # reason -> saved slots


@dataclass(frozen=True)
class _Live:
    address: str
    key: str


class KvCache(Hook):
    """Saves and restores models' KV caches; one per supervisor, inert with kv-cache off.

    Which stop saves is known from the state change that began it (`on_change`, a listener,
    hears READY -> STOPPING with its cause before the stop's `before_stop` runs)."""

    def __init__(self, config: Config, events: Hub) -> None:
        self.config = config
        self.store: Store | None = None
        self.figures: dict[str, Figures] = {}
        self.stored: dict[str, tuple[int, int]] = {}  # model -> (tokens, bytes) on disk
        self.generation = 0  # bumped on every change of what describe() shows
        self._live: dict[str, _Live] = {}  # ready models: where they listen, their key
        self._to_save: set[str] = set()
        self._rates: dict[str, tuple[float, float]] = {}  # model -> (s, bytes) per token
        self._keeping: dict[str, asyncio.Task[None]] = {}
        if config.kv_cache:
            self.store = self._open(Store(config.state_dir / "kv",
                                          config.kv_cache_max_mb * MIB))
            events.subscribe(self.on_change)
        if self.store is not None:
            self.stored = self.store.usage()

    @staticmethod
    def _open(store: Store) -> Store | None:
        try:
            store.open()
        except OSError as e:
            log.error("KV caches cannot be kept: %s: %s", store.root, e.strerror or e)
            return None
        return store

    def on_change(self, c: Change) -> None:
        if c.new is State.STOPPING and c.old is State.READY and c.cause in SAVED_ON:
            self._to_save.add(c.model)
        elif c.new is State.STARTING and self.store is not None:
            self._to_save.discard(c.model)
            try:  # before the unit starts: its bind mount needs the directory
                self.store.model_dir(dir_name(c.model))
            except OSError as e:
                log.warning("model %s: no directory for its KV cache (%s); it is not kept",
                            c.model, e.strerror or e)

    def describe(self, model_id: str) -> dict[str, int] | None:
        """For GET /v1/models: tokens saved and restored since llamad started, and what is
        on disk now (restored at the next load). None with kv-cache off."""
        if self.store is None:
            return None
        fig = self.figures.get(model_id, Figures())
        tokens, size = self.stored.get(model_id, (0, 0))
        return {"saved_tokens": fig.saved_tokens, "restored_tokens": fig.restored_tokens,
                "stored_tokens": tokens, "stored_bytes": size}

    async def _guarded(self, model_id: str, what: str,
                       work: Coroutine[Any, Any, None]) -> None:
        """Run a save or a restore; whatever goes wrong is logged, and the stop or the load
        goes on: a model without its cache still serves."""
        try:
            await work
        except TimeoutError:
            log.warning("model %s: %s its KV cache stopped at kv-cache-timeout (%gs)",
                        model_id, what, self.config.kv_cache_timeout)
            self._discard(model_id, "timeout")
        except (KvError, aiohttp.ClientError, OSError, ValueError) as e:
            log.warning("model %s: %s its KV cache failed: %s", model_id, what, e)
        except Exception:  # a bug here must not leave the model stuck loading or stopping
            log.exception("model %s: %s its KV cache failed", model_id, what)

    def _figures(self, model_id: str) -> Figures:
        self.generation += 1
        return self.figures.setdefault(model_id, Figures())

    def _discard(self, model_id: str, reason: str, n: int = 1) -> None:
        d = self._figures(model_id).discarded
        d[reason] = d.get(reason, 0) + n

    async def _io(self, fn: Any, *args: Any) -> Any:
        """Store work on a thread, then the figures it changed."""
        assert self.store is not None
        out = await asyncio.to_thread(fn, *args)
        self.stored = await asyncio.to_thread(self.store.usage)
        self.generation += 1
        return out

    # -- the lifecycle's hooks -----------------------------------------------------

    async def before_ready(self, slot: Slot, backend: be.Backend) -> None:
        await self.restore(slot.model, backend)

    async def before_stop(self, slot: Slot) -> None:
        await self.save(slot.model)

    async def close(self) -> None:
        """Let the checksumming and indexing of saves already made finish."""
        await asyncio.gather(*self._keeping.values(), return_exceptions=True)

    # -- restoring: between /health and ready ----------------------------------

    async def restore(self, model: Model, backend: be.Backend) -> None:
        """The model's process answers /health: restore its saved slots before it serves
        (bounded by kv-cache-timeout). Never raises: without its cache a model still serves."""
        if self.store is None:
            return
        deadline = time.monotonic() + self.config.kv_cache_timeout
        await self._guarded(model.id, "restoring", self._restore(model, backend, deadline))

    async def _restore(self, model: Model, backend: be.Backend, deadline: float) -> None:
        assert self.store is not None
        key = await asyncio.to_thread(identity, self.config, model)
        self._live[model.id] = _Live(backend.address, key)
        keeping = self._keeping.get(model.id)
        if keeping is not None:  # the last save is still being checked and indexed
            await asyncio.wait_for(asyncio.shield(keeping), _left(deadline))
        await asyncio.to_thread(self.store.remove_strays, dir_name(model.id))
        entries = await asyncio.to_thread(self.store.entries, model.id)
        stale = [e for e in entries if e.key != key]
        if stale:
            log.info("model %s: its file or arguments changed since its KV cache was saved; "
                     "dropped %d saved tokens", model.id, sum(e.tokens for e in stale))
            self._discard(model.id, "changed", len(stale))
            await self._io(self.store.drop, stale)
        fresh = [e for e in entries if e.key == key]
        if not fresh:
            return
        if any(_held(s) for s in await _slots(backend, deadline)):
            return  # a process llamad adopted, or one that kept running: it has its cache
        started, restored = time.monotonic(), 0
        for e in sorted(fresh, key=lambda e: e.slot):
            restored += await self._restore_one(model, backend, e, deadline)
        if restored:
            log.info("model %s: restored %d cached tokens in %.2fs", model.id, restored,
                     time.monotonic() - started)

    async def _restore_one(self, model: Model, backend: be.Backend, e: Entry,
                           deadline: float) -> int:
        assert self.store is not None
        why = await asyncio.wait_for(asyncio.to_thread(self.store.verify, e), _left(deadline))
        if why is None:
            try:
                done = await _action(backend, e.slot, "restore", e.file, deadline)
                n = int(done.get("n_restored", 0))
                self._figures(model.id).restored_tokens += n
                return n
            except KvError as err:
                why = f"was refused by llama-server: {err}"
        log.warning("model %s: ignoring the KV cache saved for slot %d in %s: it %s",
                    model.id, e.slot, self.store.path(e), why)
        self._discard(model.id, "unusable")
        await self._io(self.store.drop, [e])
        return 0

    # -- saving: before the unit is stopped ------------------------------------

    async def save(self, model: Model) -> None:
        """llamad is about to stop the model's unit: if it stops a ready model for a reason
        it may come back from, save its slots first, within kv-cache-timeout."""
        live = self._live.pop(model.id, None)
        wanted = model.id in self._to_save
        self._to_save.discard(model.id)
        if self.store is None or live is None or not wanted:
            return
        started = time.monotonic()
        deadline = started + self.config.kv_cache_timeout
        backend = be.Backend(live.address)
        saved: list[Entry] = []
        try:
            await self._guarded(model.id, "saving",
                                self._save(model, backend, live.key, deadline, saved))
        finally:
            await backend.close()
        if saved:
            log.info("model %s: saved %d cached tokens (%.1f MiB) in %.3fs", model.id,
                     sum(e.tokens for e in saved), sum(e.bytes for e in saved) / MIB,
                     time.monotonic() - started)
            task = asyncio.get_running_loop().create_task(
                self._keep(model.id, saved), name=f"keeping the KV cache of {model.id}")
            self._keeping[model.id] = task
            task.add_done_callback(lambda t: self._kept(model.id, t))

    async def _save(self, model: Model, backend: be.Backend, key: str, deadline: float,
                    saved: list[Entry]) -> None:
        slots = [s for s in await _slots(backend, deadline) if _held(s)]
        # The most recently used first: it is the likeliest to come back.
        slots.sort(key=lambda s: -int(s.get("id_task", 0) or 0))
        for s in slots:
            why = self._too_big(model.id, _held(s), deadline)
            if why:
                log.info("model %s: not saving slot %s's KV cache (%d tokens): %s",
                         model.id, s.get("id"), _held(s), why)
                self._discard(model.id, "skipped")
                continue
            entry = await self._save_one(model, backend, int(s["id"]), key, deadline)
            if entry is not None:
                saved.append(entry)

    async def _save_one(self, model: Model, backend: be.Backend, slot: int, key: str,
                        deadline: float) -> Entry | None:
        name = f"{time.time_ns() // 1000}-{slot}.bin"
        started = time.monotonic()
        try:
            done = await _action(backend, slot, "save", name, deadline)
        except KvError as e:
            log.warning("model %s: saving slot %d's KV cache failed: %s", model.id, slot, e)
            self._discard(model.id, "failed")
            return None
        n, size = int(done.get("n_saved", 0)), int(done.get("n_written", 0))
        if n <= 0:
            return None
        self._rates[model.id] = ((time.monotonic() - started) / n, size / n)
        self._figures(model.id).saved_tokens += n
        return Entry(model.id, dir_name(model.id), name, key, slot, n, size, time.time())

    def _too_big(self, model_id: str, tokens: int, deadline: float) -> str | None:
        """Why a slot of this many tokens should not be saved now, judging by the model's
        last save; None when it may be."""
        seconds, size = self._rates.get(model_id, (0.0, 0.0))
        left = deadline - time.monotonic()
        if left <= 0 or tokens * seconds > left:
            return (f"saving it would take about {tokens * seconds:.1f}s, more than the "
                    f"{max(0.0, left):.1f}s left of kv-cache-timeout")
        if tokens * size > self.config.kv_cache_max_mb * MIB:
            return f"about {tokens * size / MIB:.0f} MiB, more than kv-cache-max-mb"
        return None

    async def _keep(self, model_id: str, saved: list[Entry]) -> None:
        """Checksum and index a save, then keep the disk within kv-cache-max-mb."""
        assert self.store is not None
        over: list[Entry] = await self._io(self.store.add, saved)
        for e in over:
            log.info("dropped the KV cache of model %s, slot %d (%d tokens, %.1f MiB), the "
                     "oldest, to stay within kv-cache-max-mb", e.model, e.slot, e.tokens,
                     e.bytes / MIB)
            self._discard(e.model, "disk_bound")

    def _kept(self, model_id: str, task: asyncio.Task[None]) -> None:
        if self._keeping.get(model_id) is task:
            del self._keeping[model_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("model %s: keeping its saved KV cache failed: %s", model_id,
                      task.exception())


def families(kv: KvCache) -> list[Metric]:
    """Prometheus series per model (metrics.py shows them): tokens saved and restored,
    what is on disk, saved slots discarded by reason. None with kv-cache off."""
    if kv.store is None:
        return []
    labels = ["model"]
    saved = CounterMetricFamily("llamad_kv_cache_saved_tokens",
                                "Cached tokens saved when llamad stopped the model", labels=labels)
    restored = CounterMetricFamily("llamad_kv_cache_restored_tokens",
                                   "Cached tokens restored when the model loaded", labels=labels)
    discarded = CounterMetricFamily(
        "llamad_kv_cache_discarded", "Saved slots not kept or not restored, by reason "
        "(changed, unusable, disk_bound, skipped, timeout, failed)", labels=[*labels, "reason"])
    stored = GaugeMetricFamily("llamad_kv_cache_stored_bytes",
                               "Bytes of the model's saved KV cache on disk", labels=labels)
    tokens = GaugeMetricFamily("llamad_kv_cache_stored_tokens",
                               "Tokens in the model's saved KV cache on disk", labels=labels)
    for model, fig in sorted(kv.figures.items()):
        saved.add_metric([model], fig.saved_tokens)
        restored.add_metric([model], fig.restored_tokens)
        for reason, n in sorted(fig.discarded.items()):
            discarded.add_metric([model, reason], n)
    for model, (n, size) in sorted(kv.stored.items()):
        tokens.add_metric([model], n)
        stored.add_metric([model], size)
    return [saved, restored, discarded, stored, tokens]
