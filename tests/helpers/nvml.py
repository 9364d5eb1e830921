"""pynvml faked at its boundary: GPUs as the binding reports them, or none at all."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace


class FakeNVMLError(Exception):
    pass


@dataclass
class FakeDevice:
    name: str | bytes
    total: int
    used: int
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    persistence: int = 1  # NVML_FEATURE_ENABLED


class FakeNvml:
    """The part of pynvml that gpu.py calls, over a list of fake devices."""

    NVMLError = FakeNVMLError

    def __init__(self, devices: list[FakeDevice], init_error: str | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.open = False
        self.fail_queries = False
        self.process_queries = 0  # calls that listed processes: tests wait on polls by it
        self.on_query: Callable[[], object] = lambda: None  # called after each of those

    def nvmlInit(self) -> None:
        if self.init_error:
            raise FakeNVMLError(self.init_error)
        self.open = True

    def nvmlShutdown(self) -> None:
        self.open = False

    def nvmlDeviceGetCount(self) -> int:
        if self.fail_queries:
            raise FakeNVMLError("GPU is lost")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeDevice:
        return self.devices[i]

    def nvmlDeviceGetMemoryInfo(self, h: FakeDevice) -> SimpleNamespace:
        return SimpleNamespace(total=h.total, used=h.used, free=h.total - h.used)

    def nvmlDeviceGetName(self, h: FakeDevice) -> str | bytes:
        return h.name

    def nvmlDeviceGetPersistenceMode(self, h: FakeDevice) -> int:
        return h.persistence

    def nvmlDeviceGetUUID(self, h: FakeDevice) -> str:
        return f"GPU-{next(i for i, d in enumerate(self.devices) if d is h):08d}"

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeDevice) -> list[SimpleNamespace]:
        self.process_queries += 1
        self.on_query()
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in h.processes]


class NoNvml:
    """pynvml without a GPU: the RAM-only path."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self) -> None:
        raise self.NVMLError("no driver")
