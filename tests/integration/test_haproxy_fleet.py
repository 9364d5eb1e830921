"""HAProxy in front of two llamad hosts (issue #15, part 2).

Two boxes play two machines: llamad on 127.0.0.2 in the session box and on 127.0.0.3 in a
second box, each a peer of the other, both with the models gemma-a and gemma-b (the real
llama-server and Gemma model) and one model of their own. HAProxy on 127.0.0.1 runs what
`llamad haproxy-config` prints, gemma-a placed on the first host and gemma-b on the second.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import rig
from helpers.daemon import Factory, Llamad, models
from helpers.fleet import Haproxy, Traffic, ask, join, urlopen

pytestmark = pytest.mark.integration

A, B = "gemma-a", "gemma-b"
GRACE = 3.0  # shutdown-grace: more than HAProxy's two failed checks a second apart


@pytest.fixture
def hosts(llamad_factory: Factory, second_box: rig.Box) -> tuple[Llamad, Llamad]:
    one = llamad_factory([A, B, "only-one"], host="127.0.0.2", start=False)
    two = llamad_factory([A, B, "only-two"], host="127.0.0.3", in_box=second_box, start=False)
    join([one, two], GRACE)
    return one, two


def name(d: Llamad) -> str:
    return f"{d.host}:{d.port}"


def states(d: Llamad) -> dict[str, str]:
    """Each model's state on this host alone."""
    with urlopen(d.url + "/v1/models?peers=no") as r:
        return {m["id"]: m["llamad"]["state"] for m in json.loads(r.read())["data"]}


def served(url: str, model: str, n: int) -> set[str]:
    async def go() -> list[str]:
        async with aiohttp.ClientSession() as s:
            out = []
            for _ in range(n):
                sent = await ask(s, url, model)
                assert sent.status == 200, sent
                out.append(sent.host)
            return out
    return set(asyncio.run(go()))


def test_each_model_on_one_host_and_failover(hosts: tuple[Llamad, Llamad],
                                             box: rig.Box) -> None:
    one, two = hosts
    with Haproxy(box.workdir, [one, two], {A: one, B: two}) as lb:
        # 1. Each model always reaches its host, and is loaded there only.
        assert served(lb.url, A, 3) == {name(one)}
        assert served(lb.url, B, 3) == {name(two)}
        assert states(one)[A] == "ready" and states(one)[B] == "unloaded"
        assert states(two)[B] == "ready" and states(two)[A] == "unloaded"

        # 2. Whichever host answers, GET /v1/models lists the fleet's models.
        fleet = models(lb.url)
        assert {A, B, "only-one", "only-two"} <= set(fleet)

        # 3. The host of A stops (SIGTERM): it drains, HAProxy moves A to the other host.
        graceful = failover(lb.url, one, two, "stop")
        assert not graceful.failed(), graceful.failed()

        # While it is down the fleet's list says so, at once, and lists the rest.
        began = time.monotonic()
        with urlopen(two.url + "/v1/models") as r:
            listing = json.loads(r.read())
        assert time.monotonic() - began < 5
        assert listing["peers"][0]["url"] == one.url and "error" in listing["peers"][0]
        assert "only-two" in {m["id"] for m in listing["data"]}

        # 4. It comes back: A returns to it once HAProxy's checks see it up.
        one.start()
        rig.wait_for("A back on its host", lambda: served(lb.url, A, 1) == {name(one)},
                     timeout=30)

        # 5. Its llamad is killed outright: requests cut short are retried on the other host.
        crash = failover(lb.url, one, two, "kill")
        assert not crash.failed(), crash.failed()


def failover(url: str, gone: Llamad, other: Llamad, how: str) -> Traffic:
    """Requests for A through HAProxy while A's host goes away, until the other host has
    served five; prints what it measured (docs/scaling.md quotes it)."""
    with Traffic(url, A) as traffic:
        rig.wait_for("requests to flow", lambda: traffic.served_by(name(gone), 0) >= 3,
                     timeout=30)
        began = time.monotonic()
        if how == "stop":
            gone.box.run(["systemctl", "stop", "--no-block", gone.unit])
            rig.wait_for("/health to say draining", lambda: health(gone.url) == 503,
                         timeout=GRACE)
        else:
            gone.box.run(["systemctl", "kill", "--signal=SIGKILL", gone.unit])
        rig.wait_for(f"{A} served by the other host",
                     lambda: traffic.served_by(name(other), began) >= 5, timeout=120)
    after = [s for s in traffic.sent if s.at + s.took >= began]  # ended after
    first = min(s.at + s.took for s in after if s.host == name(other)) - began
    print(f"\nfailover by {how}: {len(after)} requests, {len(traffic.failed())} failed, "
          f"first answer from the other host {first:.2f}s after, slowest "
          f"{max(s.took for s in after):.2f}s")
    gone.stop()  # reset-failed after a kill
    return traffic


def health(url: str) -> int:
    import urllib.error
    try:
        with urlopen(url + "/health") as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0
