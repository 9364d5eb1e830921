"""GPU placement and load checks (gpuload.py) through the real supervisor and scheduler.

NVML is faked at its boundary (helpers/nvml.py, with processes mapped to units through a
fake /proc), systemd at the Units boundary (helpers/fakesystemd.py), and the journal by a
function returning llama.cpp's own log lines. The property dicts fed to on_unit_change are
the ones systemd sends.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers.ggufgen import write_model
from helpers.nvml import FakeDevice, FakeNvml
from helpers.supervised import Rig

from llamad.catalog.catalog import scan
from llamad.config import Config
from llamad.memory.gpu import GpuMonitor
from llamad.memory.types import Memory
from llamad.supervisor.events import Cause, State
from llamad.supervisor.guards import gpuload
from llamad.supervisor.slot import Slot
from llamad.supervisor.supervisor import Supervisor
from llamad.systemd.units import UnitSpec

MIB, GIB = 1024**2, 1024**3
OOM_LOG = ("load_tensors: offloading 2 repeating layers to GPU\n"
           "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 2048.00 MiB on device 0: "
           "cudaMalloc failed: out of memory\n"
           "alloc_tensor_range: failed to allocate CUDA0 buffer of size 2147483648\n"
           "llama_model_load: error loading model: unable to allocate CUDA0 buffer\n"
           "srv    load_model: failed to load model, '/models/b.gguf'\n")
FALLBACK_LOG = ("ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected\n"
                "warning: no usable GPU found, --gpu-layers option will be ignored\n")


@pytest.fixture
def config(tmp_path: Path) -> Config:
    models = tmp_path / "models"
    for name in ("a", "b", "c"):
        os.utime(write_model(models / f"{name}.gguf"), (0, 0))  # older than the settle window
    preset = tmp_path / "presets.ini"
    preset.write_text("[c]\nn-gpu-layers = 0\n")
    return Config.default(models_dirs=(models,), llama_cache=False, models_preset=preset,
                          state_dir=tmp_path / "state", memory_reserve_mb=0)


class Machine:
    """Two 12 GiB GPUs behind a fake NVML, and the fake /proc its processes map through."""

    def __init__(self, tmp_path: Path) -> None:
        self.proc = tmp_path / "proc"
        self.gpus = [FakeDevice("NVIDIA L40S", 12 * GIB, 0), FakeDevice("NVIDIA L40S", 12 * GIB, 0)]
        self.nvml = FakeNvml(self.gpus)

    def run(self, gpu: int, pid: int, unit: str, used: int | None) -> None:
        (self.proc / str(pid)).mkdir(parents=True, exist_ok=True)
        (self.proc / str(pid) / "cgroup").write_text(f"0::/llama-server.slice/{unit}\n")
        self.gpus[gpu].processes.append((pid, used))
        self.gpus[gpu].used += used or 0

    def exit(self, pid: int) -> None:
        for dev in self.gpus:
            for p, used in [p for p in dev.processes if p[0] == pid]:
                dev.processes.remove((p, used))
                dev.used -= used or 0


def gpu_rig(config: Config, machine: Machine, log: str = "") -> Rig:
    """A supervisor on `machine`'s GPUs whose models' journals hold `log`."""
    r = Rig(config, GpuMonitor(machine.nvml, proc=machine.proc))

    async def journal(unit: str, invocation: str) -> str:
        return log

    r.sup.gpu.read_log = journal
    # NVML is asked from worker threads: the watch wakes on the loop.
    loop = asyncio.get_running_loop()
    machine.nvml.on_query = lambda: loop.call_soon_threadsafe(r.watch.poke)
    return r


async def settled(r: Rig) -> None:
    """Wait until the checks the GPU guard started on a state change have ended (what a
    test asserts afterwards is what they did, or that they left the model alone)."""
    checks = r.sup.gpu.background.tasks
    assert checks, "the GPU guard started no check"
    await asyncio.wait_for(asyncio.gather(*checks), 5)


def env(spec: UnitSpec) -> dict[str, str]:
    return dict(e.split("=", 1) for e in spec.environment)


async def ready(sup: Supervisor, slot: Slot, pid: int) -> None:
    """Drive a started unit to ready with systemd's signals and the health probe's move."""
    sup.on_unit_change(slot.unit, {"MainPID": pid, "InvocationID": bytes([pid % 256]) * 16})
    sup.on_unit_change(slot.unit, {"ActiveState": "active", "SubState": "running"})
    assert slot.state is State.LOADING
    sup.move(slot, State.READY, Cause.HEALTHY)


# -- 2. No unplanned GPU use -------------------------------------------------------------


async def test_units_name_their_gpus_by_uuid_or_get_none(tmp_path: Path, config: Config) -> None:
    machine = Machine(tmp_path)
    machine.run(0, 100, "other.service", 4 * GIB)  # GPU 0 busier: the plan picks GPU 1
    r = gpu_rig(config, machine)
    sup, units = r.sup, r.units
    await sup.load(sup.slots["a"])
    await sup.load(sup.slots["c"])  # its preset says -ngl 0
    await r.watch.until("both started", lambda: len(units.specs) == 2)
    a, c = units.specs["llama-server@a.service"], units.specs["llama-server@c.service"]
    assert sup.slots["a"].gpus == (1,)
    assert env(a)["CUDA_VISIBLE_DEVICES"] == "GPU-00000001"  # NVML's UUID, not CUDA's index
    assert sup.slots["c"].gpus == () and sup.measure.need(sup.slots["c"].model).vram == 0
    assert env(c)["CUDA_VISIBLE_DEVICES"] == "" and c.devices == ()
    await sup.close()


async def test_no_gpu_machine_hides_any_gpu_from_units(config: Config) -> None:
    r = Rig(config)
    sup, units = r.sup, r.units
    await sup.load(sup.slots["a"])
    await r.watch.until("started", lambda: bool(units.specs))
    assert env(units.specs["llama-server@a.service"])["CUDA_VISIBLE_DEVICES"] == ""
    await sup.close()


@pytest.mark.parametrize("setting", ["fail", "degraded"])
async def test_silent_cpu_fallback(tmp_path: Path, config: Config, setting: str) -> None:
    machine = Machine(tmp_path)
    r = gpu_rig(replace(config, gpu_fallback=setting), machine, FALLBACK_LOG)
    sup, units = r.sup, r.units
    slot = sup.slots["a"]
    await sup.load(slot)
    await r.watch.until("started", lambda: bool(units.specs))
    await ready(sup, slot, 4242)  # NVML lists no process of its unit
    await settled(r)
    if setting == "fail":
        assert slot.state is State.FAILED
        await r.watch.until("the stop", lambda: units.stopped)
        assert units.stopped == [slot.unit]
    else:
        assert slot.reason.startswith("degraded")
        assert slot.state is State.READY and units.stopped == []
    assert "planned on GPU GPU-00000000" in slot.reason
    assert "failed to initialize CUDA: no CUDA-capable device is detected" in slot.reason
    # What the sampler would learn from it: nothing (no VRAM of 0, no CPU-sized RAM).
    sup.measure.learn(slot.model, 900 * MIB, 0, 1.3)
    assert sup.measure.learned_for(slot.model) is None
    await sup.close()


async def test_a_model_on_its_gpu_is_left_alone(tmp_path: Path, config: Config) -> None:
    machine = Machine(tmp_path)
    r = gpu_rig(config, machine, FALLBACK_LOG)
    sup, units = r.sup, r.units
    slot = sup.slots["a"]
    await sup.load(slot)
    await r.watch.until("started", lambda: bool(units.specs))
    machine.run(0, 4242, slot.unit, 900 * MIB)
    await ready(sup, slot, 4242)
    await settled(r)
    assert slot.state is State.READY and slot.reason == "" and units.stopped == []
    await sup.close()


async def test_unattributable_nvml_proves_no_fallback(tmp_path: Path, config: Config) -> None:
    """Where NVML names no process of any unit and the log says nothing, absence is no proof."""
    machine = Machine(tmp_path)
    r = gpu_rig(config, machine, "load_tensors: offloaded 3/3 layers to GPU\n")
    sup, units = r.sup, r.units
    slot = sup.slots["a"]
    await sup.load(slot)
    await r.watch.until("started", lambda: bool(units.specs))
    await ready(sup, slot, 4242)
    await settled(r)
    assert slot.state is State.READY and slot.reason == ""
    await sup.close()


# -- 3. -fit off -------------------------------------------------------------------------


def test_fit_off_exactly_when_llamad_placed_the_model(config: Config, subtests) -> None:  # type: ignore[no-untyped-def]
    model = scan(config).models["a"]
    table = [
        ("placed by llamad's estimate", (), ("-fit", "off")),
        ("other flags", ("-c", "4096", "-ngl", "99"), ("-fit", "off")),
        ("the preset turns fitting on", ("-fit", "on"), ()),
        ("the preset turns it off itself", ("-fit", "off"), ()),
        ("a fit target of its own", ("-fitt", "2048"), ()),
        ("a minimum fitted context", ("--fit-ctx", "4096"), ()),
    ]
    for name, args, want in table:
        with subtests.test(name):
            m = replace(model, settings=replace(model.settings, args=args))
            assert gpuload.fit_args(m) == want
    with subtests.test("no metadata: llamad did not size it"):
        assert gpuload.fit_args(replace(model, info=None)) == ()


def test_load_mode_dio_where_the_file_is_larger_than_the_page_cache_may_hold(
        config: Config) -> None:
    model = scan(config).models["a"]
    assert model.info is not None
    size = model.info.size
    spec = UnitSpec("llama-server@a.service", "a", ("llama-server",), ("X=1",))
    assert gpuload.load_mode(model, spec, size) == spec  # it fits: llama.cpp's default
    chosen = gpuload.load_mode(model, spec, size - 1)
    assert chosen.environment == ("X=1", "LLAMA_ARG_LOAD_MODE=dio")
    assert chosen.argv == spec.argv  # no part of what an adopting llamad compares
    for own in (replace(model.settings, args=("--load-mode", "mmap")),
                replace(model.settings, env=("LLAMA_ARG_LOAD_MODE=mlock",))):
        assert gpuload.load_mode(replace(model, settings=own), spec, 0) == spec


async def test_unit_argv_carries_fit_off_and_stays_adoptable(config: Config) -> None:
    sup = Rig(config).sup
    spec, _ = sup.spec(sup.slots["a"])
    i = spec.argv.index("-fit")
    assert spec.argv[i + 1] == "off" and spec.argv.index("--host") > i  # before the listener
    assert sup.spec(sup.slots["a"])[0].argv == spec.argv  # what adoption compares
    await sup.close()


# -- 4. Loads that survive running out of GPU memory ------------------------------------


async def test_gpu_oom_evicts_idle_models_waits_for_freed_vram_and_retries(
        tmp_path: Path, config: Config) -> None:
    machine = Machine(tmp_path)
    machine.gpus[1].used = 12 * GIB  # GPU 1 full: everything goes on GPU 0
    r = gpu_rig(config, machine, OOM_LOG)
    sup, units = r.sup, r.units
    a, b = sup.slots["a"], sup.slots["b"]
    # a: loaded, idle, holding 10 GiB of GPU 0 (what the sampler measured).
    await sup.load(a)
    await r.watch.until("a started", lambda: len(units.started) == 1)
    machine.run(0, 100, a.unit, 10 * GIB)
    await ready(sup, a, 100)
    a.used = Memory(500 * MIB, 10 * GIB)
    # A request for b: 2 GiB free on GPU 0 fits its estimate, so a stays.
    need = sup.measure.need(b.model).vram
    assert need < 2 * GIB
    request = asyncio.ensure_future(sup.acquire(b))
    await r.watch.until("b started", lambda: units.started.count(b.unit) == 1)
    assert b.gpus == (0,) and a.state is State.READY
    sup.on_unit_change(b.unit, {"MainPID": 200, "InvocationID": b"\x02" * 16})
    sup.on_unit_change(b.unit, {"ActiveState": "active", "SubState": "running"})
    # llama-server runs out of CUDA memory and exits; systemd schedules a restart.
    sup.on_unit_change(b.unit, {"Result": "exit-code", "ExecMainCode": 1, "ExecMainStatus": 1,
                                "MainPID": 0})
    sup.on_unit_change(b.unit, {"ActiveState": "activating", "SubState": "auto-restart"})
    await r.watch.until("b stopped to retry", lambda: b.state is State.STOPPING)
    assert units.stopped == [b.unit]  # systemd's own restart is cancelled
    assert sup.measure.need(b.model).vram == need + 2048 * MIB
    sup.on_unit_change(b.unit, {"ActiveState": "inactive", "SubState": "dead"})
    # The retry goes through the scheduler: b needs more than is free now, so the idle a
    # is evicted by the policy.
    await r.watch.until("a evicted", lambda: a.state is State.STOPPING)
    assert b.state is State.STARTING and units.started.count(b.unit) == 1
    sup.on_unit_change(a.unit, {"ActiveState": "inactive", "SubState": "dead"})
    assert a.state is State.UNLOADED  # type: ignore[comparison-overlap]  # changed by the call above
    # a's unit is gone but NVML still lists its process: b waits for its memory.
    polls = machine.nvml.process_queries
    await r.watch.until("NVML asked a few times", lambda: machine.nvml.process_queries > polls + 6)
    assert units.started.count(b.unit) == 1
    machine.exit(100)
    await r.watch.until("b started again", lambda: units.started.count(b.unit) == 2)
    sup.on_unit_change(b.unit, {"MainPID": 201, "InvocationID": b"\x03" * 16})
    sup.on_unit_change(b.unit, {"ActiveState": "active", "SubState": "running"})
    machine.run(0, 201, b.unit, 2600 * MIB)
    sup.move(b, State.READY, Cause.HEALTHY)
    backend = await asyncio.wait_for(request, 5)  # the request that started it all
    assert backend is b.backend and b.in_flight == 1
    sup.release(b)
    await sup.close()


async def test_gpu_oom_twice_fails_with_the_figures(tmp_path: Path, config: Config) -> None:
    machine = Machine(tmp_path)
    r = gpu_rig(config, machine, OOM_LOG)
    sup, units = r.sup, r.units
    b = sup.slots["b"]

    async def load_and_run_out(pid: int) -> None:
        await sup.load(b)
        await r.watch.until("started", lambda: b.state is State.STARTING and b.unit in units.specs)
        sup.on_unit_change(b.unit, {"MainPID": pid, "InvocationID": bytes([pid % 256]) * 16})
        sup.on_unit_change(b.unit, {"ActiveState": "active", "SubState": "running"})
        sup.on_unit_change(b.unit, {"Result": "core-dump", "ExecMainCode": 3,
                                    "ExecMainStatus": 6, "MainPID": 0})
        sup.on_unit_change(b.unit, {"ActiveState": "activating", "SubState": "auto-restart"})

    await load_and_run_out(300)
    await r.watch.until("stopped to retry", lambda: b.state is State.STOPPING)
    sup.on_unit_change(b.unit, {"ActiveState": "inactive", "SubState": "dead"})
    await r.watch.until("loading again", lambda: units.started.count(b.unit) == 2)
    sup.on_unit_change(b.unit, {"MainPID": 301, "InvocationID": b"\x05" * 16})
    sup.on_unit_change(b.unit, {"ActiveState": "active", "SubState": "running"})
    sup.on_unit_change(b.unit, {"Result": "exit-code", "ExecMainCode": 1, "ExecMainStatus": 1,
                                "MainPID": 0})
    sup.on_unit_change(b.unit, {"ActiveState": "activating", "SubState": "auto-restart"})
    await r.watch.until("failed", lambda: b.state is State.FAILED)
    assert units.stopped == [b.unit, b.unit]  # the second restart is cancelled too
    reason = b.reason
    assert reason.startswith("out of GPU memory while loading, also after evicting idle models")
    assert "cudaMalloc failed: out of memory" in reason
    assert "the failed allocation asked for 2048 MiB" in reason
    assert "llamad planned" in reason and "GPU 0 has 12288 MiB free" in reason
    await sup.close()


async def test_a_crash_that_is_no_gpu_oom_is_left_to_systemd(tmp_path: Path,
                                                            config: Config) -> None:
    machine = Machine(tmp_path)
    r = gpu_rig(config, machine, "llama_model_load: error loading model\n")
    sup, units = r.sup, r.units
    b = sup.slots["b"]
    await sup.load(b)
    await r.watch.until("started", lambda: bool(units.specs))
    sup.on_unit_change(b.unit, {"ActiveState": "active", "SubState": "running"})
    sup.on_unit_change(b.unit, {"Result": "exit-code", "ExecMainCode": 1, "ExecMainStatus": 1})
    sup.on_unit_change(b.unit, {"ActiveState": "activating", "SubState": "auto-restart"})
    await settled(r)
    assert b.state is State.STARTING and units.stopped == []  # systemd restarts it
    await sup.close()


async def test_wait_freed_is_bounded(tmp_path: Path, config: Config) -> None:
    machine = Machine(tmp_path)
    machine.run(0, 100, "llama-server@a.service", GIB)
    sup = gpu_rig(config, machine).sup
    start = time.monotonic()
    assert not await sup.gpu.wait_freed(["llama-server@a.service"], timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 3
    machine.exit(100)
    assert await sup.gpu.wait_freed(["llama-server@a.service"], timeout=0.3)
    await sup.close()


def test_llama_cpp_messages(subtests) -> None:  # type: ignore[no-untyped-def]
    table = [
        ("cudaMalloc failed", OOM_LOG, 2048 * MIB, 0),
        ("CUDA abort", "CUDA error: out of memory\n  current device: 1, in function x\n", 0, None),
        ("cuBLAS", "CUDA error: CUBLAS_STATUS_ALLOC_FAILED\n", 0, None),
        ("KV cache", "alloc_tensor_range: failed to allocate CUDA0 buffer of size 1024\n", 0, None),
    ]
    for name, text, size, device in table:
        with subtests.test(name):
            found = gpuload.gpu_oom(text)
            assert found is not None and (found.size, found.device) == (size, device)
            assert found.line in text
    assert gpuload.gpu_oom("llama_model_load: error loading model: tensor data is not "
                           "within the file bounds\n") is None
    assert gpuload.cpu_fallback(FALLBACK_LOG) == (
        "failed to initialize CUDA: no CUDA-capable device is detected")
    assert gpuload.cpu_fallback("load_tensors: offloaded 19/19 layers to GPU\n") is None
