"""A stop that hangs ends with every thread's traceback in the journal, not in silence."""

from __future__ import annotations

import subprocess
import sys

HANGS = """
import threading, time
from llamad.app import stop_deadline
stuck = threading.Thread(target=time.sleep, args=(60,), name="stuck", daemon=True)
stuck.start()
stop_deadline(0.5)
stuck.join()  # as a cleanup waiting on a thread that never ends
"""


def test_a_stop_that_hangs_exits_with_every_threads_traceback() -> None:
    proc = subprocess.run([sys.executable, "-c", HANGS], capture_output=True, text=True,
                          timeout=30, check=False)  # hung, it would raise
    assert proc.returncode == 1, proc
    assert "Timeout (0:00:00.500000)!" in proc.stderr, proc.stderr
    # Both threads, with where each waits: the main one in join, the stuck one asleep.
    assert proc.stderr.count("Thread 0x") == 2, proc.stderr
    assert "in join" in proc.stderr and "in run" in proc.stderr, proc.stderr
