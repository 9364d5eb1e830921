"""`llamad serve` without a reachable systemd fails with one sentence, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


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
