"""A real kernel OOM kill: `memory-max` below what the model needs.

The kernel kills llama-server in its own cgroup; llamad fails that model with the OOM
reason (no restart storm), llamad itself and the model beside it go on, and an explicit load
tries again (and is killed again). The model beside it is test_memory's busy.
"""

from __future__ import annotations

from pathlib import Path

from vm.guest.vmguest import complete, http, load, model, sh, show, wait_for, wait_state

OOM = "out of memory (killed by the kernel's OOM killer in its cgroup)"


def oom_kills() -> int:
    """The kernel's count of OOM kills since boot."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        key, value = line.split()
        if key == "oom_kill":
            return int(value)
    raise AssertionError("no oom_kill in /proc/vmstat")


def test_oom_kill_fails_that_model_alone() -> None:
    if model("busy")["state"] != "ready":
        load("busy")
    busy_pid = model("busy")["main_pid"]
    llamad_pid = show("llamad.service", "MainPID")
    kills = oom_kills()

    status, body = complete("tight")
    print(f"tight: HTTP {status} {body}")
    assert status == 503, body
    assert OOM in body["error"]["message"]
    tight = model("tight")
    assert tight["state"] == "failed" and OOM in tight["reason"], tight
    assert oom_kills() > kills
    unit = tight["unit"]
    assert "killed by the OOM killer" in sh(f"journalctl -b -o cat -u {unit}")

    # llamad and the other model are untouched.
    assert complete("busy")[0] == 200
    assert model("busy")["main_pid"] == busy_pid
    assert show("llamad.service", "MainPID") == llamad_pid
    assert show("llamad.service", "NRestarts") == "0"

    # Failed stays failed (no restart storm) until an explicit load tries again.
    kills = oom_kills()
    assert model("tight")["state"] == "failed"
    status, body = http("POST", "/models/load", {"model": "tight"})
    assert status == 200, body
    again = wait_for("tight to be killed again", lambda: oom_kills() > kills
                     and (d := model("tight"))["state"] == "failed" and d, 300)
    print(f"tight after the explicit load: {again}")
    assert OOM in again["reason"]
    wait_state("busy", "ready", timeout=10)
