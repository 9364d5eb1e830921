"""The fault suite: processes killed, stopped and restarted under load, on the real box.

Each test injects its faults into real processes (llama-server, llamad, systemd's units)
and checks that no request is lost or left hanging, that no model unit is orphaned or
leaked, and that llamad ends in the state systemd shows. docs/reliability.md has the
figures of a run.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import rig
from llamad_fixture import Factory, Llamad, chat, models, stream

UNIT_A = "llama-server@gemma-a.service"


def main_pid(d: Llamad, unit: str = UNIT_A) -> int:
    return int(d.show(unit, "MainPID") or 0)


def clean_log(d: Llamad) -> None:
    """llamad's log shows no traceback and no move outside its transition table."""
    log = d.log()
    assert "Traceback" not in log and "illegal state change" not in log, log[-3000:]


async def in_flight(d: Llamad, model: str, n: int) -> None:
    await asyncio.to_thread(rig.wait_for, f"{n} requests in flight on {model}",
                            lambda: models(d.url)[model]["llamad"]["in_flight"] >= n)


async def test_requests_cut_by_a_backend_crash_are_sent_again(llamad_factory: Factory) -> None:
    """kill -9 of llama-server with requests in flight and more arriving while systemd
    restarts it: every request is answered (the cut ones once more, after the restart)."""
    d = llamad_factory(["gemma-a"])
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
        cut = [asyncio.ensure_future(chat(s, d.url, "gemma-a", max_tokens=40,
                                          ignore_eos=True)) for _ in range(3)]
        await in_flight(d, "gemma-a", 3)
        d.box.run(["kill", "-9", str(main_pid(d))])
        late = [asyncio.ensure_future(chat(s, d.url, "gemma-a")) for _ in range(3)]
        results = await asyncio.gather(*cut, *late)
    assert [status for status, _ in results] == [200] * 6, results
    assert int(d.show(UNIT_A, "NRestarts")) == 1
    clean_log(d)


async def test_a_stopped_backend_gets_its_stream_an_error_and_is_restarted(
        llamad_factory: Factory) -> None:
    """kill -STOP of llama-server mid-stream: the client gets an error event once the
    backend has been silent for backend-idle-timeout and deaf to /health for
    health-timeout; the unit is restarted (a new InvocationID); the next request is
    answered."""
    idle, health = 2.0, 1.0
    d = llamad_factory(["gemma-a"], **{"backend-idle-timeout": idle, "health-timeout": health})
    stopped: list[tuple[int, str, float]] = []

    def stop_once(n: int) -> None:
        if n == 3 and not stopped:
            pid, invocation = main_pid(d), d.show(UNIT_A, "InvocationID")
            d.box.run(["kill", "-STOP", str(pid)])
            stopped.append((pid, invocation, time.monotonic()))

    try:
        async with aiohttp.ClientSession() as s:
            events = await stream(s, d.url, "gemma-a", max_tokens=2000, on_event=stop_once)
            took = time.monotonic() - stopped[0][2]
            assert events[-1]["error"]["code"] == "backend_timeout", events[-3:]
            # Silence, then the probe, plus scheduling on a busy machine.
            assert idle <= took < idle + health + 3, took
            rig.wait_for("the wedged backend to be replaced",
                         lambda: d.show(UNIT_A, "InvocationID") not in ("", stopped[0][1]),
                         timeout=30)
            status, body = await chat(s, d.url, "gemma-a")
        assert status == 200, body
        assert main_pid(d) != stopped[0][0]
        assert "stopped answering" in d.log()
        clean_log(d)
    finally:
        for pid, _, _ in stopped:  # gone once killed; never leave a stopped process behind
            d.box.run(["kill", "-CONT", str(pid)], check=False)
