"""/api/show tells what a model runs with: the chat template llama-server applies, and the
capabilities read from it (tools, thinking), by which Ollama's clients (Continue, Open
WebUI, editors' agent modes) decide whether to offer tools. A preset's chat-template-file
or chat-template takes the place of the model file's own template in llama-server, so in
/api/show too. The supervisor runs over systemd faked at its boundary (nothing loads)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import ollama as ollama_client
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import ggufgen
from helpers.supervised import Rig

from llamad.api import ollama
from llamad.config import Config
from llamad.http import limits, middleware
from llamad.http.context import SUPERVISOR

OWN = "{{ messages[0].content }}"  # the file's own template: no tools, no thinking
TOOLS = "{%- if tools %}{{ tools | tojson }}{% endif %}<think>{{ messages[-1].content }}"


@pytest.fixture
async def show(tmp_path: Path) -> AsyncIterator[ollama_client.AsyncClient]:
    models = tmp_path / "models"
    for name in ("own", "by-file", "by-name", "unreadable"):
        ggufgen.write_model(models / f"{name}.gguf", extra={"tokenizer.chat_template": OWN})
        os.utime(models / f"{name}.gguf", (0, 0))  # older than the settle window
    (tmp_path / "tools.jinja").write_text(TOOLS)
    (tmp_path / "presets.ini").write_text(
        f"[by-file]\nchat-template-file = {tmp_path / 'tools.jinja'}\n"
        f"[by-name]\nchat-template = chatml\n"
        f"[unreadable]\nchat-template-file = {tmp_path / 'gone.jinja'}\n")
    config = Config.default(models_dirs=(models,), llama_cache=False,
                            models_preset=tmp_path / "presets.ini",
                            state_dir=tmp_path / "state", memory_reserve_mb=0)
    rig = Rig(config)
    lim = limits.Limits(config)  # read_json's bounds on a body
    app = web.Application(middlewares=[lim.middleware, middleware.error_middleware])
    app[limits.LIMITS] = lim
    app[SUPERVISOR] = rig.sup
    app.on_cleanup.append(lim.close)
    app.router.add_post("/api/show", ollama.handle_show)
    try:
        async with TestClient(TestServer(app)) as client, \
                ollama_client.AsyncClient(host=str(client.make_url(""))) as ask:
            yield ask
    finally:
        await rig.close()


async def test_the_template_a_preset_gives_is_the_one_shown(
        show: ollama_client.AsyncClient) -> None:
    own = await show.show("own")
    assert (own.template, own.capabilities) == (OWN, ["completion"])
    by_file = await show.show("by-file")
    assert by_file.template == TOOLS
    assert by_file.capabilities == ["completion", "tools", "thinking"]
    by_name = await show.show("by-name")  # llama.cpp's built-in template of that name
    assert (by_name.template, by_name.capabilities) == ("chatml", ["completion"])


async def test_a_template_file_llamad_cannot_read_leaves_the_files_own(
        show: ollama_client.AsyncClient) -> None:
    """Its model would not start either; /api/show still answers."""
    gone = await show.show("unreadable")
    assert (gone.template, gone.capabilities) == (OWN, ["completion"])
