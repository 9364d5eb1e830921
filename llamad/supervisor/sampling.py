"""Measuring running models, once per daemon tick (never on a request). The figures go to
the supervisor through `record_sample`, the one writer of a slot's measurements."""

from __future__ import annotations

from llamad.memory.measure import proc_memory
from llamad.memory.types import Memory
from llamad.supervisor.events import State
from llamad.supervisor.supervisor import Supervisor
from llamad.systemd.units import UnitError


async def sample(sup: Supervisor) -> None:
    """Measure each running model; the daemon's tick calls this, never a request.

    RAM is systemd's MemoryCurrent of the unit (its peak MemoryPeak, systemd 256+), or the
    main process's RSS where systemd does not account memory (cgroup v1); VRAM is NVML's
    figure for the unit's processes.
    """
    vram = sup.measure.vram_by_unit()
    running = (State.STARTING, State.LOADING, State.READY, State.SLEEPING)
    for slot in [s for s in sup.loaded() if s.main_pid and s.state in running]:
        pid, epoch = slot.main_pid, slot.epoch
        ram, peak = await _ram(sup, slot.unit, pid)  # awaited: record_sample checks the pid
        sup.record_sample(slot, pid, epoch, Memory(ram, vram.get(slot.unit, 0)), peak)

async def _ram(sup: Supervisor, unit: str, pid: int) -> tuple[int, int]:
    """Bytes (now, peak) of one model's unit; zeros when nothing can be read."""
    try:
        current, peak = await sup.units.memory(unit)
    except UnitError:
        current = peak = None
    if current is not None:
        # The cgroup's own peak also holds what rose and fell between two samples (a load's
        # compute buffers); before systemd 256 the samples' maximum stands in for it.
        return current, max(peak or current, current)
    proc = proc_memory(pid)
    return (proc.rss, proc.peak) if proc is not None else (0, 0)
