"""What the scheduler is told about memory: measured free memory and per-model needs.

Glue between the supervisor and memory.py / gpu.py, with short caches so a
decision per request stays cheap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from llamad.catalog import argv
from llamad.catalog import rpcargs as rpc
from llamad.catalog.catalog import Model
from llamad.config import Config
from llamad.memory import estimate as memory
from llamad.memory import fit, gpu, learned, overrides
from llamad.memory.types import GpuFree, Memory, Resources
from llamad.sizes import MIB

KIB = 1024
GPU_CACHE_SECONDS = 0.5
# A learned peak is written again only when a later sample beats it by this much,
# so a slowly growing RSS does not rewrite the state file on every tick.
RELEARN_GROWTH = 1.05
# An observed fixed CUDA cost outside this range says more about the estimate of that
# model's buffers (unusual placement flags) than about the GPU: it is not learned.
PLAUSIBLE_CUDA_FIXED = (64 * MIB, 4096 * MIB)
MAX_PRICES = 20_000  # needs kept for fitting candidates before the cache starts afresh
# With any of these the preset leaves fitting to llama-server, or places layers itself.
FIT_FLAGS = ("--fit", "--fit-target", "--fit-ctx")
PLACING = ("--n-gpu-layers", "--override-tensor", "--n-cpu-moe", "--cpu-moe", "--n-cpu-ffn",
           "--tensor-split")


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
        self.learned = learned.LearnedStore(state_dir)
        self.costs = learned.GpuCosts(state_dir)
        self._needs: dict[tuple[object, ...], Memory] = {}
        self._gpus: tuple[gpu.GpuInfo, ...] = ()
        self._gpus_at = 0.0
        self._procs: dict[str, list[gpu.GpuProcess]] = {}
        self._short: dict[str, int] = {}  # model id: VRAM a failed load needed beyond the plan
        # Bumped whenever need() may answer otherwise for the same Model: what
        # listing.py's cache of unloaded models' entries is keyed by, instead of need().
        self.generation = 0
        self._fitted: dict[str, tuple[str, ...]] = {}  # model id: what fitting added (fit.py)
        self._attributed = False  # NVML has named a process of some unit

    def resources(self, config: Config) -> Resources:
        budget = config.memory_budget_mb * MIB if config.memory_budget_mb else None
        return Resources(ram_free=gpu.mem_available(), gpus=self._gpu_free(),
                         reserve=config.memory_reserve_mb * MIB,
                         models_max=config.models_max, ram_budget=budget)

    def _gpu_free(self) -> tuple[GpuFree, ...]:
        return tuple(GpuFree(g.index, g.free, g.total) for g in self.gpu_list())

    def need(self, model: Model) -> Memory:
        """What the scheduler plans with for the model as it runs (or would, unfitted)."""
        return self._need(model, self.run_args(model))

    def floor(self, model: Model) -> Memory:
        """The part of need() a load cannot do without: less the file pages the kernel
        may drop and read again (memory.needs), for a model larger than the RAM free."""
        return self._floor(model, self.run_args(model))

    def _need(self, model: Model, args: tuple[str, ...]) -> Memory:
        # Whatever the need is computed from: a file replaced under the same arguments,
        # or a preset's new memory-need, must not meet an old figure.
        key = (model.id, args, model.info, model.draft, model.settings.memory_need,
               overrides.adapter_bytes(args))
        found = self._needs.get(key)
        if found is None:
            found = self._priced(model, args)[0]
            if len(self._needs) > MAX_PRICES:
                self._needs.clear()
            self._needs[key] = found
        return self._short_of(model, found)

    def _floor(self, model: Model, args: tuple[str, ...]) -> Memory:
        # Not kept beside each need (0.6 MB at 1,000 models): asked for only on the way to
        # refusing a model (Fitter.relaxed), where computing it again costs nothing.
        return self._short_of(model, self._priced(model, args)[1])

    def _priced(self, model: Model, args: tuple[str, ...]) -> tuple[Memory, Memory]:
        """(need, floor) for these arguments, computed."""
        if model.info is None:
            return Memory(), Memory()
        if rpc.workers(args):
            # The local share alone, never a learned peak: that counts file pages of the
            # workers' share which passed through once while loading (memory.estimate_rpc).
            local = Memory(memory.estimate_rpc(model.info, args).total.ram)
            return local, local
        fixed, n_gpus = self._cuda(model)
        need, floor = memory.needs(
            model.info, args, self.learned.get(model.id, args), gpu=self.monitor.available,
            cuda_fixed=fixed, n_gpus=n_gpus, draft=model.draft,
            adapters=overrides.adapter_bytes(args))
        given = model.settings.memory_need  # the preset's figure beats the estimate
        if given is not None:
            need = Memory(need.ram if given[0] is None else given[0],
                          need.vram if given[1] is None else given[1])
            floor = Memory(floor.ram if given[0] is None else given[0], need.vram)
        return need, floor

    def _short_of(self, model: Model, found: Memory) -> Memory:
        short = self._short.get(model.id, 0)
        return Memory(found.ram, found.vram + short) if short else found

    def run_args(self, model: Model) -> tuple[str, ...]:
        """The model's arguments with what fitting added for the unit it runs in."""
        return (*model.settings.args, *self._fitted.get(model.id, ()))

    def fitted(self, model: Model, args: tuple[str, ...] | None) -> None:
        """The model now runs with these arguments added by fitting (None: it stopped)."""
        self.generation += 1
        if args:
            self._fitted[model.id] = args
        else:
            self._fitted.pop(model.id, None)

    def fitter(self, model: Model) -> fit.Fitter | None:
        """How fitting may change this model (context, layers), pricing each candidate as
        need() would; None where it changes nothing: the arguments set both, the preset
        gives memory-need or asks llama-server's own fitting, no metadata, RPC workers."""
        info, args = model.info, model.settings.args
        if info is None or rpc.workers(args) or model.settings.memory_need is not None \
                or any(argv.has(args, flag) for flag in FIT_FLAGS):
            return None
        s = memory.parse_args(args)
        unified = s.kv_unified if s.kv_unified is not None else s.parallel is None
        streams = 1 if unified else (s.parallel or 4)
        trained = overrides.header(info, s).context_length or 0  # as --override-kv sets it
        most = trained * streams
        # -c 0 asks for the whole trained context (of each slot): llama.cpp's own fitting
        # never reduces it (common/arg.cpp), and neither does llamad, nor ctx-max.
        whole = s.ctx_size == 0 and argv.has(args, "--ctx-size")
        preset = model.settings.ctx_max
        cap = 0 if whole else self.config.ctx_max if preset is None else preset
        capped = bool(cap) and cap < most
        if capped:
            step = fit.STEP * streams
            most = max(step, cap // step * step)
        places = any(argv.has(args, flag) for flag in PLACING) or s.split_mode == "row"
        layers = info.block_count or 0 if self.monitor.available and not places else 0
        table = getattr(info, "tensors", None)
        shape = fit.Shape(
            trained=trained, most=most,
            least=most if whole else min(self.config.fit_min_ctx * streams, most),
            streams=streams, fit_ctx=s.ctx_size == 0 and not s.kv_per_slot and trained > 0,
            layers=layers, experts=bool(table is not None and any(table.experts)),
            capped=capped)
        if not shape.fit_ctx and not shape.layers:
            return None
        return fit.Fitter(shape, lambda extra: self._need(model, (*args, *extra)),
                          lambda extra: self._floor(model, (*args, *extra)))

    def at_least(self, model: Model, vram: int) -> None:
        """A load ran out of GPU memory: plan this much VRAM at least (and as much more
        for any other arguments fitting tries) until one succeeds, and decide its retry on
        fresh figures."""
        planned = self.need(model).vram - self._short.get(model.id, 0)
        self._short[model.id] = max(vram - planned, self._short.get(model.id, 0))
        self.generation += 1
        self._gpus_at = 0.0

    def estimate(self, model: Model) -> Memory:
        """The estimate alone (never the learned figure), for showing beside the measurement."""
        est = self._estimate(model)
        if est is not None and rpc.workers(model.settings.args):
            return Memory(est.total.ram)  # the workers' share is no local GPU's (rpc.describe)
        return est.total if est is not None else Memory()

    def _estimate(self, model: Model, cuda_fixed: int | None = None) -> memory.Estimate | None:
        if model.info is None:
            return None
        args = self.run_args(model)
        if rpc.workers(args):
            return memory.estimate_rpc(model.info, args)
        fixed, n_gpus = self._cuda(model)
        return memory.estimate(model.info, args, gpu=self.monitor.available,
                               cuda_fixed=fixed if cuda_fixed is None else cuda_fixed,
                               n_gpus=n_gpus, draft=model.draft,
                               adapters=overrides.adapter_bytes(args))

    def derived_limit(self, model: Model) -> int | None:
        """MemoryMax for memory-limit = estimate (memory.memory_limit); None without metadata."""
        est = self._estimate(model)
        if est is None or model.info is None:
            return None
        found = self.learned_for(model)
        caches = self.prompt_cache(model)[0] * MIB + memory.checkpoints(model.info,
                                                                        self.run_args(model))
        return memory.memory_limit(est, found.ram if found is not None else 0, caches)

    def prompt_cache(self, model: Model) -> tuple[int, tuple[str, ...]]:
        """(MiB llama-server's prompt cache may fill, the arguments llamad adds to bound it):
        the preset's --cache-ram if it sets one (-1, unbounded, counts as 0: no bound to
        plan for), else llamad's (memory.prompt_cache_mib)."""
        args = self.run_args(model)
        given = memory.parse_args(args).cache_ram
        if given is not None:
            return max(0, given), ()
        mib = memory.prompt_cache_mib(model.info, args) if model.info is not None else 0
        return mib, ("--cache-ram", str(mib)) if mib else ()

    def _cuda(self, model: Model) -> tuple[int, int]:
        """(fixed CUDA cost per GPU, GPUs the model spreads over): the highest cost among
        the GPUs it may land on, learned or the default. `-sm none` keeps it on one GPU;
        `-ts` spreads it over as many as it gives shares to."""
        gpus = self.gpu_list()
        devices = model.settings.devices or ()
        candidates = [g for g in gpus if g.index in devices] if devices else list(gpus)
        costs = [self.costs.get(g.uuid, g.name) for g in candidates]
        fixed = max((c if c is not None else memory.CUDA_FIXED for c in costs),
                    default=memory.CUDA_FIXED)
        s = memory.parse_args(model.settings.args)
        shares = sum(1 for x in s.tensor_split if x > 0)
        if s.split_mode == "none":
            return fixed, 1
        if shares > 1:
            return fixed, min(shares, len(candidates) or shares)
        spread = model.settings.split or len(devices) > 1
        return fixed, (len(candidates) or 1) if spread else 1

    def learned_for(self, model: Model) -> learned.Learned | None:
        """What was learned for the model as it runs now, else as its own arguments ran
        (a load time hardly depends on the context fitting chose)."""
        return self.learned.get(model.id, self.run_args(model)) or \
            self.learned.get(model.id, model.settings.args)

    def gpu_list(self) -> tuple[gpu.GpuInfo, ...]:
        """NVML's GPUs, at most GPU_CACHE_SECONDS old: a decision per request stays cheap."""
        if not self.monitor.available:
            return ()
        now = time.monotonic()
        if now - self._gpus_at > GPU_CACHE_SECONDS:
            self._gpus = self.monitor.gpus()
            self._gpus_at = now
        return self._gpus

    def gpu_uuids(self, indices: tuple[int, ...]) -> tuple[str, ...]:
        """NVML's UUIDs of these GPUs, for CUDA_VISIBLE_DEVICES: CUDA numbers GPUs fastest
        first, NVML by PCI bus, so an index can name another card on a mixed machine.
        An index NVML does not know now stays an index."""
        uuids = {g.index: g.uuid for g in self.gpu_list()}
        return tuple(uuids.get(i, str(i)) for i in indices)

    def vram_by_unit(self) -> dict[str, int]:
        if not self.monitor.available:
            return {}
        self._procs = self.monitor.unit_processes()
        self._attributed = self._attributed or bool(self._procs)
        return gpu.vram_by_unit(self._procs)

    def on_gpu(self, unit: str) -> bool:
        """Whether NVML listed any process of the unit at the last vram_by_unit()."""
        return unit in self._procs

    def attributes_processes(self) -> bool:
        """Whether NVML has named a process of any unit since llamad started: where it
        cannot (some containers), a unit it does not list proves nothing."""
        return self._attributed

    def vram_units(self) -> set[str]:
        """Units NVML lists a process of now (their memory is not free yet)."""
        return set(self.monitor.unit_processes()) if self.monitor.available else set()

    def should_learn(self, model: Model, ram: int, load_seconds: float | None) -> bool:
        """Whether a sample is news: nothing learned yet for these arguments, a new load
        time, or a peak clearly above the learned one."""
        old = self.learned.get(model.id, self.run_args(model))
        if old is None or not old.ram:
            return ram > 0
        return ram > old.ram * RELEARN_GROWTH or (
            load_seconds is not None and load_seconds != old.load_seconds)

    def learn(self, model: Model, ram: int, vram: int | None, load_seconds: float | None) -> None:
        if self.monitor.available and not vram and self.estimate(model).vram:
            if not self.on_gpu(model.unit):
                # Planned with VRAM, and NVML lists no process of it: a silent CPU fallback
                # (gpuload fails or flags it). None of its figures are the plan's.
                return
            vram = None  # NVML lists it but cannot say how much it holds
        # Without NVML a VRAM figure of 0 means "not measured", not "none used".
        vram = vram if self.monitor.available else None
        args = self.run_args(model)
        self.learned.record(model.id, args, ram=ram, vram=vram, load_seconds=load_seconds)
        self._needs.clear()  # what is learned for these arguments replaces their estimate
        self.generation += 1
        self._short.pop(model.id, None)
        self._learn_cost(model)

    def _learn_cost(self, model: Model) -> None:
        """The fixed cost of CUDA on the GPU this model runs on alone: what NVML says the
        process holds there, minus the buffers llama.cpp allocates for it (the estimate
        without the fixed cost; exact for weights and KV, the compute graph a bound)."""
        found = self._procs.get(model.unit, [])
        used = [p.used for p in found]
        buffers = self._estimate(model, cuda_fixed=0)
        table = getattr(model.info, "tensors", None)
        if (len({p.gpu for p in found}) != 1 or None in used or buffers is None
                or table is None or not table.layers):
            return
        observed = sum(u or 0 for u in used) - buffers.total.vram
        info = next((g for g in self.gpu_list() if g.index == found[0].gpu), None)
        low, high = PLAUSIBLE_CUDA_FIXED
        if info is None or not low <= observed <= high:
            return
        before = self.costs.get(info.uuid)
        if self.costs.record(info.uuid, info.name, observed) != before:
            self._needs.clear()  # every estimate on this GPU changes
            self.generation += 1
