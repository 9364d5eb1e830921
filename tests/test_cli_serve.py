"""`llamad serve` without a reachable systemd fails with one sentence, not a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import rig
from helpers.ports import free_port


def test_serve_without_systemd_says_so(tmp_path: Path) -> None:
    conf = tmp_path / "llamad.conf"
    conf.write_text(f"models-dir = {tmp_path}\nllama-cache = no\nstate-dir = {tmp_path}\n")
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}
    out = subprocess.run([sys.executable, "-m", "llamad", "serve", "--config", str(conf),
                          "--listen", "127.0.0.1:0"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    assert "cannot connect to systemd's system bus" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_with_a_bad_config_names_it(tmp_path: Path) -> None:
    conf = tmp_path / "llamad.conf"
    conf.write_text("models-max = lots\n")
    out = subprocess.run([sys.executable, "-m", "llamad", "serve", "--config", str(conf)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert str(conf) in out.stderr and "models-max" in out.stderr and "lots" in out.stderr


def test_a_reload_while_standing_by_keeps_llamad_answering(tmp_path: Path) -> None:
    """With an error in llamad.conf llamad stands by, answering 503. A SIGHUP then (a
    `systemctl reload` once the file looked fixed) must not end it: killed by SIGHUP,
    systemd would count the exit as clean and not start llamad again (Restart=on-failure)."""
    conf = tmp_path / "llamad.conf"
    conf.write_text("models-max = lots\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llamad", "serve", "--config", str(conf),
                             "--listen", f"127.0.0.1:{port}"], stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/health"
    try:
        rig.wait_for("llamad to stand by", lambda: _status(url) == 503, timeout=60)
        proc.send_signal(signal.SIGHUP)
        rig.wait_for("llamad to answer after SIGHUP", lambda: _status(url) == 503,
                     timeout=10)
        assert proc.poll() is None
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None
