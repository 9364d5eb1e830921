"""Memory as the scheduler counts it: a model's need, a GPU's free memory, what is free now.

Plain values, shared by the estimates (memory/), the measurements and the scheduler's
decisions (supervisor/scheduler.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Memory:
    """Bytes of system RAM and of GPU memory (vram: the total over the model's GPUs)."""

    ram: int = 0
    vram: int = 0


@dataclass(frozen=True)
class GpuFree:
    """One GPU's free and total memory, as the scheduler counts them."""

    index: int
    free: int
    total: int


@dataclass(frozen=True)
class Resources:
    """Memory measured now, and the operator's limits."""

    ram_free: int
    gpus: tuple[GpuFree, ...] = ()
    reserve: int = 0  # kept free on each device
    models_max: int = 0  # 0 = unlimited
    ram_budget: int | None = None  # cap on the RAM all models together may use
