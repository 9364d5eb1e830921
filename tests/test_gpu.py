"""gpu.py against a stand-in for pynvml at its boundary, and against this machine's real /proc."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import rig
from helpers.h100 import H100, gemma_info
from helpers.nvml import FakeDevice, FakeNvml, NoNvml

from llamad.memory import gpu
from llamad.memory.gpu import (
    GpuInfo,
    GpuMonitor,
    mem_available,
    mem_total,
    unit_from_cgroup,
    unit_of_pid,
    vram_by_unit,
)

G = 1024**3


def test_fake_matches_the_real_binding() -> None:
    import pynvml  # here, so the other tests run where nvidia-ml-py is not installed

    names = [n for n in vars(FakeNvml) if n.startswith("nvml") or n == "NVMLError"]
    missing = [n for n in names if not hasattr(pynvml, n)]
    assert names and missing == []


def test_gpus_lists_memory_per_device() -> None:
    fake = FakeNvml([FakeDevice("NVIDIA H100", 80 * G, 10 * G),
                     FakeDevice(b"NVIDIA L4", 24 * G, 0)])
    mon = GpuMonitor(fake)
    assert mon.available
    assert mon.gpus() == (
        GpuInfo(0, "NVIDIA H100", "GPU-00000000", 80 * G, 10 * G, 70 * G),
        GpuInfo(1, "NVIDIA L4", "GPU-00000001", 24 * G, 0, 24 * G),
    )
    mon.close()
    assert not fake.open and not mon.available


def write_proc(root: Path, pid: int, cgroup: str) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "cgroup").write_text(cgroup)


def test_per_unit_vram_maps_processes_to_units(tmp_path: Path) -> None:
    unit_a = "llama-server@gemma\\x2da.service"
    write_proc(tmp_path, 100, f"0::/llama-server.slice/{unit_a}\n")
    write_proc(tmp_path, 101, f"0::/llama-server.slice/{unit_a}\n")
    write_proc(tmp_path, 102, "0::/user.slice/user-0.slice/session-1.scope\n")
    write_proc(tmp_path, 104, "0::/llama-server.slice/llama-server@b.service\n")
    fake = FakeNvml([
        FakeDevice("gpu0", 80 * G, 9 * G, [(100, 3 * G), (102, 1 * G), (103, 5 * G)]),
        FakeDevice("gpu1", 80 * G, 9 * G, [(101, 2 * G), (104, None)]),
    ])
    # 101 is the same unit on the other GPU: summed. 102 is no service, 103 has exited,
    # and NVML could not say what 104 uses.
    assert vram_by_unit(GpuMonitor(fake).unit_processes(tmp_path)) == {unit_a: 5 * G}


def test_failed_init_falls_back_to_ram_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llamad.gpu")
    mon = GpuMonitor(FakeNvml([], init_error="NVML Shared Library Not Found"))
    assert not mon.available
    assert mon.gpus() == () and vram_by_unit(mon.unit_processes()) == {}
    assert [r.getMessage() for r in caplog.records] == [
        "no NVIDIA GPU usable (NVML Shared Library Not Found): scheduling by system RAM alone"]


def test_without_the_driver_pynvml_is_never_imported() -> None:
    """This machine has no NVIDIA driver: an idle llamad keeps no NVML binding in memory."""
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
            "from llamad.memory.gpu import GpuMonitor\n"
            "assert not GpuMonitor().available\n"
            "print(sorted(m for m in sys.modules if 'nvml' in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert (out.stdout, out.stderr) == ("[]\n", "no NVIDIA driver (libnvidia-ml.so.1 not "
                                        "found): scheduling by system RAM alone\n")


def test_zero_gpus_is_ram_only() -> None:
    fake = FakeNvml([])
    mon = GpuMonitor(fake)
    assert not mon.available and not fake.open


def test_query_failure_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNvml([FakeDevice("gpu0", 8 * G, 0, [(1, G)])])
    mon = GpuMonitor(fake)
    fake.fail_queries = True
    caplog.set_level(logging.WARNING, logger="llamad.gpu")
    for _ in range(3):
        assert mon.gpus() == ()
        assert vram_by_unit(mon.unit_processes()) == {}
    assert len(caplog.records) == 1 and "GPU is lost" in caplog.records[0].getMessage()


def test_real_binding_on_this_machine(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llamad.gpu")
    mon = GpuMonitor()
    gpus = mon.gpus()
    if mon.available:  # a machine with an NVIDIA GPU
        assert gpus and all(g.total >= g.free > 0 for g in gpus)
    else:
        assert gpus == () and vram_by_unit(mon.unit_processes()) == {}
        assert len(caplog.records) == 1
        assert "scheduling by system RAM alone" in caplog.records[0].getMessage()
    mon.close()


def test_unit_from_cgroup(subtests) -> None:  # type: ignore[no-untyped-def]
    table = [
        ("v2 service", "0::/system.slice/llamad.service\n", "llamad.service"),
        ("v2 nested slice", "0::/llama-server.slice/llama-server@m.service\n",
         "llama-server@m.service"),
        ("v2 sub-cgroup of a service", "0::/system.slice/x.service/payload\n", "x.service"),
        ("last service wins", "0::/system.slice/box.service/payload/system.slice/in.service\n",
         "in.service"),
        ("scope is no service", "0::/user.slice/user-0.slice/session-3.scope\n", None),
        ("root", "0::/\n", None),
        ("v1 systemd hierarchy", "4:memory:/x\n1:name=systemd:/system.slice/old.service\n",
         "old.service"),
        ("hybrid, unit only in v1 line", "1:name=systemd:/system.slice/h.service\n0::/\n",
         "h.service"),
        ("empty", "", None),
    ]
    for name, text, want in table:
        with subtests.test(name):
            assert unit_from_cgroup(text) == want


def test_unit_of_real_processes() -> None:
    mine = unit_of_pid(os.getpid())
    text = Path(f"/proc/{os.getpid()}/cgroup").read_text()
    assert mine is None or (mine.endswith(".service") and mine in text)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert unit_of_pid(child.pid) == mine  # a child stays in its parent's cgroup
    finally:
        child.kill()
        child.wait()
    assert unit_of_pid(child.pid) is None  # gone


def test_meminfo_real_and_parsed(tmp_path: Path) -> None:
    assert 0 < mem_available() <= mem_total()
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:         1024 kB\n"
                       "MemAvailable:    8192 kB\n")
    assert (mem_total(meminfo), mem_available(meminfo)) == (16384 * 1024, 8192 * 1024)
    meminfo.write_text("MemTotal:       16384 kB\n")
    with pytest.raises(ValueError, match="MemAvailable"):
        mem_available(meminfo)


def test_without_the_binding(monkeypatch: pytest.MonkeyPatch,
                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import now raises ImportError
    monkeypatch.setattr(gpu, "_driver", lambda: True)  # a driver, but no binding
    caplog.set_level(logging.INFO, logger="llamad.gpu")
    mon = GpuMonitor()
    assert not mon.available and mon.gpus() == ()
    assert [r.getMessage() for r in caplog.records] == [
        "no NVML binding (pip install nvidia-ml-py): scheduling by system RAM alone"]


# bench/gpu_check: the one command that re-checks issue #14 on a GPU machine. Here: what it
# reports without one, its verdicts on the H100 figures, and its harness on the real
# (CPU) llama-server.

ROOT = Path(__file__).resolve().parent.parent


def gpu_check() -> Any:
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(ROOT / "bench/gpu_check"))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_gpu_check_without_a_gpu_reports_null() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0
    assert "no NVIDIA GPU or NVML on this machine" in run.stderr
    assert json.loads(run.stdout) == {"gpus": [], "probe": None, "unit_matches": None,
                                      "server": None, "ok": None}


def test_gpu_check_unit_check_is_null_without_a_unit() -> None:
    check = gpu_check()
    me = os.getpid()
    mon = GpuMonitor(FakeNvml([FakeDevice("NVIDIA H100", 80 * G, G, [(me, check.ALLOC)])]))
    found = check.describe(mon, me, None)
    assert found["seen_by_nvml"] and found["unit_matches"] is None  # not tested: not true
    assert check.describe(mon, me, "elsewhere.service")["unit_matches"] is False
    result = {"probe": found, "unit_matches": None, "server": None}
    assert check.verdict(result) is True
    assert check.verdict({**result, "unit_matches": False}) is False
    assert check.verdict({"probe": {}, "unit_matches": None, "server": None}) is None


def test_gpu_check_verdicts_on_the_h100_figures() -> None:
    check = gpu_check()
    info = gemma_info()
    rows = [{"args": args, "nvml_mib": float(nvml)} for args, nvml, *_ in H100]
    rows.append({"args": "-ngl 0 -c 8192", "nvml_mib": 0.0})
    fixed = check.learn_fixed(info, rows[0], "GPU-0", "NVIDIA H100 80GB HBM3")
    for row in rows:
        check.compare(row, info, fixed)
        assert row["within_goal"] and row["within_learned_goal"], row
    # Before #14 llamad estimated 683 MiB where NVML measured 862: that is a miss.
    low = {"args": "-ngl 99 -c 1024", "nvml_mib": 862.0 + 300}
    check.compare(low, info, fixed)
    assert not low["within_goal"] and not low["within_learned_goal"]


def test_gpu_check_fits_gemma_to_two_rooms() -> None:
    """The rows bench/gpu_check starts for issue #21: what llamad's fitting chooses for Gemma
    (no -c) in a room where a shorter context fits, and in one where fewer layers do."""
    check = gpu_check()
    info = gemma_info()
    (room_a, ctx_args), (room_b, layer_args) = check.fit_rows(info)
    flag, ctx = ctx_args.split()
    assert flag == "--ctx-size" and 8192 < int(ctx) < 16384
    assert layer_args.startswith("--ctx-size 4096 --n-gpu-layers ")
    assert 0 < int(layer_args.split()[-1]) < 18
    for room, args in ((room_a, ctx_args), (room_b, layer_args)):
        assert check.memory.estimate(info, args.split(), gpu=True).total.vram <= room
    fitted = [{"within_room": True}, {"within_room": False}]
    result: dict[str, Any] = {"probe": {"seen_by_nvml": True}, "unit_matches": None, "server": {
        "rows": [], "oom": {"recognised": True}, "cpu_fallback": {"recognised": True},
        "fitted": fitted[:1]}}
    assert check.verdict(result) is True
    result["server"]["fitted"] = fitted
    assert check.verdict(result) is False


def test_gpu_check_harness_on_the_real_llama_server() -> None:
    check = gpu_check()
    mon = GpuMonitor(FakeNvml([FakeDevice("NVIDIA H100", 80 * G, G)]))
    row = check.run_row(mon, rig.LLAMA_SERVER, rig.GEMMA, "-ngl 0 -c 1024", "GPU-00000000")
    assert "error" not in row, row
    assert row["cuda_visible_devices"] == "" and row["nvml_mib"] == 0
    assert 0 < row["ready_s"] < 120 and row["rss"]["VmRSS"] > 100
    assert row["fit_s"] is None  # started with -fit off: llama.cpp skipped its fit step
    assert row["freed_after_s"] is not None
    fitted = check.run_row(mon, rig.LLAMA_SERVER, rig.GEMMA, "-ngl 0 -c 1024", "GPU-00000000",
                           fit_off=False)
    print(f"\nstart to ready: {row['ready_s']:.2f} s with -fit off, {fitted['ready_s']:.2f} s "
          f"without (fit step {fitted['fit_s']:.2f} s)")
    assert fitted["fit_s"] is not None and fitted["fit_s"] > 0


def test_check_config_warns_of_gpus_without_persistence_mode() -> None:
    from llamad.cli import models as cli
    h100 = FakeDevice("NVIDIA H100 80GB HBM3", 80 * 2**30, 0)
    assert cli._gpu_problems(FakeNvml([h100])) == []
    cold = FakeDevice("NVIDIA H100 80GB HBM3", 80 * 2**30, 0, persistence=0)
    (warning,) = cli._gpu_problems(FakeNvml([h100, cold]))
    assert "persistence mode is off on GPU 1 (NVIDIA H100 80GB HBM3)" in warning
    assert "nvidia-smi -pm 1" in warning
    assert cli._gpu_problems(NoNvml()) == []
