"""Figures learned from real loads, kept in the state directory across restarts.

- `LearnedStore` (learned.json): per model and argument list, the peak RAM and VRAM and the
  load time. They replace the estimate for the same model and arguments.
- `GpuCosts` (gpu-costs.json): per GPU (by UUID), the fixed cost of a CUDA process there
  (NVML's figure for a loaded model minus the buffers llama.cpp allocated for it), which
  replaces memory.CUDA_FIXED in every estimate for that GPU.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from llamad.sizes import MIB
from llamad.statefile import read_json, write_json

log = logging.getLogger("llamad.learned")

# Added to an observed fixed cost: NVML's figure for the same process moves by a few MiB
# from load to load, and grows by 2 MiB at the first request (H100, driver 580).
GPU_COST_MARGIN = 8 * MIB


@dataclass(frozen=True)
class Learned:
    """Measured on a real load: peak RAM (systemd's MemoryPeak of the unit), peak VRAM (None
    where the GPU could not attribute memory to the process) and seconds from start to ready."""

    ram: int = 0
    vram: int | None = None
    load_seconds: float | None = None


class LearnedStore:
    """Learned figures per model and arguments, in memory and, given a state dir, in a JSON file.

    Arguments are part of the key because context size, offload and cache type change memory.
    Pass the model's own llama-server arguments, not the per-run socket path or port.
    """

    FILE = "learned.json"

    def __init__(self, state_dir: Path | None = None) -> None:
        self._path = state_dir / self.FILE if state_dir is not None else None
        self._entries: dict[str, Learned] = self._read()

    @staticmethod
    def key(model: str, args: Sequence[str]) -> str:
        digest = hashlib.sha256("\0".join(args).encode()).hexdigest()[:16]
        return f"{model}#{digest}"

    def get(self, model: str, args: Sequence[str]) -> Learned | None:
        return self._entries.get(self.key(model, args))

    def record(self, model: str, args: Sequence[str], *, ram: int = 0, vram: int | None = None,
               load_seconds: float | None = None) -> Learned:
        """Fold in a measurement: memory keeps its peak, the load time its latest value."""
        key = self.key(model, args)
        old = self._entries.get(key, Learned())
        new = Learned(
            ram=max(old.ram, ram),
            vram=old.vram if vram is None else max(old.vram or 0, vram),
            load_seconds=old.load_seconds if load_seconds is None else load_seconds,
        )
        if new != old:
            self._entries[key] = new
            if self._path is not None:
                write_json(self._path, {"version": 1, "models": {
                    k: asdict(v) for k, v in sorted(self._entries.items())}},
                    "learned memory figures", indent=1)
        return new

    def _read(self) -> dict[str, Learned]:
        raw = read_json(self._path, "learned memory figures")
        try:
            return {k: Learned(int(v["ram"]), _opt_int(v.get("vram")), _opt_float(
                v.get("load_seconds"))) for k, v in raw["models"].items()} if raw else {}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring learned memory figures in %s: %s", self._path, e)
            return {}


@dataclass(frozen=True)
class GpuCost:
    """The fixed memory a CUDA process takes on one GPU, as learned."""

    name: str  # the GPU's model, e.g. "NVIDIA H100 80GB HBM3"
    fixed: int  # bytes


class GpuCosts:
    """The fixed cost of a CUDA process per GPU UUID, learned from loads and kept in a file."""

    FILE = "gpu-costs.json"

    def __init__(self, state_dir: Path | None = None) -> None:
        self._path = state_dir / self.FILE if state_dir is not None else None
        self._costs: dict[str, GpuCost] = self._read()

    def get(self, uuid: str, name: str = "") -> int | None:
        """This GPU's learned cost, else one learned on another GPU of the same model (same
        driver: one machine), else None."""
        found = self._costs.get(uuid)
        if found is None and name:
            same = [c.fixed for c in self._costs.values() if c.name == name]
            return max(same) if same else None
        return found.fixed if found is not None else None

    def record(self, uuid: str, name: str, observed: int) -> int:
        """Fold in one observation (NVML minus llama.cpp's buffers): the learned cost keeps its
        peak, with a margin, so a load whose buffers were over-estimated cannot lower it."""
        old = self._costs.get(uuid)
        fixed = max(observed + GPU_COST_MARGIN, old.fixed if old else 0)
        if old is None or fixed != old.fixed:
            self._costs[uuid] = GpuCost(name, fixed)
            log.info("learned the fixed cost of a CUDA process on %s (%s): %.1f MiB",
                     uuid, name, fixed / MIB)
            if self._path is not None:
                write_json(self._path, {"version": 1, "gpus": {
                    k: asdict(v) for k, v in sorted(self._costs.items())}}, "learned GPU costs",
                    indent=1)
        return fixed

    def _read(self) -> dict[str, GpuCost]:
        raw = read_json(self._path, "learned GPU costs")
        try:
            return {k: GpuCost(str(v["name"]), int(v["fixed"]))
                    for k, v in raw["gpus"].items()} if raw else {}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring learned GPU costs in %s: %s", self._path, e)
            return {}


def _opt_int(v: object) -> int | None:
    return None if v is None else int(str(v))


def _opt_float(v: object) -> float | None:
    return None if v is None else float(str(v))
