"""`make demo`, the first command of README.md's quick start, as a new user runs it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import rig
from helpers import readme

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_make_demo_answers_and_says_what_next() -> None:
    reason = rig.missing_requirements()
    if reason:
        pytest.fail(reason)
    [[line]] = readme.quick_start()[:1]
    assert readme.command(line) == "make demo"
    out = subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", "demo"],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    # The answers are greedy, so the same on every run, and right.
    cold = re.search(r"== cold: .*\n   Water boils at a temperature of 100 degrees Celsius\.\n"
                     r"   answered in (\d+\.\d) s, (\d+\.\d) s of it loading the model\n", text)
    warm = re.search(r"== warm: .*\n   The three primary colors are red, blue, and yellow\.\n"
                     r"   answered in (\d+\.\d) s\n", text)
    assert cold and warm, text
    assert 0 < float(cold.group(2)) <= float(cold.group(1))
    assert re.search(r"^gemma +ready ", text, re.M), text  # llamad ps
    assert text.rstrip().endswith(
        "Next:\n"
        "  open http://127.0.0.1:8080/ in a browser   llamad's dashboard\n"
        "  llamad ps                                  the loaded models, their memory and "
        "requests\n"
        "  journalctl -u 'llama-server@*'             the models' own logs"), text[-600:]
