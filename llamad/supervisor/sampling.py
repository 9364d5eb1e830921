"""Measuring running models, once per daemon tick (never on a request)."""

from __future__ import annotations

from llamad.memory.measure import proc_memory
from llamad.memory.types import Memory
from llamad.supervisor.events import State
from llamad.supervisor.supervisor import Supervisor
from llamad.systemd.units import UnitError


async def sample(sup: Supervisor) -> None:
    """Measure each running model; the daemon's tick calls this, never a request.

    RAM is systemd's MemoryCurrent of the unit, or the main process's RSS where systemd
    does not account memory (cgroup v1); VRAM is NVML's figure for the unit's processes.
    """
    vram = sup.measure.vram_by_unit()
    running = (State.STARTING, State.LOADING, State.READY, State.SLEEPING)
    for slot in [s for s in sup.loaded() if s.main_pid and s.state in running]:
        pid, epoch = slot.main_pid, slot.epoch
        ram, peak = await _ram(sup, slot.unit, pid)
        if slot.main_pid != pid or slot.epoch != epoch:
            # It stopped, restarted, fell asleep or woke meanwhile: the sample may be
            # another state's (an asleep figure must not stand for an awake model).
            continue
        if slot.sampled_pid != pid:
            slot.sampled_pid, slot.peak = pid, Memory()
        now = Memory(ram, vram.get(slot.unit, 0))
        slot.peak = Memory(max(slot.peak.ram, peak), max(slot.peak.vram, now.vram))
        # Only a ready model's figure stands in for its need: one taken mid-load is
        # too low, and the scheduler would fit a second model beside it. A sleeping
        # one's is what it holds asleep: what it freed counts as free.
        slot.used = now if slot.state in (State.READY, State.SLEEPING) else Memory()
        if slot.state is State.READY and sup.measure.should_learn(
                slot.model, slot.peak.ram, slot.load_seconds):
            sup.measure.learn(slot.model, slot.peak.ram, slot.peak.vram,
                               slot.load_seconds)

async def _ram(sup: Supervisor, unit: str, pid: int) -> tuple[int, int]:
    """Bytes (now, peak) of one model's unit; zeros when nothing can be read."""
    try:
        current = (await sup.units.status(unit)).memory_current
    except UnitError:
        current = None
    if current is not None:
        return current, current
    proc = proc_memory(pid)
    return (proc.rss, proc.peak) if proc is not None else (0, 0)
