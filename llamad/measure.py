"""What the scheduler is told about memory: measured free memory and per-model needs.

Glue between the supervisor and memory.py / gpu.py, with short caches so a
decision per request stays cheap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from llamad import gpu, memory
from llamad.catalog import Model
from llamad.config import Config
from llamad.scheduler import GpuFree, Memory, Resources

MIB = 1024 * 1024
KIB = 1024
GPU_CACHE_SECONDS = 0.5
# A learned peak is written again only when a later sample beats it by this much,
# so a slowly growing RSS does not rewrite the state file on every tick.
RELEARN_GROWTH = 1.05


@dataclass(frozen=True)
class ProcMemory:
    """A process's resident memory now and at its peak (VmRSS, VmHWM), bytes."""

    rss: int
    peak: int


def proc_memory(pid: int, proc: Path = gpu.PROC) -> ProcMemory | None:
    """From /proc/<pid>/status; None when the process is gone or unreadable.

    The fallback for systemd's MemoryCurrent, which is unset where the memory controller
    is not systemd's (cgroup v1 hosts, some containers).
    """
    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return None
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * KIB
    if "VmRSS" not in found:
        return None  # a kernel thread or a zombie
    return ProcMemory(found["VmRSS"], found.get("VmHWM", found["VmRSS"]))


class Measure:
    def __init__(self, config: Config, monitor: gpu.GpuMonitor | None = None,
                 state_dir: Path | None = None) -> None:
        self.config = config
        self.monitor = monitor if monitor is not None else gpu.GpuMonitor()
        self.learned = memory.LearnedStore(state_dir)
        self._needs: dict[tuple[str, tuple[str, ...]], Memory] = {}
        self._gpus: tuple[GpuFree, ...] = ()
        self._gpus_at = 0.0

    def resources(self, config: Config) -> Resources:
        budget = config.memory_budget_mb * MIB if config.memory_budget_mb else None
        return Resources(ram_free=gpu.mem_available(), gpus=self._gpu_free(),
                         reserve=config.memory_reserve_mb * MIB,
                         models_max=config.models_max, ram_budget=budget)

    def _gpu_free(self) -> tuple[GpuFree, ...]:
        if not self.monitor.available:
            return ()
        now = time.monotonic()
        if now - self._gpus_at > GPU_CACHE_SECONDS:
            self._gpus = tuple(GpuFree(g.index, g.free, g.total) for g in self.monitor.gpus())
            self._gpus_at = now
        return self._gpus

    def need(self, model: Model) -> Memory:
        if model.info is None:
            return Memory()
        key = (model.id, model.settings.args)
        found = self._needs.get(key)
        if found is None:
            learned = self.learned.get(model.id, model.settings.args)
            found = memory.need(model.info, model.settings.args, learned,
                                gpu=self.monitor.available)
            self._needs[key] = found
        return found

    def estimate(self, model: Model) -> Memory:
        """The estimate alone (never the learned figure), for showing beside the measurement."""
        if model.info is None:
            return Memory()
        return memory.estimate(model.info, model.settings.args,
                               gpu=self.monitor.available).total

    def learned_for(self, model: Model) -> memory.Learned | None:
        return self.learned.get(model.id, model.settings.args)

    def gpu_list(self) -> tuple[gpu.GpuInfo, ...]:
        return self.monitor.gpus() if self.monitor.available else ()

    def vram_by_unit(self) -> dict[str, int]:
        return self.monitor.per_unit_vram() if self.monitor.available else {}

    def should_learn(self, model: Model, ram: int, load_seconds: float | None) -> bool:
        """Whether a sample is news: nothing learned yet for these arguments, a new load
        time, or a peak clearly above the learned one."""
        old = self.learned_for(model)
        if old is None or not old.ram:
            return ram > 0
        return ram > old.ram * RELEARN_GROWTH or (
            load_seconds is not None and load_seconds != old.load_seconds)

    def learn(self, model: Model, ram: int, vram: int | None, load_seconds: float | None) -> None:
        # Without NVML a VRAM figure of 0 means "not measured", not "none used".
        vram = vram if self.monitor.available else None
        self.learned.record(model.id, model.settings.args, ram=ram, vram=vram,
                            load_seconds=load_seconds)
        self._needs.pop((model.id, model.settings.args), None)
