"""memory-limit = estimate on a real cgroup, and what llamad measures there.

- With a long prompt on every slot at once, the model's unit never reaches the MemoryMax=
  llamad derived from its estimate: not killed, no reclaim forced by the limit
  (memory.events), memory.peak below memory.max. ("Long" for TCG: each prompt fills an
  ubatch, the preset's 64 tokens, over its slot's context; conftest.PRESETS.)
- The learned figure (learned.json) is the cgroup's own peak (MemoryPeak), not a process's.
- The RAM llamad shows in `llamad ps`, GET /status, GET /v1/models and /metrics is the
  cgroup's memory.current, which llamad's sandbox lets it read.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from vm.guest.vmguest import (
    cgroup,
    complete,
    events,
    http,
    load,
    model,
    sh,
    show,
    unload_all,
    wait_for,
)

MIB = 2**20
PAGE = 4096
LEARNED = Path("/var/lib/llamad/learned.json")
# About 60 tokens each: a full ubatch (64) per slot.
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 6


def learned(name: str) -> int | None:
    if not LEARNED.exists():
        return None
    entries = json.loads(LEARNED.read_text())["models"]
    found = [v["ram"] for k, v in entries.items() if k.startswith(f"{name}#")]
    return found[0] if found else None


def test_derived_limit_holds_a_long_prompt_on_every_slot() -> None:
    unload_all()
    info = load("busy")
    unit = info["unit"]
    cg = cgroup(unit)
    limit = int((cg / "memory.max").read_text())  # "max" (no limit) fails here
    assert limit == int(show(unit, "MemoryMax")) // PAGE * PAGE  # the kernel's pages
    pid = info["main_pid"]

    # The learned figure is the cgroup's peak: the model is idle, memory.peak stays put.
    ram = wait_for("llamad to learn busy's peak", lambda: learned("busy"), 60)
    peak_at_ready = int((cg / "memory.peak").read_text())
    print(f"busy: MemoryMax {limit / MIB:.1f} MiB, peak once ready {peak_at_ready / MIB:.1f} "
          f"MiB, learned {ram / MIB:.1f} MiB, VmHWM {_vm_hwm(pid) / MIB:.1f} MiB")
    assert ram == peak_at_ready

    answers: list[tuple[int, Any]] = []
    threads = [threading.Thread(target=lambda: answers.append(
        complete("busy", LONG_PROMPT, timeout=900))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [status for status, _ in answers] == [200, 200], answers
    usage = [a["usage"]["prompt_tokens"] for _, a in answers]
    assert min(usage) >= 50, usage

    peak = int((cg / "memory.peak").read_text())
    print(f"busy after prompts of {usage} tokens at once: peak {peak / MIB:.1f} MiB, "
          f"{100 * peak / limit:.0f} % of MemoryMax; memory.events {events(cg)}")
    assert peak < limit
    assert events(cg) == {**events(cg), "max": 0, "oom": 0, "oom_kill": 0}
    assert (model("busy")["main_pid"], show(unit, "NRestarts")) == (pid, "0")


def _vm_hwm(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


def test_ram_shown_everywhere_is_the_cgroups() -> None:
    info = model("busy")
    if info["state"] != "ready":
        info = load("busy")
    current = cgroup(info["unit"]) / "memory.current"

    def same() -> dict[str, int] | None:
        before = int(current.read_text())
        shown = {"status": http("GET", "/status")[1]["models"]["busy"]["ram"],
                 "models": model("busy")["ram"], "metrics": _metric("busy")}
        after = int(current.read_text())
        print(f"memory.current {before}/{after}, llamad {shown}")
        return shown if set(shown.values()) == {before, after} else None

    wait_for("llamad's RAM figures to equal memory.current", same, 60, interval=1)

    def ps_same() -> list[str] | None:
        """`llamad ps` shows /status's figure, rounded to MiB (read on either side of it:
        the model's memory may move meanwhile)."""
        before = http("GET", "/status")[1]["models"]["busy"]["ram"]
        table = sh("llamad ps").splitlines()
        after = http("GET", "/status")[1]["models"]["busy"]["ram"]
        row = next(line for line in table if line.startswith("busy "))
        ram = row[table[0].index("RAM"):table[0].index("VRAM")].strip()
        print(f"llamad ps: {ram}; /status {before}/{after}")
        return table if ram in {f"{before / MIB:.0f} MiB", f"{after / MIB:.0f} MiB"} else None

    wait_for("llamad ps to show /status's RAM", ps_same, 30, interval=1)
    assert int(current.read_text()) != _vm_rss(info["main_pid"])
    # llamad reads these files itself (unitmemory.py), from inside its sandbox
    # (ProtectControlGroups=, PrivateUsers=): seen from its namespaces, they are there.
    llamad = show("llamad.service", "MainPID")
    for name in ("memory.current", "memory.peak"):
        seen = sh(f"nsenter -t {llamad} -m -U cat {current.parent / name}")
        assert int(seen) > 0, name


def _metric(name: str) -> int:
    text = http("GET", "/metrics")[1]
    pattern = rf'^llamad_model_memory_used_bytes{{(?=[^}}]*model="{re.escape(name)}")' \
              rf'(?=[^}}]*memory="ram")[^}}]*}} (\S+)$'
    found = re.search(pattern, text, re.M)
    assert found, f"no RAM metric for {name}"
    return int(float(found.group(1)))


def _vm_rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]
