"""`make demo`, the quick start's first command, run by a user who is not root: one
sentence, before anything is installed (tests/integration/test_demo.py runs it as root)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_make_demo_without_root_says_so() -> None:
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    out = subprocess.run([*(nobody if os.geteuid() == 0 else []), "make", "-C", str(ROOT),
                          "--no-print-directory", "demo"], capture_output=True, text=True,
                         timeout=60, env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"})
    assert out.returncode != 0 and out.stdout == "bash tools/demo\n", out
    assert out.stderr.splitlines()[0] == (
        "make demo needs root: it installs apt packages and llamad's .deb (on this machine, "
        "or in a throwaway systemd container); run it as root"), out.stderr
