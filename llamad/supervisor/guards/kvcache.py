"""A conversation survives its model being swapped out: llama-server's KV cache is saved
when llamad stops a model it may load again, and restored when it loads, before it serves.
Which models and which slots: kvpolicy.py (by default where it pays).

- **When.** A ready model that llamad stops for eviction, idle TTL, `keep_alive` or an
  unload (`SAVED_ON`) first saves every slot that holds a cache (`save`, called by
  lifecycle.py's stop path); when the model next answers /health, its saved slots are
  restored before it is marked ready (`restore`). Crashes, removed or changed files and
  llamad's own exit save nothing.
- **Checked.** By a probe (kvprobe), else the next requests (`request_ended`). One that did
  not take is logged, counted, and turns restores off for that model and build: it fails open.
- **Which cache.** Each save is keyed by `identity()`: the model files' and llama-server's
  (device, inode, size, mtime) and the model's exact arguments. A load whose identity
  differs drops the saved caches and restores nothing.
- **Bounds.** Saving stops at `kv-cache-timeout` (a slot whose save is predicted to take
  longer, from the model's last save, is skipped); files beyond `kv-cache-max-mb` go,
  oldest first. A file that fails its checksum or that llama-server refuses is logged
  and dropped: the model then serves without it, never fails for it.
- **Where.** kvstore.py: `state-dir/kv/<model>/` bind-mounted into the model's unit.
- **Sliding-window models** (Gemma 2/3, gpt-oss, Cohere 2 ...): llama-server restores their
  cache without `--swa-full` but never reuses it, so they keep one only with the flag
  (`presets.run_settings`, where it fits: kvpolicy.py), and memory/estimate.py counts the
  larger cache it makes.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client.core import Metric

from llamad.config import Config
from llamad.sizes import MIB
from llamad.supervisor import backend as be
from llamad.supervisor.events import Cause, Change, State
from llamad.supervisor.guards import kvpolicy, kvprobe
from llamad.supervisor.guards import kvserver as srv
from llamad.supervisor.guards.kvmetrics import Figures, families
from llamad.supervisor.guards.kvserver import KvError
from llamad.supervisor.guards.kvstore import INDEX, Entry, Store, identity
from llamad.supervisor.hooks import Hook
from llamad.systemd.unitname import instance_name

if TYPE_CHECKING:
    from llamad.catalog.catalog import Model
    from llamad.supervisor.hooks import Port
    from llamad.supervisor.slot import Slot

log = logging.getLogger("llamad.kvcache")

SAVED_ON = frozenset({Cause.EVICT_COUNT, Cause.EVICT_MEMORY, Cause.TTL, Cause.KEEP_ALIVE,
                      Cause.UNLOAD})
SAVE_PATH = "--slot-save-path"
BROKEN = "a restore did not take with this model file, arguments and llama-server build"
CHECK_TIMEOUT = 5.0  # for GET /slots after a request that used a restored slot


# -- what a model's unit gets -------------------------------------------------

def dir_name(model_id: str) -> str:
    """The model's directory under state-dir/kv, named as its runtime directory; a model
    named as the index beside them gets a name no runtime directory has (a leading "_")."""
    name = be.runtime_dir(instance_name(model_id)).removeprefix("llamad/")
    return f"_{name}" if name == INDEX else name


@dataclass(frozen=True)
class UnitParts:
    """What KV persistence adds to a model's unit."""

    args: tuple[str, ...]
    runtime_dir: str  # relative to /run
    bind: tuple[str, str]  # (host directory, directory in the unit)


def unit_parts(config: Config, model: Model) -> UnitParts | None:
    """The flags and bind mount that give the unit its save directory (None: not kept)."""
    if kvpolicy.why_not_kept(config, model, None) is not None:
        return None
    runtime = be.runtime_dir(instance_name(model.id))
    inside = f"/run/{runtime}/kv"
    host = str(config.state_dir / "kv" / dir_name(model.id))
    return UnitParts((SAVE_PATH, inside), runtime, (host, inside))


# -- the cache -------------------------------------------------------------------

@dataclass
class _Live:
    """A ready model llamad may save: where it listens, its key and, until a request shows
    whether its restore took, the tokens of each restored slot not yet used and
    llama-server's counters since the last check."""

    address: str
    key: str
    unchecked: dict[int, int] = field(default_factory=dict)  # slot -> tokens restored
    before: kvpolicy.Counters | None = None
    checking: bool = False


class KvCache(Hook):
    """Saves and restores models' KV caches; one per supervisor, inert with kv-cache = no.

    Which stop saves is known from the state change that began it (`on_change`, a listener,
    hears READY -> STOPPING with its cause before the stop's `before_stop` runs)."""

    def __init__(self, port: Port) -> None:
        config = self.config = port.config
        self.port = port
        self.store: Store | None = None
        self.figures: dict[str, Figures] = {}
        self.stored: dict[str, tuple[int, int]] = {}  # model -> (tokens, bytes) on disk
        self.generation = 0  # bumped on every change of what describe() shows
        # The catalog's test of --swa-full against the memory plan (app.py hands it on).
        self.swa_fits = kvpolicy.swa_full_fits(config, port.measure)
        self._live: dict[str, _Live] = {}  # ready models: where they listen, their key
        self._to_save: set[str] = set()
        self._why_not: dict[str, tuple[Model, str | None]] = {}
        self._keeping: dict[str, asyncio.Task[None]] = {}
        self._checks: set[asyncio.Task[None]] = set()
        if config.kv_cache != "no":
            self.store = self._open(Store(config.state_dir / "kv", 0))
            port.events.subscribe(self.on_change)
        # model -> identity keys whose restore did not take (kept with the index)
        self._broken: dict[str, set[str]] = {}
        if self.store is not None:
            self.store.max_bytes = kvpolicy.disk_budget(config, self.store.root)
            self.stored = self.store.usage()
            self._broken = self.store.broken()

    @staticmethod
    def _open(store: Store) -> Store | None:
        try:
            store.open()
        except OSError as e:
            log.error("KV caches cannot be kept: %s: %s", store.root, e.strerror or e)
            return None
        return store

    def why_not(self, model: Model) -> str | None:
        """None if the model's cache is kept, else why not (cached per Model object: the
        catalog makes a new one when a file or setting changes)."""
        hit = self._why_not.get(model.id)
        if hit is None or hit[0] is not model:
            why = kvpolicy.why_not_kept(self.config, model, self.swa_fits)
            if why is None and self.store is None:
                why = f"{self.config.state_dir / 'kv'} cannot be written"
            if why is None and model.id in self._broken and \
                    identity(self.config, model) in self._broken[model.id]:
                why = BROKEN
            if model.mmproj is not None and why is not None:
                log.info("model %s: its KV cache is not kept across swaps: %s", model.id, why)
            hit = self._why_not[model.id] = (model, why)
        return hit[1]

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

    def describe(self, model: Model) -> dict[str, Any] | None:
        """For GET /v1/models: whether the cache is kept (why not), tokens saved and
        restored since llamad started, and what is on disk now (restored at the next
        load). None with kv-cache = no."""
        if self.config.kv_cache == "no":
            return None
        fig = self.figures.get(model.id, Figures())
        tokens, size = self.stored.get(model.id, (0, 0))
        why = self.why_not(model)
        return {"kept": why is None, "why_not": why,
                "saved_tokens": fig.saved_tokens, "restored_tokens": fig.restored_tokens,
                "restores_failed": fig.restores_failed,
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

    def _learn(self, model_id: str, **changes: Any) -> None:
        assert self.store is not None
        rates = self.store.rates(model_id)
        for name, value in changes.items():
            setattr(rates, name, value)
        self.store.learn(model_id, rates)

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
        if self.store is None or self.why_not(model) is not None:
            return
        deadline = time.monotonic() + self.config.kv_cache_timeout
        await self._guarded(model.id, "restoring", self._restore(model, backend, deadline))

    async def _restore(self, model: Model, backend: be.Backend, deadline: float) -> None:
        assert self.store is not None
        key = await asyncio.to_thread(identity, self.config, model)
        live = self._live[model.id] = _Live(backend.address, key)
        if key in self._broken.get(model.id, ()):
            return
        keeping = self._keeping.get(model.id)
        if keeping is not None:  # the last save is still being checked and indexed
            await asyncio.wait_for(asyncio.shield(keeping), srv.left(deadline))
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
        if any(srv.held(s) for s in await srv.slots(backend, deadline)):
            return  # a process llamad adopted, or one that kept running: it has its cache
        started, done = time.monotonic(), dict[int, int]()
        for e in sorted(fresh, key=lambda e: e.slot):
            if n := await self._restore_one(model, backend, e, deadline):
                done[e.slot] = n
        if not done:
            return
        took = time.monotonic() - started
        log.info("model %s: restored %d cached tokens in %.2fs", model.id, sum(done.values()), took)
        fixed = kvpolicy.RESTORE_FIXED * len(done)
        size = sum(e.bytes for e in fresh if e.slot in done)
        self._learn(model.id, restore=max(0.0, took - fixed) / max(1, size))
        # One slot probed (a restore that does not take fails all alike), where worth its cost.
        probed = max((e for e in fresh if e.slot in done), key=lambda e: done[e.slot])
        if done[probed.slot] < kvprobe.MIN_TOKENS:
            return
        if (found := await kvprobe.judge(backend, probed.slot, self.store.path(probed),
                                         deadline)) is not None:
            if not found[0]:
                return await self._failed(model.id, live, found[1])
            self._figures(model.id).restores_verified += 1
            return
        live.before = await srv.counters(backend, deadline)
        live.unchecked = done if live.before is not None else {}

    async def _restore_one(self, model: Model, backend: be.Backend, e: Entry,
                           deadline: float) -> int:
        assert self.store is not None
        why = await asyncio.wait_for(asyncio.to_thread(self.store.verify, e),
                                     srv.left(deadline))
        if why is None:
            try:
                done = await srv.action(backend, e.slot, "restore", e.file, deadline)
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

    # -- checking: the request after a restore ---------------------------------

    def request_ended(self, slot: Slot) -> None:
        """A request to the model has ended: if its restore is not checked yet, see (in a
        task) whether the requests since took their prompt from the cache."""
        model_id = slot.model.id
        live = self._live.get(model_id)
        if live is None or not live.unchecked or live.checking:
            return
        live.checking = True
        task = asyncio.get_running_loop().create_task(
            self._check(model_id, live), name=f"checking the KV cache restored for {model_id}")
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check(self, model_id: str, live: _Live) -> None:
        backend = be.Backend(live.address)
        deadline = time.monotonic() + CHECK_TIMEOUT
        try:
            # /slots first: a request that ends between the two reads then looks not yet
            # done, never done without its prompt in the counters.
            slots = {s.get("id"): s for s in await srv.slots(backend, deadline)}
            after = await srv.counters(backend, deadline)
        except (KvError, aiohttp.ClientError, OSError, ValueError, TimeoutError) as e:
            log.debug("model %s: GET /slots or /metrics failed: %s", model_id, e)
            return
        finally:
            live.checking = False
            await backend.close()
        if after is not None and live.before is not None and live.unchecked:
            await self._judge(model_id, live, slots, after)

    async def _judge(self, model_id: str, live: _Live, slots: dict[Any, dict[str, Any]],
                     after: kvpolicy.Counters) -> None:
        """Judge the restore by the requests since the last check, if a restored slot served
        one: a request on another slot computes its prompt whatever the restore did."""
        assert live.before is not None
        if any(srv.busy(slots.get(i)) for i in live.unchecked):
            return  # judged once done, with the counters since the last check
        used = {i: n for i, n in live.unchecked.items() if srv.served(slots.get(i))}
        if not used:
            live.before = after
            return
        # A restored slot that now holds fewer tokens than it was given served a shorter,
        # unrelated prompt: only one that holds at least as many can show a failed restore.
        held = [n for i, n in used.items() if srv.held(slots[i]) >= n]
        took = kvpolicy.restore_took(live.before, after, min(held, default=sys.maxsize))
        if took is None:  # these slots tell nothing more; others still may
            live.unchecked = {i: n for i, n in live.unchecked.items() if i not in used}
            live.before = after
        elif took:
            live.unchecked = {}
            self._figures(model_id).restores_verified += 1
        else:
            await self._failed(model_id, live, after.processed - live.before.processed)

    async def _failed(self, model_id: str, live: _Live, computed: float) -> None:
        """A restore that did not take: off for this model and build from now on."""
        assert self.store is not None
        log.warning("model %s: the KV cache it restored did not take: %d prompt "
                    "tokens were computed again, none from the cache; KV caches are no longer "
                    "kept for this model file, arguments and llama-server build",
                    model_id, computed)
        self._figures(model_id).restores_failed += 1
        live.unchecked = {}
        self._broken.setdefault(model_id, set()).add(live.key)
        self._why_not.pop(model_id, None)
        self._learn(model_id, broken=sorted(self._broken[model_id]))
        await self._io(self.store.drop, self.store.entries(model_id))

    # -- saving: before the unit is stopped ------------------------------------

    async def save(self, model: Model) -> None:
        """llamad is about to stop the model's unit: if it stops a ready model for a reason
        it may come back from, save its slots first, within kv-cache-timeout."""
        live = self._live.pop(model.id, None)
        wanted = model.id in self._to_save
        self._to_save.discard(model.id)
        if self.store is None or live is None or not wanted or \
                live.key in self._broken.get(model.id, ()):
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
        slots = [s for s in await srv.slots(backend, deadline) if srv.held(s)]
        if not slots:
            return
        await self._learn_prefill(model.id, backend, deadline)
        # The most recently used first: it is the likeliest to come back.
        slots.sort(key=lambda s: -int(s.get("id_task", 0) or 0))
        for s in slots:
            why = self._not_now(model.id, srv.held(s), deadline)
            if why:
                log.info("model %s: not saving slot %s's KV cache (%d tokens): %s",
                         model.id, s.get("id"), srv.held(s), why)
                continue
            entry = await self._save_one(model, backend, int(s["id"]), key, deadline)
            if entry is not None:
                saved.append(entry)

    async def _learn_prefill(self, model_id: str, backend: be.Backend,
                             deadline: float) -> None:
        """The model's prefill time per token, as its llama-server measured it."""
        try:
            found = await srv.counters(backend, deadline)
        except (aiohttp.ClientError, ValueError) as e:
            log.debug("model %s: no prefill figures: %s", model_id, e)
            return
        if found is not None and found.processed >= kvpolicy.MIN_PREFILL_SAMPLE:
            self._learn(model_id, prefill=found.seconds / found.processed)

    async def _save_one(self, model: Model, backend: be.Backend, slot: int, key: str,
                        deadline: float) -> Entry | None:
        name = f"{time.time_ns() // 1000}-{slot}.bin"
        started = time.monotonic()
        try:
            done = await srv.action(backend, slot, "save", name, deadline)
        except KvError as e:
            log.warning("model %s: saving slot %d's KV cache failed: %s", model.id, slot, e)
            self._discard(model.id, "failed")
            return None
        n, size = int(done.get("n_saved", 0)), int(done.get("n_written", 0))
        if n <= 0 or size <= 0:
            return None
        self._learn(model.id, save=(time.monotonic() - started) / size,
                    bytes_per_token=size / n)
        self._figures(model.id).saved_tokens += n
        return Entry(model.id, dir_name(model.id), name, key, slot, n, size, time.time())

    def _not_now(self, model_id: str, tokens: int, deadline: float) -> str | None:
        """Why a slot of this many tokens should not be saved now, judging by what was
        learned of the model; None when it may be."""
        assert self.store is not None
        rates = self.store.rates(model_id)
        if (why := kvpolicy.worth_saving(rates, tokens)) is not None:
            self._discard(model_id, "not_worth")
            return why
        size = tokens * (rates.bytes_per_token or 0.0)
        seconds = size * (rates.save or 0.0)
        left = deadline - time.monotonic()
        if left <= 0 or seconds > left:
            self._discard(model_id, "skipped")
            return (f"saving it would take about {seconds:.1f}s, more than the "
                    f"{max(0.0, left):.1f}s left of kv-cache-timeout")
        if size > self.store.max_bytes:
            self._discard(model_id, "skipped")
            return f"about {size / MIB:.0f} MiB, more than the disk bound (kv-cache-max-mb)"
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
        # After a save the catalog is surely read (it holds the model just saved).
        await self._io(self.store.keep_only, frozenset(self.port.slots))

    def _kept(self, model_id: str, task: asyncio.Task[None]) -> None:
        if self._keeping.get(model_id) is task:
            del self._keeping[model_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("model %s: keeping its saved KV cache failed: %s", model_id,
                      task.exception())

    def families(self) -> list[Metric]:
        """The /metrics series (kvmetrics.families); none with kv-cache = no."""
        return families(self.figures, self.stored) if self.store is not None else []
