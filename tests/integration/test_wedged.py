"""A backend that hangs rather than dies (kill -STOP; a hung GPU looks the same from here):
its client gets an error, its unit is restarted, the next request is answered."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import rig
from helpers.daemon import Factory, chat, stream, wait_state

UNIT = "llama-server@gemma-a.service"
LIVENESS = 3


async def test_stopped_backend_is_restarted_and_its_client_told(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"], **{"liveness-timeout": LIVENESS})
    stopped: list[str] = []
    stopped_at: list[float] = []

    def stop_once(n: int) -> None:
        if n == 5 and not stopped:
            stopped.append(d.show(UNIT, "InvocationID"))
            d.box.run(["kill", "-STOP", d.show(UNIT, "MainPID")])
            stopped_at.append(time.monotonic())

    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200  # loaded: the bound is the stream's
        # Never a hang: the stream ends, with an error, well within the timeout.
        events = await asyncio.wait_for(
            stream(s, d.url, "gemma-a", max_tokens=4000, on_event=stop_once), LIVENESS + 60)
        assert stopped and "error" in events[-1], events[-3:]
        told = time.monotonic() - stopped_at[0]
        rig.wait_for("the unit to run a new invocation", lambda: d.show(UNIT, "ActiveState")
                     == "active" and d.show(UNIT, "InvocationID") != stopped[0], timeout=60)
        await asyncio.to_thread(wait_state, d.url, "gemma-a", "ready", 60)
        print(f"kill -STOP: client told after {told:.1f}s, model ready again after "
              f"{time.monotonic() - stopped_at[0]:.1f}s (liveness-timeout {LIVENESS}s)")
        status, body = await chat(s, d.url, "gemma-a")
    assert status == 200, body
    assert "is wedged" in d.log()
