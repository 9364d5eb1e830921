"""Zero processes when idle: with idle-ttl and idle-exit, llamad exits and the model's
remaining TTL runs out in systemd, so nothing is left; a request starts both again."""

from __future__ import annotations

import json
import time
import urllib.request

import rig
from helpers.daemon import Factory

UNIT = "llama-server@gemma-a.service"


def chat(url: str) -> int:
    req = urllib.request.Request(
        url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "gemma-a", "max_tokens": 4,
                         "messages": [{"role": "user", "content": "Hi"}]}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        return int(r.status)


def processes(box: rig.Box) -> dict[str, int]:
    """llamad and llama-server processes running in the box."""
    found = {}
    for name in ("llama-server", "llamad"):
        out = box.run(["pgrep", "-c", "-f", "-x", f".*{name} .*"], check=False).stdout
        found[name] = int(out.strip() or 0)
    return found


def test_idle_ttl_runs_out_while_llamad_is_away(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"], socket=True, **{"idle-exit": 2, "idle-ttl": 20})
    url = d.url
    assert chat(url) == 200
    invocation = d.show(UNIT, "InvocationID")
    rig.wait_for("llamad to exit when idle",
                 lambda: d.show(d.unit, "ActiveState") == "inactive", 30)
    assert d.show(UNIT, "ActiveState") == "active"  # its TTL has not run out yet
    # A request within the TTL: llamad takes the timer back and adopts the model.
    assert chat(url) == 200
    last_use = time.monotonic()
    assert d.show(UNIT, "InvocationID") == invocation
    rig.wait_for("llamad to exit again",
                 lambda: d.show(d.unit, "ActiveState") == "inactive", 30)
    rig.wait_for("the TTL to run out: no llamad, no llama-server",
                 lambda: processes(d.box) == {"llama-server": 0, "llamad": 0}, 60)
    print(f"idle-ttl 20s: no process left {time.monotonic() - last_use:.1f}s after the "
          "last request")
    assert d.show(UNIT, "ActiveState") in ("inactive", "")
    # The next request starts both again.
    assert chat(url) == 200
    assert d.show(d.unit, "ActiveState") == "active"
    assert d.show(UNIT, "InvocationID") not in ("", invocation)
    assert "took back llamad-ttl@gemma-a.timer" in d.log()
