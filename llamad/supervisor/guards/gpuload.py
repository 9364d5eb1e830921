"""The GPU side of starting a model: what its unit is told, and what its load says back.

- `cuda_env`: CUDA_VISIBLE_DEVICES with the planned GPUs by UUID, empty when none is planned
  (llama-server otherwise opens a 518-546 MiB CUDA context on GPU 0 that no plan counted).
- `fit_args`: `-fit off` when llamad placed the model from its own estimate; llama.cpp's fit
  step costs 0.5-0.7 s of every start on a GPU and only repeats what the scheduler decided.
- `GpuGuard`, a listener of the supervisor's state changes: a load that died for want of GPU
  memory is retried once, through the scheduler, with its need raised, so idle models are
  evicted by the policy; a model planned with VRAM that comes up with none (llama-server's
  silent CPU fallback) is failed, or flagged, with the journal's reason.
- `GpuGuard.wait_freed`: after stopping models, wait (bounded) until NVML no longer lists
  them, since the driver frees their memory only then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamad.background import Background
from llamad.catalog import argv
from llamad.catalog.catalog import Model
from llamad.errors import LlamadError
from llamad.sizes import GIB, MIB
from llamad.supervisor.events import Cause, Change, State
from llamad.supervisor.hooks import Hook, Port

if TYPE_CHECKING:
    from llamad.supervisor.slot import Slot
    from llamad.systemd.units import UnitSpec

log = logging.getLogger("llamad.gpuload")

FREE_TIMEOUT = 10.0  # seconds to wait for NVML to stop listing stopped models
POLL = 0.1
LOG_LINES = 200

# llama.cpp's own words (ggml-cuda.cu, ggml-backend.cpp, llama-model.cpp) when CUDA memory
# runs out during a load: a failed cudaMalloc (the buffer is then reported unallocatable), or
# a CUDA call aborting with cudaErrorMemoryAllocation's text, or cuBLAS failing to allocate.
_OOM = re.compile(r"cudaMalloc failed: out of memory|CUDA error: out of memory"
                  r"|(?:failed|unable) to allocate CUDA\d* buffer|CUBLAS_STATUS_ALLOC_FAILED")
_ALLOC = re.compile(r"allocating ([\d.]+) MiB on device (\d+): cudaMalloc failed")
# ...and when it finds no GPU and quietly runs on the CPU (ggml-cuda.cu, common/arg.cpp).
_FALLBACK = re.compile(r"failed to initialize CUDA: .*|no usable GPU found.*")
_FIT_FLAGS = frozenset(argv.canonical(f) for f in ("-fit", "-fitt", "-fitc"))


def cuda_env(uuids: Iterable[str]) -> str:
    """The unit's CUDA_VISIBLE_DEVICES: GPUs by UUID (NVML numbers them by PCI bus, CUDA
    fastest first, so an index can name another card), or empty for a CPU-only plan."""
    return "CUDA_VISIBLE_DEVICES=" + ",".join(uuids)


LOAD_MODE = argv.canonical("--load-mode")
LOAD_MODE_ENV = "LLAMA_ARG_LOAD_MODE"


def load_mode(model: Model, spec: UnitSpec, available: int) -> UnitSpec:
    """The unit as it starts now, with llama-server's --load-mode chosen for this start:
    `dio` (direct I/O, no page cache) when the model's files are larger than the RAM
    `available` for the page cache, where mmap would only push out what other models
    need and read the file twice; llama.cpp's default otherwise. Given through the
    environment (LLAMA_ARG_LOAD_MODE), which is no part of the argv an adopting llamad
    compares: a per-start choice, not the model's identity. A preset's own choice stays."""
    size = model.info.size if model.info is not None else 0
    own = argv.has(model.settings.args, LOAD_MODE) or any(
        e.startswith(LOAD_MODE_ENV + "=") for e in model.settings.env)
    if own or not size or size <= available:
        return spec
    log.info("model %s: its files (%.1f GiB) are larger than the RAM free for the page "
             "cache (%.1f GiB): loading it with --load-mode dio", model.id, size / GIB,
             available / GIB)
    return dataclasses.replace(spec, environment=(*spec.environment, f"{LOAD_MODE_ENV}=dio"))


def fit_args(model: Model) -> tuple[str, ...]:
    """`-fit off` when llamad's own estimate placed the model (it has the metadata, so the
    scheduler fitted layers and context to measured free memory) and the preset leaves
    llama.cpp's fitting alone; with `-fit` options of its own the preset decides."""
    if model.info is None or any(o.name in _FIT_FLAGS for o in argv.walk(model.settings.args)):
        return ()
    return ("-fit", "off")


@dataclass(frozen=True)
class GpuOom:
    """A load that ran out of GPU memory, from llama.cpp's log."""

    line: str  # llama.cpp's line
    size: int = 0  # bytes of the allocation that failed, when it says
    device: int | None = None


def gpu_oom(text: str) -> GpuOom | None:
    """Whether a load log says CUDA memory ran out, and how big the failed allocation was."""
    found = _OOM.search(text)
    if found is None:
        return None
    alloc = _ALLOC.search(text)
    line = _line(text, found.start())
    if alloc is None:
        return GpuOom(line)
    return GpuOom(line, int(float(alloc.group(1)) * MIB), int(alloc.group(2)))


def cpu_fallback(text: str) -> str | None:
    """llama.cpp's line saying it found no usable GPU, if the log has one."""
    found = _FALLBACK.search(text)
    return found.group(0).strip() if found else None


def _line(text: str, at: int) -> str:
    start = text.rfind("\n", 0, at) + 1
    end = text.find("\n", at)
    return text[start:end if end >= 0 else len(text)].strip()


async def journal_lines(unit: str, invocation: str = "") -> str:
    """The unit's recent log (one invocation's where known); '' if it can't be read."""
    argv = ["journalctl", "--no-pager", "-o", "cat", "-n", str(LOG_LINES), "-u", unit]
    if invocation:
        argv.append(f"_SYSTEMD_INVOCATION_ID={invocation}")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(proc.communicate(), 5)
    except (TimeoutError, OSError):
        return ""
    return out.decode(errors="replace")


class GpuGuard(Hook):
    """Watches loads planned on GPUs; owned by the Supervisor, fed by its events."""

    def __init__(self, sup: Port,
                 read_log: Callable[[str, str], Awaitable[str]] = journal_lines) -> None:
        self.sup = sup
        self.read_log = read_log
        self.retried: set[str] = set()  # models reloaded once after running out of VRAM
        self._changed = asyncio.Event()
        self.background = Background()
        sup.events.subscribe(self._on_change)

    def _on_change(self, change: Change) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        slot = self.sup.slots.get(change.model)
        if slot is None:
            return
        if change.new is State.STARTING and change.cause is Cause.CRASH and slot.gpus:
            # It died before or while serving and systemd restarts it: find out why.
            self.background.spawn(self._after_crash(slot, change.old),
                                  f"gpu-crash-{change.model}")
        elif change.new is State.READY and change.cause is not Cause.WAKE:
            self.retried.discard(change.model)  # this load worked: a later one may retry
            if slot.gpus:
                self.background.spawn(self._check_fallback(slot),
                                      f"gpu-fallback-{change.model}")

    async def close(self) -> None:
        await self.background.close()

    # -- a load that ran out of GPU memory ------------------------------------

    async def _after_crash(self, slot: Slot, was: State) -> None:
        oom = gpu_oom(await self.read_log(slot.unit, slot.invocation_id))
        if oom is None or slot.state not in (State.STARTING, State.LOADING):
            return  # another failure: systemd's restarts and start limit deal with it
        model = slot.model
        need = self.sup.measure.need(model)
        if model.id in self.retried:
            self.retried.discard(model.id)
            self.sup.give_up(slot, self._figures(slot, oom, need.vram))
            return
        self.retried.add(model.id)
        # The load needed more than planned: at least the allocation that failed on top.
        self.sup.measure.at_least(model, need.vram + oom.size)
        log.warning("model %s ran out of GPU memory %s (%s); retrying once after evicting "
                    "idle models", model.id, "while loading" if was is State.LOADING
                    else "while serving", oom.line)
        self.sup.reload_later(slot, f"GPU out of memory: {oom.line}")
        if not await self._until(lambda: slot.state is not State.STOPPING,
                                 self.sup.config.stop_timeout + FREE_TIMEOUT):
            return
        now: State = slot.state  # (awaited meanwhile: not what the check above narrowed)
        if now is State.UNLOADED:  # no waiting request has loaded it meanwhile
            try:
                await self.sup.load(slot)
            except LlamadError as e:  # the scheduler says it cannot fit now: say why
                self.sup.give_up(slot, f"out of GPU memory while loading ({oom.line}); "
                                       f"the retry cannot fit: {e.message}")

    def _figures(self, slot: Slot, oom: GpuOom, need: int) -> str:
        gpus = {g.index: g for g in self.sup.measure.gpu_list()}
        free = ", ".join(f"GPU {i} has {gpus[i].free / MIB:.0f} MiB free"
                         for i in slot.gpus if i in gpus)
        asked = f"; the failed allocation asked for {oom.size / MIB:.0f} MiB" if oom.size else ""
        return (f"out of GPU memory while loading, also after evicting idle models and "
                f"retrying: {oom.line}; llamad planned {need / MIB:.0f} MiB of VRAM{asked}"
                f"{'; ' + free if free else ''}")

    # -- a load that quietly stayed on the CPU ---------------------------------

    async def _check_fallback(self, slot: Slot) -> None:
        measure = self.sup.measure
        measure.vram_by_unit()  # NVML's process list now
        if measure.on_gpu(slot.unit) or slot.state is not State.READY:
            return
        said = cpu_fallback(await self.read_log(slot.unit, slot.invocation_id))
        if said is None and not measure.attributes_processes():
            return  # NVML here names no process of any unit: absence proves nothing
        uuids = ", ".join(measure.gpu_uuids(slot.gpus))
        reason = (f"planned on GPU {uuids} but NVML shows no GPU memory for it: "
                  f"llama-server runs on the CPU ({said or 'its log does not say why'})")
        if slot.state is not State.READY:
            return
        if self.sup.config.gpu_fallback == "fail":
            self.sup.give_up(slot, reason)
        else:
            self.sup.degrade(slot, reason)

    # -- stopped models' memory -------------------------------------------------

    async def before_start(self, slot: Slot, evicted: Sequence[str]) -> None:
        if slot.gpus and evicted:  # the driver frees their VRAM a little after they exit
            await self.wait_freed(evicted)

    async def wait_freed(self, units: Iterable[str], timeout: float = FREE_TIMEOUT) -> bool:
        """Wait until NVML lists none of these units' processes (their VRAM is free);
        False after `timeout` seconds, when the load goes ahead anyway."""
        units = set(units)
        measure = self.sup.measure
        deadline = time.monotonic() + timeout
        while units & set(await asyncio.to_thread(measure.vram_units)):
            if time.monotonic() > deadline:
                log.warning("NVML still lists %s %.0f s after the stop; loading anyway",
                            ", ".join(sorted(units)), timeout)
                return False
            await asyncio.sleep(POLL)
        return True

    async def _until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return done()
        return True
