"""backend = tcp: a model's port is allocated once and kept; adding a model moves no one,
and a restarted llamad adopts the units at the ports they recorded."""

from __future__ import annotations

import os

import aiohttp
import rig
from helpers.daemon import Factory, Llamad, chat, models, wait_http, wait_state


async def answers_as(s: aiohttp.ClientSession, d: Llamad, model: str) -> bool:
    """The model answers, and from its own file (each name is its own link)."""
    async with s.get(d.url + "/props", params={"model": model}) as r:
        path = (await r.json())["model_path"] if r.status == 200 else ""
    return path.endswith(f"/{model}.gguf") and (await chat(s, d.url, model))[0] == 200


def port(d: Llamad, model: str) -> str:
    env = d.show(f"llama-server@{model}.service", "Environment")
    return next(e for e in env.split() if e.startswith("LLAMAD_BACKEND="))


async def test_ports_stay_with_their_models(llamad_factory: Factory,
                                            assets: rig.Assets) -> None:
    d = llamad_factory(["gemma-b", "gemma-c"], backend="tcp", **{"models-max": 3})
    async with aiohttp.ClientSession() as s:
        for model in ("gemma-b", "gemma-c"):
            assert (await chat(s, d.url, model))[0] == 200
        before = {m: port(d, m) for m in ("gemma-b", "gemma-c")}
        os.link(assets.model, d.models_dir / "gemma-a.gguf")  # sorts before both
        rig.wait_for("gemma-a to be listed", lambda: "gemma-a" in models(d.url), timeout=30)
        for model in ("gemma-b", "gemma-c"):
            assert await answers_as(s, d, model)
        assert await answers_as(s, d, "gemma-a")  # its own port: it could bind
    ports = {m: port(d, m) for m in ("gemma-a", "gemma-b", "gemma-c")}
    assert {m: ports[m] for m in before} == before and len(set(ports.values())) == 3
    invocations = {m: d.show(f"llama-server@{m}.service", "InvocationID") for m in ports}
    d.restart()
    wait_http(d.url)
    async with aiohttp.ClientSession() as s:
        for model in ports:
            wait_state(d.url, model, "ready", timeout=60)
            assert await answers_as(s, d, model)
    assert {m: d.show(f"llama-server@{m}.service", "InvocationID") for m in ports} == invocations
    assert all(f"adopting llama-server@{m}.service" in d.log() for m in ports)
