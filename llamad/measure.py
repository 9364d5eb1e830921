"""What the scheduler is told about memory: measured free memory and per-model needs.

Glue between the supervisor and memory.py / gpu.py, with short caches so a
decision per request stays cheap.
"""

from __future__ import annotations

import time
from pathlib import Path

from llamad import gpu, memory
from llamad.catalog import Model
from llamad.config import Config
from llamad.scheduler import GpuFree, Memory, Resources

MIB = 1024 * 1024
GPU_CACHE_SECONDS = 0.5


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

    def learn(self, model: Model, ram: int, vram: int | None, load_seconds: float | None) -> None:
        self.learned.record(model.id, model.settings.args, ram=ram, vram=vram,
                            load_seconds=load_seconds)
        self._needs.pop((model.id, model.settings.args), None)
