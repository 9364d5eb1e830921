"""llamad serve on real systemd, real llama-server and the real Gemma model."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import pytest
import rig
from llamad_fixture import Llamad, chat, models, state, stream, wait_http


@pytest.fixture
def llamad_factory(box: rig.Box, assets: rig.Assets) -> Iterator[object]:
    made: list[Llamad] = []

    def make(names: list[str], **settings: object) -> Llamad:
        d = Llamad(box, assets, names, **settings)
        made.append(d)
        d.start()
        wait_http(d.url)
        return d
    yield make
    for d in made:
        d.cleanup()


async def test_chat_and_listing(llamad_factory) -> None:  # type: ignore[no-untyped-def]
    d = llamad_factory(["gemma-a"])
    listing = models(d.url)
    assert listing["gemma-a"]["status"]["value"] == "unloaded"
    assert listing["gemma-a"]["llamad"]["unit"] == "llama-server@gemma-a.service"
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, d.url, "gemma-a")
        assert status == 200, body
        assert body["choices"][0]["message"]["content"]
        events = await stream(s, d.url, "gemma-a", max_tokens=16)
    assert events[-1] == {"done": True}
    assert state(d.url, "gemma-a") == "ready"
    assert d.model_units() == {"llama-server@gemma-a.service": "active"}
    rig.wait_for("STATUS= to name the loaded model",
                 lambda: d.show(d.unit, "StatusText") == "1 models, 1 loaded: gemma-a", timeout=10)
