"""The VM runner's reading of the guest console (tests/vm/run.py): a kernel panic before
the guest's userspace is up earns a second boot; one after it is the suite's failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from vm import run

PANIC = "[    3.462462] Kernel panic - not syncing: Fatal exception in interrupt"


def read(lines: list[str], tmp_path: Path) -> run.Console:
    text = "".join(f"{line}\r\n" for line in lines)
    proc = subprocess.Popen([sys.executable, "-c", f"print({text!r}, end='')"],
                            stdout=subprocess.PIPE)
    console = run.Console(proc, tmp_path / "console.log", 0.0)
    proc.wait(10)
    console.join(10)
    assert proc.stdout is not None
    proc.stdout.close()
    assert (tmp_path / "console.log").read_bytes() == text.encode()
    return console


@pytest.mark.parametrize(("lines", "early"), [
    (["[    3.459570] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI", PANIC], True),
    ([run.UP_MARK, PANIC], False),
    ([run.UP_MARK, run.DONE_MARK], False),
])
def test_only_a_panic_before_the_guest_is_up_counts_as_early(
        lines: list[str], early: bool, tmp_path: Path) -> None:
    console = read(lines, tmp_path)
    assert console.panicked_before_up is early
    assert (console.up is not None) is (run.UP_MARK in lines)
