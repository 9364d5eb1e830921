"""A stop that hangs ends with every thread's traceback in the journal, not in silence."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import pytest

from llamad.app import stop_is_slow

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


async def test_a_slow_stop_says_what_it_waits_for(caplog: pytest.LogCaptureFixture,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    never = asyncio.Event()

    async def waits_for_ever() -> None:
        await never.wait()

    task = asyncio.get_running_loop().create_task(waits_for_ever(), name="the stuck one")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="llamad"):
        stop_is_slow()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    said = caplog.text
    assert "stopping takes long: 1 tasks pending" in said, said
    assert "the stuck one" in said and "waits_for_ever:" in said, said
    assert "Current thread" in capfd.readouterr().err  # every thread's traceback too
