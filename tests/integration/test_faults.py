"""The fault suite: processes killed, stopped and restarted under load, on the real box.

Each test injects its faults into real processes (llama-server, llamad, systemd's units)
and checks that no request is lost or left hanging, that no model unit is orphaned or
leaked, and that llamad ends in the state systemd shows. docs/reliability.md has the
figures of a run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import rig
from helpers.daemon import (
    Factory,
    Llamad,
    chat,
    models,
    state,
    stream,
    tracebacks,
    wait_http,
    wait_state,
)

UNIT_A = "llama-server@gemma-a.service"
# llamad's own unit restarts it when it dies, as the shipped llamad.service does.
RESTART = ("Restart=on-failure", "RestartSec=0.5", "LimitCORE=0")


def main_pid(d: Llamad, unit: str = UNIT_A) -> int:
    return int(d.show(unit, "MainPID") or 0)


def clean_log(d: Llamad) -> None:
    """llamad's log shows no traceback and no move outside its transition table."""
    log = d.log()
    assert "Traceback" not in log, tracebacks(log)
    assert "illegal state change" not in log, log[-3000:]


def failed_units(d: Llamad) -> str:
    return d.box.run(["systemctl", "list-units", "--failed", "--no-legend", "--plain",
                      "llama-server@*", "llamad*"]).stdout.strip()


def account(d: Llamad, test: str, units: set[str], **figures: Any) -> None:
    """Exactly `units` run, each with its one llama-server process (no orphan, no leaked
    unit), and none failed; then the test's figures, for docs/reliability.md."""
    running = set(d.model_units())
    processes = len(d.box.run(["pgrep", "-x", "llama-server"], check=False).stdout.split())
    found = {"orphans": processes - len(running), "leaked_units": sorted(running - units),
             "missing_units": sorted(units - running), "failed_units": failed_units(d)}
    print("fault figures " + json.dumps({"test": test, **figures, **found}))
    assert found == {"orphans": 0, "leaked_units": [], "missing_units": [],
                     "failed_units": ""}, found


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
    account(d, "backend kill -9", {UNIT_A}, faults=1, requests=6,
            lost=sum(status != 200 for status, _ in results))


async def test_a_stopped_backend_gets_its_stream_an_error_and_is_restarted(
        llamad_factory: Factory) -> None:
    """kill -STOP of llama-server mid-stream: once the backend has sent nothing for
    liveness-timeout, /health has not answered and the process used no CPU, the client
    gets an error event (from the forwarding's watch, or from the kill the liveness tick
    ordered, whichever comes first); the unit is restarted (a new InvocationID); the next
    request is answered."""
    idle = 3.0
    d = llamad_factory(["gemma-a"], **{"liveness-timeout": idle})
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
            assert events[-1]["error"]["code"] in ("backend_timeout", "backend_failed"), \
                events[-3:]
            # Silence, then a probe of at most `idle`, plus a tick and a busy machine.
            assert idle <= took < 2 * idle + 4, took
            rig.wait_for("the wedged backend to be replaced",
                         lambda: d.show(UNIT_A, "InvocationID") not in ("", stopped[0][1]),
                         timeout=30)
            status, body = await chat(s, d.url, "gemma-a")
        assert status == 200, body
        assert main_pid(d) != stopped[0][0]
        assert "is wedged" in d.log()
        clean_log(d)
        account(d, "backend SIGSTOP", {UNIT_A}, faults=1, requests=2, lost=0,
                error_after_s=round(took, 2), liveness_timeout=idle)
    finally:
        for pid, _, _ in stopped:  # gone once killed; never leave a stopped process behind
            d.box.run(["kill", "-CONT", str(pid)], check=False)


async def stream_outcome(s: aiohttp.ClientSession, url: str, model: str,
                         on_event: Callable[[int], None] | None = None) -> str:
    """How a stream ended: 'done', 'error event', or the client's exception, within 60 s."""
    try:
        events = await asyncio.wait_for(stream(s, url, model, max_tokens=2000,
                                               on_event=on_event), 60)
    except (aiohttp.ClientError, ConnectionError) as e:
        return type(e).__name__
    return "done" if events[-1] == {"done": True} else "error event"


async def test_a_busy_backend_is_not_taken_for_wedged(llamad_factory: Factory) -> None:
    """Fifty requests on four slots with a short liveness-timeout: most wait far longer
    than it for their answer, and on a busy machine /health can take longer than that
    too, but the backend computes all along (it answers a request or uses CPU): nothing
    is cut and it is never restarted."""
    d = llamad_factory(["gemma-a"], **{"liveness-timeout": 2})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
        results = await asyncio.gather(*(chat(s, d.url, "gemma-a", f"Count to {i}", 4)
                                         for i in range(50)))
    assert [status for status, _ in results] == [200] * 50, [b for st, b in results
                                                             if st != 200][:2]
    assert "is wedged" not in d.log()
    assert d.starts("gemma-a") == 1
    account(d, "busy backend", {UNIT_A}, faults=0, requests=51, lost=0)


async def test_llamad_killed_mid_stream(llamad_factory: Factory) -> None:
    """kill -9 of llamad with a stream on each of two models: the clients get an error at
    once (no hang); systemd restarts llamad, which adopts both running models."""
    d = llamad_factory(["gemma-a", "gemma-b"], unit=RESTART, **{"models-max": 2})
    async with aiohttp.ClientSession() as s:
        for model in ("gemma-a", "gemma-b"):
            assert (await chat(s, d.url, model))[0] == 200
        before = {m: d.show(f"llama-server@{m}.service", "InvocationID")
                  for m in ("gemma-a", "gemma-b")}
        old_pid = main_pid(d, d.unit)
        killed: list[float] = []

        def kill_once(n: int) -> None:
            if n == 3 and not killed:
                d.box.run(["kill", "-9", str(old_pid)])
                killed.append(time.monotonic())

        outcomes = await asyncio.gather(stream_outcome(s, d.url, "gemma-a", kill_once),
                                        stream_outcome(s, d.url, "gemma-b"))
        assert killed and all(o not in ("done", "error event") for o in outcomes), outcomes
        error_after = time.monotonic() - killed[0]
        assert error_after < 10
        rig.wait_for("systemd to restart llamad",
                     lambda: main_pid(d, d.unit) not in (0, old_pid), timeout=30)
        await asyncio.to_thread(wait_http, d.url)
        for model in ("gemma-a", "gemma-b"):
            await asyncio.to_thread(wait_state, d.url, model, "ready", 30)
            assert (await chat(s, d.url, model))[0] == 200
    for model, invocation in before.items():  # adopted, not restarted
        assert d.show(f"llama-server@{model}.service", "InvocationID") == invocation
        assert d.starts(model) == 1
    account(d, "llamad kill -9", {f"llama-server@{m}.service" for m in before}, faults=1,
            streams_cut=len(outcomes), requests_after=2, lost=0,
            client_error_after_s=round(error_after, 2), outcomes=outcomes)


def test_restart_with_connections_queued_on_the_socket(llamad_factory: Factory) -> None:
    """`systemctl restart llamad` with requests queued on llamad.socket: those queued while
    the old llamad could not accept (stopped) and those queued while the new one starts
    are all served, and the new llamad adopts the running model."""
    d = llamad_factory(["gemma-a"], unit=RESTART, socket=True)
    url, port = d.url, d.port
    wait_http(url, timeout=60)
    old_pid = main_pid(d, d.unit)
    try:
        invocation, results = asyncio.run(_restart_with_a_queue(d, url, port, old_pid))
    finally:
        d.box.run(["kill", "-CONT", str(old_pid)], check=False)
    assert [status for status, _ in results] == [200] * 8, results
    assert main_pid(d, d.unit) not in (0, old_pid)
    assert d.show(UNIT_A, "InvocationID") == invocation
    by_new = models(url)["gemma-a"]["llamad"]["served"]
    assert by_new >= 4  # at least the second batch
    account(d, "restart with a queue", {UNIT_A}, faults=1, requests=8, lost=0,
            served_by_old=8 - by_new, served_by_new=by_new)


async def _restart_with_a_queue(d: Llamad, url: str, port: int,
                                old_pid: int) -> tuple[str, list[tuple[int, Any]]]:
    box = d.box
    # One connection per request, so that each waits in the socket's queue.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        assert (await chat(s, url, "gemma-a"))[0] == 200
        invocation = d.show(UNIT_A, "InvocationID")
        box.run(["kill", "-STOP", str(old_pid)])
        queued = [asyncio.ensure_future(chat(s, url, "gemma-a", f"Count to {i}", 4))
                  for i in range(4)]
        # Connected (in the socket's queue), nothing accepted: llamad is stopped.
        await asyncio.to_thread(rig.wait_for, "4 connections in the queue",
                                lambda: queue_length(box, port) >= 4, 30)
        box.run(["systemctl", "restart", "--no-block", d.unit])
        await asyncio.to_thread(rig.wait_for, "the old llamad to exit", lambda: box.run(
            ["kill", "-0", str(old_pid)], check=False).returncode != 0, 60)
        # The new llamad is starting: these wait in the queue for it.
        queued += [asyncio.ensure_future(chat(s, url, "gemma-a", f"Count to {i}", 4))
                   for i in range(4, 8)]
        return invocation, await asyncio.gather(*queued)


def queue_length(box: rig.Box, port: int) -> int:
    """Connections waiting in the accept queue of the listening socket on `port`."""
    out = box.run(["ss", "-Hltn", f"sport = :{port}"]).stdout.split()
    return int(out[1]) if len(out) > 1 else 0


async def test_watchdog_restarts_a_stalled_llamad(llamad_factory: Factory) -> None:
    """llamad stopped (SIGSTOP) past WatchdogSec: systemd's watchdog kills it and
    Restart= starts it again; the model keeps running and is adopted."""
    d = llamad_factory(["gemma-a"], unit=(*RESTART, "WatchdogSec=3"))
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
        invocation, old_pid = d.show(UNIT_A, "InvocationID"), main_pid(d, d.unit)
        d.box.run(["kill", "-STOP", str(old_pid)])
        stopped = time.monotonic()
        try:
            rig.wait_for("the watchdog to restart llamad",
                         lambda: main_pid(d, d.unit) not in (0, old_pid), timeout=60)
            restarted_after = time.monotonic() - stopped
        finally:
            d.box.run(["kill", "-CONT", str(old_pid)], check=False)
        await asyncio.to_thread(wait_http, d.url)
        await asyncio.to_thread(wait_state, d.url, "gemma-a", "ready", 30)
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
    assert "Watchdog timeout" in d.box.journal("-u", d.unit, f"--after-cursor={d.cursor}")
    assert d.show(UNIT_A, "InvocationID") == invocation
    account(d, "watchdog", {UNIT_A}, faults=1, requests=1, lost=0, watchdog_sec=3,
            restarted_after_s=round(restarted_after, 2))


async def test_a_backend_loading_again_gets_nothing_forwarded(
        llamad_factory: Factory) -> None:
    """llama-server restarted behind llamad's back answers /health (and everything else)
    503 while it loads: requests sent meanwhile are held until it is ready, and none is
    answered with its 503."""
    d = llamad_factory(["gemma-a"])
    sock = "/run/llamad/gemma-a/llama.sock"
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
        invocation = d.show(UNIT_A, "InvocationID")
        d.box.run(["systemctl", "restart", "--no-block", UNIT_A])
        await asyncio.to_thread(rig.wait_for, "the new backend to answer 503", lambda: d.box.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", sock,
             "http://localhost/health"], check=False).stdout == "503", 60, 0.01)
        results = await asyncio.gather(*(chat(s, d.url, "gemma-a") for _ in range(4)))
    assert [status for status, _ in results] == [200] * 4, results
    assert d.show(UNIT_A, "InvocationID") != invocation
    clean_log(d)
    account(d, "backend answering 503", {UNIT_A}, faults=1, requests=4, lost=0)


async def test_a_start_limit_failed_model_recovers_on_an_explicit_load(
        llamad_factory: Factory) -> None:
    """A model killed until systemd's start limit fails it: requests get 503 with the
    reason; an explicit load starts it again at once (no UnitExists) and it serves."""
    d = llamad_factory(["gemma-a"], **{"start-limit-burst": 2})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
        kills = 0
        while state(d.url, "gemma-a") != "failed":
            pid = main_pid(d)
            if pid:
                d.box.run(["kill", "-9", str(pid)], check=False)
                kills += 1
                def moved_on(pid: int = pid) -> bool:
                    return main_pid(d) != pid or state(d.url, "gemma-a") == "failed"
                rig.wait_for("the unit to restart or fail", moved_on, timeout=60)
            assert kills <= 3
        reason = models(d.url)["gemma-a"]["llamad"]["reason"]
        assert "signal 9" in reason, reason  # the last crash says why it failed
        assert d.model_units() == {}  # systemd gave up: nothing restarts it
        status, body = await chat(s, d.url, "gemma-a")
        assert status == 503 and "failed" in body["error"]["message"]
        async with s.post(d.url + "/models/load", json={"model": "gemma-a"}) as r:
            assert r.status == 200, await r.text()
        await asyncio.to_thread(wait_state, d.url, "gemma-a", "ready", 60)
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
    assert "UnitExists" not in d.log()
    account(d, "start limit", {UNIT_A}, faults=kills, requests=2, lost=0)
