"""Measurement glue (measure.py) and the supervisor's use of it: sampling, learning, OOM.

systemd is faked at the Units boundary; the property dicts fed to on_unit_change are the ones
systemd sends (Service interface first, then Unit), so the real signal path is exercised.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest
from helpers.h100 import H100, H100_NAME, gemma_info
from helpers.nvml import FakeDevice, FakeNvml, NoNvml
from helpers.supervised import Rig
from pytest_subtests import SubTests
from rig import GEMMA

from llamad.api import report
from llamad.catalog.catalog import Model, scan
from llamad.catalog.presets import ModelSettings
from llamad.config import Config
from llamad.errors import BackendError, Unavailable
from llamad.memory import estimate as memory
from llamad.memory.estimate import memory_limit
from llamad.memory.gpu import GpuMonitor
from llamad.memory.measure import Measure, proc_memory
from llamad.memory.types import Memory
from llamad.supervisor import sampling
from llamad.supervisor.events import State
from llamad.supervisor.slot import Slot
from llamad.supervisor.unitspec import memory_max_props

MIB = 1024**2
GIB = 1024**3


def test_proc_memory_of_this_process() -> None:
    found = proc_memory(os.getpid())
    assert found is not None and 1 * MIB < found.rss <= found.peak


def test_proc_memory_missing_or_kernel_thread(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "status").write_text("Name:\tkthreadd\nState:\tS\n")
    assert proc_memory(7, tmp_path) is None
    assert proc_memory(8, tmp_path) is None


def test_memory_max_props() -> None:
    assert memory_max_props("16G") == [("MemoryMax", b"t", 16 * 1024**3)]
    assert memory_max_props("512M") == [("MemoryMax", b"t", 512 * MIB)]
    assert memory_max_props("1048576") == [("MemoryMax", b"t", MIB)]
    assert memory_max_props("infinity") == [("MemoryMax", b"t", 2**64 - 1)]
    ((name, sig, scale),) = memory_max_props("50%")
    assert (name, sig) == ("MemoryMaxScale", b"u") and abs(scale - 2**31) <= 1


def model(config: Config) -> Model:
    return scan(config).models["tiny"]


def test_learning_is_persisted_and_replaces_the_estimate(tiny_config: Config) -> None:
    m = model(tiny_config)
    meas = Measure(tiny_config, GpuMonitor(nvml=NoNvml()), state_dir=tiny_config.state_dir)
    est = meas.estimate(m)
    assert meas.need(m) == est and est.ram > 0
    assert meas.should_learn(m, 123 * MIB, 1.5)
    meas.learn(m, 123 * MIB, 0, 1.5)
    assert meas.need(m) == Memory(123 * MIB, 0) and meas.estimate(m) == est
    # A sample within 5% of the peak, with the same load time, is no news.
    assert not meas.should_learn(m, 125 * MIB, 1.5)
    assert meas.should_learn(m, 140 * MIB, 1.5) and meas.should_learn(m, 100 * MIB, 2.0)
    again = Measure(tiny_config, GpuMonitor(nvml=NoNvml()), state_dir=tiny_config.state_dir)
    learned = again.learned_for(m)
    assert learned is not None and learned.ram == 123 * MIB and learned.vram is None


async def running(r: Rig, pid: int) -> Slot:
    """Start tiny through the real decision path and drive it to READY by unit signals."""
    slot = r.slot("tiny")
    await r.sup.load(slot)
    await r.started("tiny")
    r.units.active(r.sup, slot.unit, pid)
    # Skip the health probe: nothing listens; mark it ready as _wait_healthy would.
    slot.state, slot.load_seconds = State.READY, 0.5
    return slot


async def test_sample_falls_back_to_rss_and_learns(tiny_config: Config) -> None:
    r = Rig(tiny_config)  # systemd accounts no memory: MemoryCurrent is not set
    sup = r.sup
    slot = await running(r, os.getpid())
    await sampling.sample(sup)
    rss = proc_memory(os.getpid())
    assert rss is not None and slot.used.ram > MIB and slot.peak.ram >= slot.used.ram
    fields = report.describe(sup, slot)
    assert fields["ram"] == slot.used.ram and fields["vram"] is None
    assert fields["estimate"]["ram"] > 0 and fields["load_seconds"] == 0.5
    learned = sup.measure.learned_for(slot.model)
    assert learned is not None and learned.ram == slot.peak.ram and learned.load_seconds == 0.5
    assert report.status(sup)["gpus"] == []
    await sup.close()


async def test_sample_prefers_memory_current(tiny_config: Config) -> None:
    r = Rig(tiny_config)
    r.units.memory_current = 300 * MIB
    sup = r.sup
    slot = await running(r, os.getpid())
    await sampling.sample(sup)
    assert slot.used == Memory(300 * MIB, 0)
    assert report.describe(sup, slot)["ram"] == 300 * MIB
    await sup.close()


async def test_memory_limit_estimate_sets_memory_max(tiny_config: Config) -> None:
    """MemoryMax leaves room for the prompt cache at the bound llamad gives it: llama-server
    fills it as distinct prompts come, and a limit without it OOM-kills a model in use."""
    from dataclasses import replace
    sup = Rig(replace(tiny_config, memory_limit="estimate")).sup
    slot = sup.slots["tiny"]
    spec, _ = sup.spec(slot)
    est = sup.measure._estimate(slot.model)  # type: ignore[attr-defined]
    cache = -(-(est.kv.ram + est.kv.vram) // MIB)  # the KV cache's size, in whole MiB
    assert spec.argv[spec.argv.index("--cache-ram") + 1] == str(cache)
    assert spec.memory_max == memory_limit(est) + cache * MIB > est.total.ram
    # A preset's own bound is kept, and planned for; -1 (unbounded) has no bound to plan.
    for given, room in (("64", 64 * MIB), ("0", 0), ("-1", 0)):
        mine = Rig(replace(tiny_config, memory_limit="estimate", args=("-cram", given))).sup
        spec, _ = mine.spec(mine.slots["tiny"])
        assert spec.argv.count("--cache-ram") + spec.argv.count("-cram") == 1, spec.argv
        assert spec.memory_max == memory_limit(est) + room, given
        await mine.close()
    await sup.close()


def test_memory_max_makes_room_for_context_checkpoints(tmp_path: Path) -> None:
    """Without --swa-full Gemma keeps up to --ctx-checkpoints copies of its sliding-window
    cache per slot (test_memory.py checks each copy's size against llama-server); with
    memory-limit = estimate they must fit under MemoryMax, or a long conversation on every
    slot OOM-kills the model. With --swa-full llama-server makes none."""
    meas = Measure(Config.default(), GpuMonitor(nvml=NoNvml()), state_dir=tmp_path)
    base = "-c 8192 -np 4 --cache-ram 0"
    full = meas.derived_limit(gemma(base + " --swa-full"))
    plain, few = (meas.derived_limit(gemma(base + more)) for more in ("", " -ctxcp 2"))
    assert full is not None and plain is not None and few is not None
    est, est_full = (meas._estimate(gemma(a)) for a in (base, base + " --swa-full"))
    assert est is not None and est_full is not None
    assert plain == memory_limit(est) + 4 * 32 * 15 * MIB  # slots x checkpoints x 15 MiB
    assert few == memory_limit(est) + 4 * 2 * 15 * MIB
    assert full == memory_limit(est_full)


def test_the_prompt_cache_is_the_kv_cache_at_most_llama_cpps_default() -> None:
    gemma = gemma_info()
    # 3 full layers x 4096 cells + 15 sliding-window layers x 2560 cells, 3 KiB a cell.
    assert memory.prompt_cache_mib(gemma, ["--ctx-size", "4096"]) == 50
    assert memory.prompt_cache_mib(gemma, ["--ctx-size", "4096", "-ctk", "q8_0",
                                           "-ctv", "q8_0"]) == 27
    big = dataclasses.replace(gemma, block_count=80, context_length=131072, head_count_kv=8)
    assert memory.prompt_cache_mib(big, ["--ctx-size", "0", "--swa-full"]) == 8192


async def test_oom_kill_fails_the_model_and_cancels_the_restart(tiny_config: Config) -> None:
    r = Rig(tiny_config)
    sup, units = r.sup, r.units
    slot = await running(r, 4242)
    # What systemd sends when the kernel OOM-kills the main process of a
    # Restart=on-failure service: the Service interface, then the Unit interface.
    sup.on_unit_change(slot.unit, {"Result": "oom-kill", "ExecMainCode": 2,
                                   "ExecMainStatus": 9, "MainPID": 0})
    sup.on_unit_change(slot.unit, {"ActiveState": "activating", "SubState": "auto-restart"})
    await r.watch.until("the model to fail and its restart to be cancelled",
                        lambda: slot.state is State.FAILED and units.stopped)
    assert slot.state is State.FAILED and slot.reason.startswith("out of memory")
    assert units.stopped == [slot.unit]  # the pending restart is cancelled
    # Our stop lands: the model stays failed, with its reason.
    sup.on_unit_change(slot.unit, {"ActiveState": "inactive", "SubState": "dead"})
    assert slot.state is State.FAILED
    with pytest.raises(Unavailable) as err:
        await sup.acquire(slot)
    assert err.value.status == 503 and "out of memory" in err.value.message
    assert units.started == [slot.unit]  # no restart
    await sup.close()


async def test_request_in_flight_during_an_oom_kill_is_told_so(tiny_config: Config) -> None:
    r = Rig(tiny_config)
    sup = r.sup
    slot = await running(r, 4242)

    async def oom_kill_signals() -> None:
        # Runs once the request's end waits for systemd to say why the backend broke.
        sup.on_unit_change(slot.unit, {"Result": "oom-kill", "ExecMainCode": 2,
                                       "ExecMainStatus": 9})
        sup.on_unit_change(slot.unit, {"ActiveState": "activating", "SubState": "auto-restart"})

    with pytest.raises(Unavailable) as err:
        async with sup.use(slot):
            signals = asyncio.ensure_future(oom_kill_signals())
            # What proxy.forward raises when the killed backend drops the connection.
            raise BackendError("the model's backend failed before answering")
    await signals
    assert err.value.code == "model_failed" and "out of memory" in err.value.message
    assert slot.in_flight == 0
    await sup.close()


# The fixed cost of CUDA per GPU, learned from a load measured through (fake) NVML.

GEMMA_UNIT = "llama-server@gemma.service"


def gemma(args: str, devices: tuple[int, ...] | None = None, split: bool = False) -> Model:
    settings = ModelSettings(args=tuple(args.split()), load_on_startup=False, stop_timeout=None,
                             pin=False, ttl=None, memory_max=None, memory_high=None,
                             devices=devices, split=split, preset_text="")
    return Model("gemma", (), GEMMA_UNIT, GEMMA, (GEMMA,), None, "models_dir", gemma_info(),
                 settings, 0)


def h100(tmp_path: Path, *processes: tuple[int, int | None], gpus: int = 1) -> Measure:
    """Measure over a fake NVML with H100s; `processes` (pid, bytes) run on GPU 0 in the
    Gemma model's unit."""
    proc = tmp_path / "proc"
    for pid, _ in processes:
        (proc / str(pid)).mkdir(parents=True, exist_ok=True)
        (proc / str(pid) / "cgroup").write_text(f"0::/llama-server.slice/{GEMMA_UNIT}\n")
    devices = [FakeDevice(H100_NAME, 80 * GIB, GIB, list(processes) if i == 0 else [])
               for i in range(gpus)]
    return Measure(Config.default(), GpuMonitor(FakeNvml(devices), proc=proc),
                   state_dir=tmp_path / "state")


def test_learned_cuda_cost_brings_every_h100_row_within_2_percent(tmp_path: Path,
                                                                   subtests: SubTests) -> None:
    for first, nvml, *_ in H100:
        with subtests.test(f"first load {first}"):
            where = tmp_path / first.replace(" ", "_")
            meas = h100(where, (4242, nvml * MIB))
            loaded = gemma(first)
            assert meas.vram_by_unit() == {GEMMA_UNIT: nvml * MIB}
            meas.learn(loaded, 800 * MIB, nvml * MIB, 1.7)
            cost = meas.costs.get("GPU-00000000")
            assert cost is not None and 588 * MIB <= cost <= 600 * MIB
            assert meas.need(loaded).vram == nvml * MIB  # the model's own learned figure
            again = h100(where)  # a restarted llamad reads the learned cost back
            for args, measured, *_ in H100:
                for m in (meas, again):
                    assert measured * MIB <= m.estimate(gemma(args)).vram <= 1.02 * measured * MIB


def test_cuda_cost_by_gpu_model_and_spread(tmp_path: Path) -> None:
    meas = h100(tmp_path, (4242, 912 * MIB), gpus=2)
    meas.vram_by_unit()
    meas.learn(gemma("-ngl 99 -c 8192"), 800 * MIB, 912 * MIB, 1.7)
    learned = meas.costs.get("GPU-00000000")
    assert learned is not None and meas.costs.get("GPU-00000001") is None
    # The second H100 has never run a model: the first's figure stands in (same model, same
    # driver), not the default.
    assert meas.costs.get("GPU-00000001", H100_NAME) == learned
    one = meas.estimate(gemma("-ngl 99 -c 1024")).vram
    both = meas.estimate(gemma("-ngl 99 -c 1024", split=True)).vram
    pinned = meas.estimate(gemma("-ngl 99 -c 1024", devices=(0, 1))).vram
    # Spread over both, the second's CUDA cost and the pipeline's copies of the graph's
    # inputs on each (memory/pipeline.py) come on top.
    args = ("-ngl", "99", "-c", "1024")
    pipeline = memory.estimate(gemma_info(), args, gpu=True, n_gpus=2).compute.vram - \
        memory.estimate(gemma_info(), args, gpu=True).compute.vram
    assert pipeline > 0 and both == pinned == one + learned + pipeline


def test_no_vram_is_learned_from_a_cpu_fallback(tmp_path: Path) -> None:
    model = gemma("-ngl 99 -c 8192")
    meas = h100(tmp_path)  # NVML lists no process of the unit: llama-server stayed on the CPU
    assert meas.vram_by_unit() == {}
    meas.learn(model, 1500 * MIB, 0, 1.3)
    assert meas.learned_for(model) is None and meas.costs.get("GPU-00000000") is None
    # NVML lists the process but cannot say how much it holds (some containers): RAM and
    # load time are the plan's; VRAM stays the estimate's.
    attributed = h100(tmp_path / "b", (4242, None))
    assert attributed.vram_by_unit() == {}
    attributed.learn(model, 800 * MIB, 0, 1.7)
    learned = attributed.learned_for(model)
    assert learned is not None and learned.ram == 800 * MIB and learned.vram is None
    assert attributed.need(model).vram == attributed.estimate(model).vram
    assert attributed.costs.get("GPU-00000000") is None


def test_gpu_uuids_name_cards_for_cuda(tmp_path: Path) -> None:
    meas = h100(tmp_path, gpus=2)
    assert meas.gpu_uuids((1,)) == ("GPU-00000001",)
    assert meas.gpu_uuids((0, 1)) == ("GPU-00000000", "GPU-00000001")
    assert meas.gpu_uuids((5,)) == ("5",)  # not known to NVML now: left as CUDA's index
