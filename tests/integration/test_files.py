"""Model files and presets changing under a running llamad: a stream in flight is drained,
never cut or left hanging; a changed model starts again; a file copied in and requested
at once is served."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import rig
from helpers.daemon import Factory, Llamad, chat, models, stream, wait_state

UNIT = "llama-server@gemma-a.service"


def private_copy(src: Path, dest: Path) -> None:
    """A file of its own (the assets are hard links to the shared cache: touching or
    rewriting one would change every llamad's model), old enough to count as settled."""
    tmp = dest.with_name(".copy-" + dest.name)
    shutil.copyfile(src, tmp)
    os.utime(tmp, (time.time() - 60,) * 2)
    os.replace(tmp, dest)


CHANGES: dict[str, Callable[[Path, Path], object]] = {
    "touch": lambda f, src: os.utime(f),
    "cp-over": lambda f, src: shutil.copyfile(src, f),  # rewritten in place, same inode
    "rm": lambda f, src: f.unlink(),
    "mv": lambda f, src: f.rename(f.with_name("gemma-z.gguf")),
}


def with_private_model(llamad_factory: Factory, assets: rig.Assets) -> Llamad:
    d = llamad_factory([])
    private_copy(assets.model, d.models_dir / "gemma-a.gguf")
    rig.wait_for("gemma-a to be listed", lambda: "gemma-a" in models(d.url), timeout=30)
    return d


@pytest.mark.parametrize("change", CHANGES)
async def test_a_stream_survives_its_model_file_changing(llamad_factory: Factory,
                                                         assets: rig.Assets, change: str) -> None:
    d = with_private_model(llamad_factory, assets)
    path = d.models_dir / "gemma-a.gguf"
    changed: list[str] = []

    def change_once(n: int) -> None:
        if n == 5 and not changed:
            changed.append(d.show(UNIT, "InvocationID"))
            CHANGES[change](path, assets.model)

    async with aiohttp.ClientSession() as s:
        events = await asyncio.wait_for(
            stream(s, d.url, "gemma-a", max_tokens=200, on_event=change_once), 900)
        assert changed
        if change == "cp-over":  # the running process's mapped file was truncated under it
            assert events[-1] == {"done": True} or "error" in events[-1], events[-3:]
        else:  # drained like an unload: the stream is not cut
            assert events[-1] == {"done": True}, events[-3:]
        if change in ("rm", "mv"):
            await asyncio.to_thread(rig.wait_for, "the unit to stop",
                                    lambda: UNIT not in d.model_units(), 60)
            assert (await chat(s, d.url, "gemma-a"))[0] == 404
        else:  # started again on the new file
            await asyncio.to_thread(rig.wait_for, "a new invocation", lambda: d.show(
                UNIT, "InvocationID") not in ("", changed[0]), 120)
            await asyncio.to_thread(wait_state, d.url, "gemma-a", "ready", 120)
            assert (await chat(s, d.url, "gemma-a"))[0] == 200
        if change == "mv":
            assert (await chat(s, d.url, "gemma-z"))[0] == 200


async def test_a_model_copied_in_and_requested_at_once_is_served(llamad_factory: Factory,
                                                                 assets: rig.Assets) -> None:
    d = llamad_factory(["gemma-a"])
    shutil.copyfile(assets.model, d.models_dir / "gemma-new.gguf")  # cp m.gguf models/
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, d.url, "gemma-new")  # && curl ...
    assert status == 200, body


def running_args(d: Llamad) -> str:
    """The model process's command line, as the kernel has it."""
    pid = d.show(UNIT, "MainPID")
    out = d.box.run(["cat", f"/proc/{pid}/cmdline"], check=False).stdout
    return " ".join(out.split("\0"))


async def test_an_edited_preset_restarts_the_model_with_its_new_arguments(
        llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"], preset="[gemma-a]\nbatch-size = 256\n")
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
        assert "--batch-size 256" in running_args(d)
        (d.dir / "presets.ini").write_text("[gemma-a]\nbatch-size = 128\n")
        await asyncio.to_thread(rig.wait_for, "the unit to run the new arguments",
                                lambda: "--batch-size 128" in running_args(d), 60)
        await asyncio.to_thread(wait_state, d.url, "gemma-a", "ready", 120)
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
