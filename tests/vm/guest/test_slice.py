"""`slice-memory-max`: one limit for all models together, on llama-server.slice.

Two models that each fit under it but not both: the kernel's OOM killer acts at the
slice's limit (memory.events.local of the slice), one of them fails with the OOM reason.
Last in the run: it restarts llamad with the slice limit set.
"""

from __future__ import annotations

from vm.guest.vmguest import (
    LLAMAD_CONF,
    cgroup,
    events,
    http,
    load,
    model,
    restart_llamad,
    show,
    unload_all,
    wait_for,
)

MIB = 2**20
SLICE = "llama-server.slice"
# A heavy-* model holds about 300 MiB of anonymous memory (its KV cache).
LIMIT_MB = 450
OOM = "out of memory (killed by the kernel's OOM killer in its cgroup)"


def test_slice_memory_max_holds_the_models_together() -> None:
    unload_all()
    restart_llamad(LLAMAD_CONF + f"slice-memory-max = {LIMIT_MB}M\n")
    assert show(SLICE, "MemoryMax") == str(LIMIT_MB * MIB)
    cg = cgroup(SLICE)
    assert int((cg / "memory.max").read_text()) == LIMIT_MB * MIB
    before = events(cg, "memory.events.local")

    a = load("heavy-a")
    print(f"heavy-a alone: unit {int((cgroup(a['unit']) / 'memory.current').read_text()) / MIB:.0f}"
          f" MiB, slice {int((cg / 'memory.current').read_text()) / MIB:.0f} MiB")
    assert http("POST", "/models/load", {"model": "heavy-b"})[0] == 200
    failed = wait_for("the slice's OOM kill to fail heavy-a or heavy-b", lambda: [
        d for d in (model("heavy-a"), model("heavy-b")) if d["state"] == "failed"], 400)
    after = events(cg, "memory.events.local")
    print(f"slice memory.events.local {before} -> {after}; failed: "
          f"{[(d['unit'], d['reason']) for d in failed]}")
    assert all(OOM in d["reason"] for d in failed)
    assert after["oom"] > before["oom"]  # the slice's own limit, not a unit's
    assert events(cg)["oom_kill"] > 0
