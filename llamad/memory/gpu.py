"""Measured memory: NVIDIA GPUs through NVML (nvidia-ml-py's `pynvml`), system RAM from /proc.

NVML is optional. Without the binding or without a usable GPU, GpuMonitor reports no GPUs, logs
one line saying so, and llamad schedules by system RAM alone.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("llamad.gpu")

PROC = Path("/proc")


@dataclass(frozen=True)
class GpuProcess:
    """A process NVML lists on a GPU; `used` is None where NVML cannot attribute memory
    (some containers and virtual machines)."""

    gpu: int  # NVML index
    pid: int
    used: int | None


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it now."""

    index: int
    name: str
    uuid: str
    total: int  # bytes
    used: int
    free: int


DRIVER = "libnvidia-ml.so.1"  # what pynvml loads on Linux


def _driver() -> bool:
    """The driver's NVML library is here. Without it pynvml is never imported: its 2.4 MB of
    Python objects would stay for the process's life, 5 % of an idle llamad."""
    try:
        ctypes.CDLL(DRIVER)
    except OSError:
        return False
    return True


class GpuMonitor:
    """NVML, opened once. `nvml` is the pynvml module, or a stand-in with the same functions;
    left out, pynvml is imported if installed. `proc`: where to read processes' cgroups."""

    def __init__(self, nvml: Any = None, proc: Path = PROC) -> None:
        self.proc = proc
        self._nvml: Any = None
        self._last_error = ""
        if nvml is None and not _driver():
            log.info("no NVIDIA driver (%s not found): scheduling by system RAM alone", DRIVER)
            return
        try:
            module = nvml if nvml is not None else importlib.import_module("pynvml")
        except ImportError:
            log.info("no NVML binding (pip install nvidia-ml-py): scheduling by system RAM alone")
            return
        try:
            module.nvmlInit()
            count = module.nvmlDeviceGetCount()
        except module.NVMLError as e:
            log.info("no NVIDIA GPU usable (%s): scheduling by system RAM alone", e)
            return
        if count == 0:
            module.nvmlShutdown()
            log.info("NVML sees no GPU: scheduling by system RAM alone")
            return
        self._nvml = module
        log.info("NVML: %d GPU(s), scheduling by VRAM and RAM", count)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def gpus(self) -> tuple[GpuInfo, ...]:
        """Every GPU's memory now; () without NVML or when NVML fails."""
        if self._nvml is None:
            return ()
        nvml = self._nvml
        try:
            out = []
            for i in range(nvml.nvmlDeviceGetCount()):
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
                out.append(GpuInfo(i, _text(nvml.nvmlDeviceGetName(h)),
                                   _text(nvml.nvmlDeviceGetUUID(h)),
                                   int(mem.total), int(mem.used), int(mem.free)))
            return tuple(out)
        except nvml.NVMLError as e:
            self._warn(e)
            return ()

    def unit_processes(self, proc: Path | None = None) -> dict[str, list[GpuProcess]]:
        """NVML's compute processes by the systemd unit they run in; others left out."""
        out: dict[str, list[GpuProcess]] = {}
        for p in self.processes():
            unit = unit_of_pid(p.pid, proc or self.proc)
            if unit is not None:
                out.setdefault(unit, []).append(p)
        return out

    def persistence_off(self) -> list[str]:
        """The GPUs (index and name) whose driver persistence mode NVML reports off: each
        start of a model on one then initialises the GPU first, 1-3 s (nvidia-smi -pm 1,
        or nvidia-persistenced, keeps it ready). Empty without NVML or where it cannot say."""
        if self._nvml is None:
            return []
        nvml, off = self._nvml, []
        try:
            for i in range(nvml.nvmlDeviceGetCount()):
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                if nvml.nvmlDeviceGetPersistenceMode(h) == 0:  # NVML_FEATURE_DISABLED
                    off.append(f"GPU {i} ({_text(nvml.nvmlDeviceGetName(h))})")
        except (nvml.NVMLError, AttributeError):
            return []
        return off

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as e:
                self._warn(e)
            self._nvml = None

    def processes(self) -> list[GpuProcess]:
        """NVML's compute processes on every GPU; [] without NVML or when it fails."""
        if self._nvml is None:
            return []
        nvml = self._nvml
        try:
            out = []
            for i in range(nvml.nvmlDeviceGetCount()):
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(h):
                    used = p.usedGpuMemory
                    out.append(GpuProcess(i, int(p.pid), None if used is None else int(used)))
            return out
        except nvml.NVMLError as e:
            self._warn(e)
            return []

    def _warn(self, e: Exception) -> None:
        # Polled every few seconds: say each distinct failure once, not on every poll.
        if str(e) != self._last_error:
            self._last_error = str(e)
            log.warning("NVML query failed: %s", e)


def unit_of_pid(pid: int, proc: Path = PROC) -> str | None:
    """The systemd service a process runs in, from /proc/<pid>/cgroup; None if none or gone."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    return unit_from_cgroup(text)


def unit_from_cgroup(text: str) -> str | None:
    """The service in a /proc/<pid>/cgroup text: the last path component ending in .service.

    cgroup v2 has one line `0::/path`; v1 and hybrid systems also have systemd's own hierarchy
    `name=systemd`, which is read when the v2 line names no service.
    """
    paths = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths[parts[1]] = parts[2]
    for hierarchy in ("", "name=systemd"):
        units = [c for c in paths.get(hierarchy, "").split("/") if c.endswith(".service")]
        if units:
            return units[-1]
    return None


def mem_available(meminfo: Path = PROC / "meminfo") -> int:
    """Bytes of RAM available for new work without swapping (MemAvailable)."""
    return _meminfo(meminfo, "MemAvailable")


def mem_total(meminfo: Path = PROC / "meminfo") -> int:
    return _meminfo(meminfo, "MemTotal")


def _meminfo(meminfo: Path, key: str) -> int:
    for line in meminfo.read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            return int(rest.split()[0]) * 1024  # the kernel writes kB, meaning KiB
    raise ValueError(f"{meminfo} has no {key}")


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes.
    return value.decode() if isinstance(value, bytes) else value


def vram_by_unit(procs: dict[str, list[GpuProcess]]) -> dict[str, int]:
    """VRAM per systemd unit, summed over GPUs, from `GpuMonitor.unit_processes`. Units
    whose memory NVML cannot attribute (it says None, as in some containers) are left out."""
    return {unit: sum(p.used or 0 for p in found) for unit, found in procs.items()
            if any(p.used is not None for p in found)}
