"""A body of many top-level keys, as a hostile client sends one.

Every body over 64 KiB is checked on llamad's one scanning thread, one at a time: 28 MiB of
`"k1":0,"k2":0,...` took that thread 15 s (2.4 million keys, each through five Python
steps), and every other client's big body (an image, a long document) waited behind it.
Keys inside nested objects went through in bulk already; the top level's did not.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import threading
from typing import Any

import pytest

from llamad.errors import BadRequest
from llamad.http.body import WANTED, Scanner


def steps_and_fields(body: bytes) -> tuple[int, dict[str, Any]]:
    """How many bounded steps the Scanner takes (each as short as it can be), and what
    it found."""
    s = Scanner(body)
    steps = 1
    while not s.step(0.0):
        steps += 1
    return steps, s.fields


def test_many_top_level_keys_go_through_in_bulk() -> None:
    pairs = ",".join(f'"k{i}":{i % 7}' for i in range(200_000))
    body = ('{' + pairs + ',"model":"m","stream":true}').encode()
    steps, fields = steps_and_fields(body)
    assert fields == {"model": "m", "stream": True}
    # As for nested keys and array items (test_body.py's bounded steps): a step per run.
    assert steps < len(body) // 64, (len(body), steps)


def test_wanted_keys_among_many_are_found_as_a_strict_parser_finds_them() -> None:
    """A run is skipped whole only when no wanted key is in it: a key written with
    escapes, a value spelling a wanted key, a wanted key twice (the last counts, as in
    llama-server) and small nested values all read as json.loads reads them."""
    rng = random.Random(7)
    tricks = ['"model":"a"', '"mod\\u0065l":"b"', '"x":"model"', '"stream":false',
              '"keep_alive":"5m"', '"y":{"model":"inner"}', '"z":[1,"stream",null]',
              '"w" : "model" ', '"v":{"a":1}', '"model":{"k":[1,2]}']
    for _ in range(300):
        items = [f'"k{i}":{i}' for i in range(rng.randrange(0, 300))]
        for trick in rng.sample(tricks, rng.randrange(0, 4)):
            items.insert(rng.randrange(len(items) + 1), trick)
        body = ("{" + ", ".join(items) + "}").encode()
        want = {k: v for k, v in json.loads(body).items() if k in WANTED}
        assert steps_and_fields(body)[1] == want, body


def test_a_bad_pair_among_many_is_still_refused() -> None:
    good = ",".join(f'"k{i}":{i}' for i in range(1000))
    for bad in ('"a":01', '"a":[1,]', '"a\x01":1', '"a" 1', '"a":NaN', "'a':1"):
        body = ("{" + good + "," + bad + "," + good + "}").encode()
        try:
            steps_and_fields(body)
        except BadRequest as e:
            assert e.code == "invalid_json"
        else:
            raise AssertionError(f"{bad} was let through")


async def test_a_body_slow_to_check_does_not_hold_up_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Bodies over 64 KiB take turns on the one scanning thread: one built to be slow to
    check (small arrays of arrays, about a microsecond a byte) no longer makes a 10 MB
    prompt sent after it wait until it is done."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from helpers import guarded

    from llamad.http.body import read_json

    slow_began = threading.Event()
    real = Scanner.step

    def step(self: Scanner, deadline: float) -> bool:
        if len(self.buf) > 1 << 20 and threading.current_thread() is not threading.main_thread():
            slow_began.set()
        return real(self, deadline)
    monkeypatch.setattr(Scanner, "step", step)
    done: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        _, fields = await read_json(request)
        done.append(fields.get("model"))
        return web.json_response({})

    app = guarded.body_checking(handle)
    slow = b'{"model": "slow", "x": [' + b",".join([b"[[0]]"] * 300_000) + b"]}"
    prompt = json.dumps({"model": "prompt", "prompt": "word " * 2_000_000}).encode()
    async with TestClient(TestServer(app)) as client:
        first = asyncio.ensure_future(client.post("/", data=io.BytesIO(slow)))
        await asyncio.get_running_loop().run_in_executor(None, slow_began.wait, 30)
        second = await client.post("/", data=io.BytesIO(prompt))
        assert second.status == 200 and done == ["prompt"]
        assert (await first).status == 200 and done == ["prompt", "slow"]
