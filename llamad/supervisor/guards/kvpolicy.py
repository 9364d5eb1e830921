"""Which models keep their KV cache across swaps, and which slots are worth keeping.

kv-cache = auto (the default) keeps a model's cache where it pays:

- **Which models.** Every model without a sliding window (keeping costs no memory). A
  sliding-window model (Gemma 2/3, gpt-oss, Cohere 2, ...) only with `--swa-full`, without
  which llama-server restores its cache but never reuses it, and only where the full-size
  cache that flag makes still fits the memory plan (`swa_full_fits`). A model with a
  projector (mmproj) keeps none: llama-server cannot save a slot holding image or audio
  chunks. A model+build whose restore did not take keeps none (`Rates.broken`).
  kv-cache = yes keeps every model's (sliding-window ones get `--swa-full` whatever it
  costs); no keeps none.
- **Which slots.** A slot is saved only when restoring it beats recomputing it: its tokens
  times the model's measured prefill time per token against the bytes it takes times the
  measured restore time per byte, plus a fixed cost per restore (`worth_saving`).
- **How much disk.** kv-cache-max-mb, or by default a tenth of the free space where the
  caches are kept (`disk_budget`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamad.catalog import argv
from llamad.catalog.presets import SWA_FULL
from llamad.config import Config
from llamad.memory import estimate as memory
from llamad.memory.gpu import mem_total
from llamad.sizes import GIB, MIB

if TYPE_CHECKING:
    from llamad.catalog.catalog import Model
    from llamad.supervisor.slot import Measure

# Per restored slot, beyond reading its file: an HTTP round trip to llama-server, opening
# and hashing the file, llama-server validating its tokens. Measured 5-6 ms on a busy
# 2-core machine for small files (docs/benchmarks.md).
RESTORE_FIXED = 0.01
DISK_SHARE = 0.1  # of the free space, with kv-cache-max-mb = 0
# A model's prefill time per token is judged from at least this many prompt tokens.
MIN_PREFILL_SAMPLE = 32


# -- which models ------------------------------------------------------------------

def swa_full_fits(config: Config, measure: Measure) -> Callable[[Any, tuple[str, ...]],
                                                                  str | None]:
    """For the catalog (presets.run_settings): None where a sliding-window model with these
    arguments (--swa-full among them) still fits the memory llamad plans with, else why not.
    The plan: memory-budget-mb, or all RAM less memory-reserve-mb; each GPU's total."""
    reserve = config.memory_reserve_mb * MIB

    def fits(info: Any, args: tuple[str, ...]) -> str | None:
        gpus = measure.gpu_list()
        est = memory.estimate(info, args, gpu=bool(gpus)).total
        ram = config.memory_budget_mb * MIB or max(0, mem_total() - reserve)
        if est.ram > ram:
            return (f"with --swa-full it would need {est.ram / GIB:.1f} GiB of RAM, more than "
                    f"the {ram / GIB:.1f} GiB llamad plans with")
        if est.vram and gpus and est.vram > max(g.total for g in gpus) - reserve:
            return (f"with --swa-full it would need {est.vram / GIB:.1f} GiB of GPU memory, "
                    "more than a GPU has")
        return None
    return fits


def why_not_kept(config: Config, model: Model,
                 swa_fits: Callable[[Any, tuple[str, ...]], str | None] | None) -> str | None:
    """None if the model's cache is kept across swaps, else why not (one sentence)."""
    if config.kv_cache == "no":
        return "kv-cache = no"
    if model.mmproj is not None:
        return ("it has a projector (mmproj): llama-server cannot save a slot that holds "
                "image or audio input")
    info = model.info
    if info is not None and info.sliding_window and not argv.has(model.settings.args, SWA_FULL):
        why = swa_fits(info, (*model.settings.args, SWA_FULL)) if swa_fits else None
        return ("it has a sliding window, and llama-server reuses a restored cache only with "
                "--swa-full" + (f"; {why}" if why else ""))
    return None


# -- which slots -------------------------------------------------------------------

@dataclass
class Rates:
    """Learned per model (kvstore keeps them with the index), like load times."""

    prefill: float | None = None  # seconds per prompt token, llama-server's own figure
    restore: float | None = None  # seconds per byte of a restore (file check included)
    save: float | None = None  # seconds per byte of a save
    bytes_per_token: float | None = None
    broken: list[str] = field(default_factory=list)  # identity keys whose restore failed

    def restore_seconds(self, size: float) -> float:
        """Predicted time to restore a file of `size` bytes: a save's rate before the first
        restore is measured."""
        per_byte = self.restore if self.restore is not None else (self.save or 0.0)
        return RESTORE_FIXED + size * per_byte


def worth_saving(rates: Rates, tokens: int) -> str | None:
    """None if restoring a slot of `tokens` beats recomputing it, else why not. Without a
    measured prefill time it is saved: the save measures what the next decision needs."""
    if rates.prefill is None:
        return None
    recompute = tokens * rates.prefill
    restore = rates.restore_seconds(tokens * (rates.bytes_per_token or 0.0))
    if recompute > restore:
        return None
    return (f"recomputing its {tokens} tokens takes about {recompute * 1000:.1f} ms, "
            f"restoring them {restore * 1000:.1f} ms")


@dataclass(frozen=True)
class Counters:
    """llama-server's own prompt counters since it started (its /metrics)."""

    processed: float  # prompt tokens computed
    cached: float  # prompt tokens taken from the cache
    seconds: float  # spent computing prompts


COUNTERS = {"llamacpp:prompt_tokens_total": "processed",
            "llamacpp:prompt_tokens_cached_total": "cached",
            "llamacpp:prompt_seconds_total": "seconds"}


def counters(text: str) -> Counters | None:
    """The prompt counters in llama-server's /metrics text; None without them."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in COUNTERS:
            try:
                found[COUNTERS[name]] = float(value)
            except ValueError:
                return None
    return Counters(**found) if len(found) == len(COUNTERS) else None


# -- whether a restore took --------------------------------------------------------

def restore_took(before: Counters, after: Counters, restored: int) -> bool | None:
    """Judge restores from llama-server's counters before and after the requests since:
    True if they took cached tokens (only restored slots hold any in a fresh process),
    False if they computed at least as many tokens as the smallest restored slot holds
    with none from the cache (the restore did not take), None while that cannot be told
    (no prompt yet, or a shorter, unrelated one)."""
    cached, processed = after.cached - before.cached, after.processed - before.processed
    if cached > 0:
        return True
    return False if processed >= restored else None


# -- how much disk -----------------------------------------------------------------

def disk_budget(config: Config, root: Path) -> int:
    """Bytes the saved caches may take: kv-cache-max-mb, or a tenth of the free space."""
    if config.kv_cache_max_mb:
        return config.kv_cache_max_mb * MIB
    try:
        st = os.statvfs(root)
    except OSError:
        return 0
    return int(st.f_bavail * st.f_frsize * DISK_SHARE)
