"""The daemon client commands (load, unload, ps, top, logs) run on the host against llamad
in the box (they share the network), with and without API keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import rig
from helpers.daemon import Factory, wait_state
from helpers.ports import refused_url


def llamad(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMAD_URL", "LLAMAD_API_KEY")}
    if key:
        env["LLAMAD_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "llamad", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def lines_of(proc: subprocess.Popen[str], timeout: float = 60) -> Iterator[str]:
    """The process's output lines; it is ended after `timeout` seconds, so a line that
    never comes fails the test instead of hanging the suite."""
    assert proc.stdout is not None
    timer = threading.Timer(timeout, proc.terminate)
    timer.start()
    try:
        yield from proc.stdout
    finally:
        timer.cancel()


def test_load_ps_logs_unload(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"])
    out = llamad("load", "gemma-a", "--wait", "--url", d.url)
    assert (out.returncode, out.stdout, out.stderr) == (0, "gemma-a: ready\n", "")
    table = llamad("ps", "--url", d.url).stdout.splitlines()
    assert table[0].split()[:3] == ["MODEL", "STATE", "PID"]
    assert table[1].split()[:2] == ["gemma-a", "ready"]
    assert table[-1] == "1 models, 1 loaded: gemma-a"
    status = json.loads(llamad("ps", "--json", "--url", d.url).stdout)
    assert status["models"]["gemma-a"]["state"] == "ready"
    logged = llamad("logs", "gemma-a", "-n", "5", "--url", d.url).stdout.splitlines()
    assert len(logged) == 5 and all(" llama-server@gemma-a.service: " in x for x in logged)
    entries = [json.loads(x) for x in
               llamad("logs", "--json", "-n", "3", "--url", d.url).stdout.splitlines()]
    assert len(entries) == 3 and {e["unit"] for e in entries} == {d.unit}
    # Following the model's log shows its unit stop. The last lines come first: the unload
    # may be over before the follower (a new Python process) has connected.
    follow = subprocess.Popen([sys.executable, "-m", "llamad", "logs", "-f", "-n", "5",
                               "gemma-a", "--url", d.url], stdout=subprocess.PIPE, text=True)
    try:
        out = llamad("unload", "gemma-a", "--json", "--url", d.url)
        assert json.loads(out.stdout)["state"] in ("stopping", "unloaded")
        seen = next(x for x in lines_of(follow) if "Stopped llama-server@gemma-a" in x)
        assert seen.split()[3] == "llama-server@gemma-a.service:"
    finally:
        follow.terminate()
        follow.wait(10)
    wait_state(d.url, "gemma-a", "unloaded")
    # top redraws the table until interrupted.
    top = subprocess.Popen([sys.executable, "-m", "llamad", "top", "--interval", "0.2",
                            "--url", d.url], stdout=subprocess.PIPE, text=True)
    try:
        heads = [x for _, x in zip(range(40), lines_of(top), strict=False) if "MODEL" in x]
        assert len(heads) >= 2
    finally:
        top.terminate()
        top.wait(10)


def test_errors_are_one_sentence(llamad_factory: Factory, box: rig.Box) -> None:
    with refused_url() as nobody:
        out = llamad("ps", "--url", nobody)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (f"llamad: llamad is not running at {nobody} (connection refused); "
                          "start it with `systemctl start llamad.socket`, or give --url or "
                          "$LLAMAD_URL\n")
    keys = box.workdir / "cli-keys"
    keys.write_text("boss admin\nplain\n")
    keys.chmod(0o600)
    d = llamad_factory(["gemma-a"], **{"api-keys-file": str(keys)})
    out = llamad("ps", "--url", d.url)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "LLAMAD_API_KEY" in out.stderr
    out = llamad("logs", "--url", d.url, key="plain")
    assert out.returncode == 1 and "needs an admin key" in out.stderr
    assert llamad("ps", "--url", d.url, key="boss").returncode == 0
    # llamad's /metrics names every model: admin keys only, like /status.
    for key, want in (("plain", 403), ("boss", 200)):
        req = urllib.request.Request(d.url + "/metrics", headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                assert (r.status, want) == (200, 200)
        except urllib.error.HTTPError as e:
            assert e.code == want
    out = llamad("load", "nope", "--url", d.url, key="boss")
    assert out.returncode == 1
    assert out.stderr.startswith("llamad: model 'nope' is not known to llamad")
