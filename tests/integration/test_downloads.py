"""Downloads and removals on the real box: llamad starts a sandboxed unit per download
(llamad-download@<model>.service) against the fake hub on loopback, and serves what lands in
llama.cpp's cache without a restart. Both dialects: llama.cpp's router (POST and DELETE
/models, /models/sse events) and Ollama's (/api/pull progress lines, /api/delete), and the
CLI (`llamad pull`, `llamad rm`)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import rig
from helpers.daemon import PYTHON, Factory, Llamad, chat, models
from helpers.fakehub import TOKEN, FakeHub, File
from helpers.ggufgen import write_model
from helpers.watch import eventually

TINY = "org/tiny-GGUF"
TINY_FILE = "tiny-F16.gguf"
TINY_ID = f"{TINY}:F16"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real GGUF of about 6 MB: a download of it takes seconds at the slow hub's rate."""
    path = tmp_path_factory.mktemp("gguf") / "big.gguf"
    return write_model(path, blocks=4, rows=256, embd=1536).read_bytes()


@pytest.fixture
def fake_hub(tiny: bytes) -> Iterator[FakeHub]:
    with FakeHub(cdn_host="localhost") as h:
        h.add(TINY, {TINY_FILE: tiny, "README.md": b"tiny\n"})
        yield h


def cache_for(box: rig.Box, name: str) -> Path:
    path = box.workdir / name
    path.mkdir(mode=0o755, exist_ok=True)
    return path


def downloader(box: rig.Box, assets: rig.Assets, factory: Factory, fake: FakeHub,
               name: str, **settings: Any) -> Llamad:
    """A llamad with no models of its own whose llama.cpp cache starts empty."""
    return factory([], **{"llama-cache": "yes", "hf-endpoint": fake.url,
                          "llama-cache-dir": str(cache_for(box, name)), **settings})


async def sse_events(s: aiohttp.ClientSession, url: str, into: list[dict[str, Any]],
                     ready: asyncio.Event) -> None:
    async with s.get(url + "/models/sse") as r:
        ready.set()
        async for raw in r.content:
            if raw.startswith(b"data: "):
                into.append(json.loads(raw[6:]))


async def wait_event(into: list[dict[str, Any]], event: str, model: str,
                     timeout: float = 60) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        return next((e for e in into if e.get("event") == event and e.get("model") == model),
                    None)
    await eventually(f"the {event} event of {model}", found, timeout=timeout, every=0.05)
    event_found = found()
    assert event_found is not None
    return event_found


def journal_units(box: rig.Box, d: Llamad, prefix: str, verb: str = "Started") -> list[str]:
    """The units of `prefix` systemd started (or began to start: verb "Starting") during
    this llamad's life."""
    out = box.journal(f"--after-cursor={d.cursor}", "_PID=1")
    return [line.split(f"{verb} ", 1)[1] for line in out.splitlines()
            if f"{verb} {prefix}" in line]


async def test_router_download_events_list_and_delete(
        llamad_factory: Factory, box: rig.Box, assets: rig.Assets, fake_hub: FakeHub) -> None:
    d = downloader(box, assets, llamad_factory, fake_hub, "cache-router")
    events: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as s:
        ready = asyncio.Event()
        listen = asyncio.ensure_future(sse_events(s, d.url, events, ready))
        await asyncio.wait_for(ready.wait(), 10)
        async with s.post(d.url + "/models", json={"model": TINY_ID}) as r:
            assert r.status == 200, await r.text()
            assert await r.json() == {"success": True, "model": TINY_ID}
        await wait_event(events, "download_finished", TINY_ID)
        progress = [e for e in events if e["event"] == "download_progress"]
        assert progress and all(e["model"] == TINY_ID for e in progress)
        last = progress[-1]["data"]["progress"]
        [(url, done)] = last.items()
        assert url.endswith(f"/{TINY}/resolve/{fake_hub.repos[TINY].commit}/{TINY_FILE}")
        assert done == {"done": len(fake_hub.file(TINY, TINY_FILE).data),
                        "total": len(fake_hub.file(TINY, TINY_FILE).data)}
        listed = models(d.url)  # served without a restart, named as the router names it
        assert listed[TINY_ID]["source"] == "cache" and listed[TINY_ID]["can_remove"] is True
        # The same name again: router mode's answer.
        async with s.post(d.url + "/models", json={"model": TINY_ID}) as r:
            assert r.status == 400 and "already exists" in (await r.json())["error"]["message"]
        async with s.delete(d.url + "/models", params={"model": TINY_ID}) as r:
            assert r.status == 200, await r.text()
            assert await r.json() == {"success": True}
        await wait_event(events, "model_remove", TINY_ID)
        listen.cancel()
        await asyncio.gather(listen, return_exceptions=True)
    assert TINY_ID not in models(d.url)
    repo = box.workdir / "cache-router" / "models--org--tiny-GGUF"
    # As llama.cpp's removal of one tag: its links and blobs go, refs/main stays.
    assert [p.name for p in repo.rglob("*") if p.is_file() or p.is_symlink()] == ["main"]
    assert journal_units(box, d, "llamad-download@") == [
        "llamad-download@org-tiny-GGUF:F16-" + _hash(TINY_ID) + ".service - llamad download "
        f"of {TINY_ID}."]
    assert f"{TINY_FILE}: {len(fake_hub.file(TINY, TINY_FILE).data)} bytes, sha256:" in \
        box.journal("-u", "llamad-download@*", f"--after-cursor={d.cursor}")


def _hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:8]


GEMMA_REPO = "org/gemma-3-270m-GGUF"
GEMMA_ID = f"{GEMMA_REPO}:Q4_K_M"


def cli(box_env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PYTHON), "-m", "llamad", *argv], capture_output=True, text=True,
                          timeout=600, env=box_env, check=False)


async def test_pull_then_a_request_serves_a_model_that_was_not_on_disk(
        llamad_factory: Factory, box: rig.Box, assets: rig.Assets, box_env: dict[str, str],
        fake_hub: FakeHub) -> None:
    fake_hub.add(GEMMA_REPO, {"gemma-3-270m-Q4_K_M.gguf": assets.model.read_bytes(),
                              "gemma-3-270m-Q8_0.gguf": b"not this one" * 200})
    d = downloader(box, assets, llamad_factory, fake_hub, "cache-pull")
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, d.url, GEMMA_ID)
        assert status == 404  # not on disk yet
        pulled = cli(box_env, "pull", "--url", d.url, GEMMA_REPO)
        assert pulled.returncode == 0, pulled.stderr
        assert f"{GEMMA_ID}: in the cache; llamad serves it as {GEMMA_ID}" in pulled.stdout
        size = assets.model.stat().st_size
        assert f"100% [{'#' * 30}] {size / 2**20:.1f} MiB/{size / 2**20:.1f} MiB" in \
            pulled.stdout  # the one file's line, complete (no terminal: no bar in motion)
        status, body = await chat(s, d.url, GEMMA_ID, "Say hi", max_tokens=4)
        assert status == 200, body
        assert body["model"] == GEMMA_ID and body["choices"][0]["message"]["content"]
    # llama.cpp's own layout: a link in the snapshot to the verified blob.
    snap = box.workdir / "cache-pull/models--org--gemma-3-270m-GGUF/snapshots" / \
        fake_hub.repos[GEMMA_REPO].commit
    assert (snap / "gemma-3-270m-Q4_K_M.gguf").is_symlink()
    removed = cli(box_env, "rm", "--url", d.url, GEMMA_ID)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout == f"{GEMMA_ID}: removed from the cache\n"
    assert GEMMA_ID not in models(d.url)
    again = cli(box_env, "rm", "--url", d.url, GEMMA_ID)
    assert again.returncode == 1 and "is not known to llamad" in again.stderr


async def test_ollama_pull_lines_and_delete(llamad_factory: Factory, box: rig.Box,
                                            assets: rig.Assets, fake_hub: FakeHub) -> None:
    d = downloader(box, assets, llamad_factory, fake_hub, "cache-ollama")
    f = fake_hub.file(TINY, TINY_FILE)
    async with aiohttp.ClientSession() as s:
        # A `stream` that is not true or false is Ollama's 400, before anything downloads.
        async with s.post(d.url + "/api/pull", json={"model": f"hf.co/{TINY}:f16",
                                                     "stream": "false"}) as r:
            assert r.status == 400 and "stream" in (await r.json())["error"]
        assert TINY_ID not in models(d.url)
        async with s.post(d.url + "/api/pull", json={"model": f"hf.co/{TINY}:f16"}) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/x-ndjson"
            assert r.headers["X-Llamad-Model"] == TINY_ID
            lines = [json.loads(raw) async for raw in r.content]
        assert lines[0] == {"status": "pulling manifest"}
        assert lines[-3:] == [{"status": "verifying sha256 digest"},
                              {"status": "writing manifest"}, {"status": "success"}]
        layers = lines[1:-3]
        assert layers and layers[-1] == {"status": f"pulling {f.oid[:12]}",
                                         "digest": f"sha256:{f.oid}", "total": len(f.data),
                                         "completed": len(f.data)}
        assert TINY_ID in models(d.url)
        async with s.post(d.url + "/api/pull", json={"model": "org/nothing", "stream": False}) \
                as r:
            body = await r.json()
            assert r.status == 502 and set(body) == {"error"}
            assert "the hub refuses repository org/nothing without a token" in body["error"]
        async with s.delete(d.url + "/api/delete", json={"model": f"hf.co/{TINY}:F16"}) as r:
            assert r.status == 200 and await r.read() == b""
        async with s.delete(d.url + "/api/delete", json={"model": f"hf.co/{TINY}:F16"}) as r:
            assert r.status == 404
            assert await r.json() == {"error": f"model 'hf.co/{TINY}:F16' not found"}
        async with s.delete(d.url + "/api/delete", json={"name": "nonsense"}) as r:
            assert r.status == 404
    assert TINY_ID not in models(d.url)


async def test_many_clients_one_unit_one_transfer(llamad_factory: Factory, box: rig.Box,
                                                  assets: rig.Assets, big: bytes) -> None:
    data = big
    with FakeHub(rate=3_000_000) as slow:
        slow.add("org/slow", {"slow-Q4_K_M.gguf": data})
        d = downloader(box, assets, llamad_factory, slow, "cache-many")
        async with aiohttp.ClientSession() as s:
            async def pull() -> list[dict[str, Any]]:
                async with s.post(d.url + "/api/pull", json={"model": "org/slow"}) as r:
                    assert r.status == 200, await r.text()
                    return [json.loads(raw) async for raw in r.content]

            async def router() -> int:
                async with s.post(d.url + "/models", json={"model": "org/slow"}) as r:
                    return r.status
            answers = await asyncio.gather(pull(), pull(), pull(), router())
        assert all(a[-1] == {"status": "success"} for a in answers[:3])
        assert answers[3] == 200
        assert len(journal_units(box, d, "llamad-download@", "Starting")) == 1
        assert len(journal_units(box, d, "llamad-download@")) == 1
        assert len(slow.gets(hashlib.sha256(data).hexdigest())) == 1


async def test_downloads_and_deletes_are_for_admin_keys_only(
        llamad_factory: Factory, box: rig.Box, assets: rig.Assets, fake_hub: FakeHub) -> None:
    keys = box.workdir / "download-keys"
    keys.write_text("boss admin\nplain\nnarrow models=org/tiny-GGUF:F16\n")
    keys.chmod(0o600)
    d = downloader(box, assets, llamad_factory, fake_hub, "cache-keys",
                   **{"api-keys-file": str(keys)})
    async with aiohttp.ClientSession() as s:
        for key in ("plain", "narrow"):
            cases: list[tuple[str, str, dict[str, Any]]] = [
                ("POST", "/models", {"json": {"model": TINY_ID}}),
                ("DELETE", "/models", {"params": {"model": TINY_ID}}),
                ("POST", "/api/pull", {"json": {"model": TINY_ID}}),
                ("DELETE", "/api/delete", {"json": {"model": TINY_ID}}),
                ("DELETE", f"/v1/models/{TINY_ID}", {})]
            for method, path, kw in cases:
                async with s.request(method, d.url + path, **kw,
                                     headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status == 403, (key, path)
        assert not journal_units(box, d, "llamad-download@")
        assert not [s for s in fake_hub.seen]  # nobody asked the hub anything
        async with s.post(d.url + "/models", json={"model": TINY_ID},
                          headers={"Authorization": "Bearer boss"}) as r:
            assert r.status == 200, await r.text()


async def test_gated_repository_with_the_token_file_and_the_token_stays_secret(
        llamad_factory: Factory, box: rig.Box, assets: rig.Assets, fake_hub: FakeHub,
        tiny: bytes) -> None:
    fake_hub.add("org/gated", {"gated-Q8_0.gguf": tiny}, gated=True)
    d = downloader(box, assets, llamad_factory, fake_hub, "cache-gated")
    async with aiohttp.ClientSession() as s, \
            s.post(d.url + "/models", json={"model": "org/gated"}) as r:
        assert r.status == 502
        error = (await r.json())["error"]
        assert error["code"] == "download_failed"
        assert "Access to model org/gated is restricted" in error["message"]
        assert "set hf-token-file in llamad.conf" in error["message"]
    d.stop()
    token = box.workdir / "hf-token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    d = downloader(box, assets, llamad_factory, fake_hub, "cache-gated",
                   **{"hf-token-file": str(token)})
    async with aiohttp.ClientSession() as s, \
            s.post(d.url + "/api/pull", json={"model": "org/gated", "stream": False}) as r:
        assert r.status == 200 and await r.json() == {"status": "success"}, await r.text()
    assert "org/gated:Q8_0" in models(d.url)
    assert [x.token for x in fake_hub.seen if "/resolve/" in x.path][-1]
    everything = box.journal(f"--after-cursor={d.cursor}")
    assert "llamad-download@org-gated" in everything and TOKEN not in everything
    units = box.run("grep -rl hf_ /run/systemd/transient/ || true").stdout
    assert units == ""  # a path to the credential, never the token, in any unit file


async def test_a_download_survives_llamad_restarting_and_resumes_after_a_stop(
        llamad_factory: Factory, box: rig.Box, assets: rig.Assets, big: bytes) -> None:
    data = big
    oid = hashlib.sha256(data).hexdigest()
    with FakeHub(rate=1_000_000) as slow:
        slow.add("org/long", {"long-Q4_K_M.gguf": data})
        d = downloader(box, assets, llamad_factory, slow, "cache-long")
        part = box.workdir / "cache-long/models--org--long/blobs" / (oid + ".downloadInProgress")
        async with aiohttp.ClientSession() as s, \
                s.post(d.url + "/models", json={"model": "org/long"}) as r:
            assert r.status == 200, await r.text()
        unit = next(u.split(" ")[0] for u in journal_units(box, d, "llamad-download@"))
        # The sandbox, as systemd holds it.
        for prop, want in [("ProtectSystem", "strict"), ("CapabilityBoundingSet", ""),
                           ("NoNewPrivileges", "yes"), ("PrivateDevices", "yes"),
                           ("ReadWritePaths", str(box.workdir / "cache-long")),
                           ("RestartPreventExitStatus", "65"), ("Type", "notify")]:
            assert d.show(unit, prop) == want, prop
        rig.wait_for("a part of the file", lambda: part.exists() and part.stat().st_size > 0)
        d.restart()  # llamad goes away and comes back; the download goes on meanwhile
        rig.wait_for("llamad again", lambda: models(d.url) is not None)
        rig.wait_for("the download", lambda: "org/long:Q4_K_M" in models(d.url), timeout=60)
        assert "following the download of org/long" in d.log()
        assert len(slow.gets(oid)) == 1
        # A stop (systemctl stop, a reboot) leaves the part; the next pull resumes it.
        async with aiohttp.ClientSession() as s:
            async with s.delete(d.url + "/models", params={"model": "org/long:Q4_K_M"}) as r:
                assert r.status == 200
            async with s.post(d.url + "/models", json={"model": "org/long"}) as r:
                assert r.status == 200
            rig.wait_for("a part of the file", lambda: part.exists() and
                         part.stat().st_size > 1_000_000)
            box.run(["systemctl", "stop", unit])
            kept = part.stat().st_size
            async with s.post(d.url + "/api/pull", json={"model": "org/long"}) as r:
                lines = [json.loads(raw) async for raw in r.content]
            assert lines[-1] == {"status": "success"}
        assert slow.gets(oid)[-1].range == f"bytes={kept}-"
        assert "org/long:Q4_K_M" in models(d.url)


async def test_failures_reach_the_client(llamad_factory: Factory, box: rig.Box,
                                         assets: rig.Assets, fake_hub: FakeHub,
                                         tiny: bytes) -> None:
    # Bytes of their own: the fake CDN finds a file by its hash.
    fake_hub.add("org/bad", {"bad-Q4_K_M.gguf": File(tiny + b"bad" * 9, corrupt=True)})
    fake_hub.add("org/huge", {"huge-Q4_K_M.gguf": File(tiny, claimed=2**50)})
    d = downloader(box, assets, llamad_factory, fake_hub, "cache-fail")
    events: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as s:
        ready = asyncio.Event()
        listen = asyncio.ensure_future(sse_events(s, d.url, events, ready))
        await asyncio.wait_for(ready.wait(), 10)
        async with s.post(d.url + "/models", json={"model": "org/bad"}) as r:
            assert r.status == 200  # the hub named the file; its bytes come after
        failed = await wait_event(events, "download_failed", "org/bad")
        assert "bad-Q4_K_M.gguf does not match the hub's sha256:" in failed["data"]["error"]
        async with s.post(d.url + "/models", json={"model": "org/huge"}) as r:
            assert r.status == 502
            assert "not enough free disk space" in (await r.json())["error"]["message"]
        async with s.post(d.url + "/models", json={"model": "../../etc/passwd"}) as r:
            assert r.status == 400
        async with s.post(d.url + "/models", json={"model": "-rf/x"}) as r:
            assert r.status == 400
        listen.cancel()
        await asyncio.gather(listen, return_exceptions=True)
    assert "org/bad:Q4_K_M" not in models(d.url)
    # Failed units are read and cleared, not left behind.
    left = box.run(["systemctl", "list-units", "--all", "--no-legend", "llamad-download@*"])
    assert left.stdout.strip() == ""


async def test_deleting_a_loaded_model_unloads_it_first(
        llamad_factory: Factory, box: rig.Box, assets: rig.Assets, fake_hub: FakeHub) -> None:
    fake_hub.add(GEMMA_REPO, {"gemma-3-270m-Q4_K_M.gguf": assets.model.read_bytes()})
    d = downloader(box, assets, llamad_factory, fake_hub, "cache-loaded")
    async with aiohttp.ClientSession() as s:
        async with s.post(d.url + "/api/pull", json={"model": GEMMA_REPO, "stream": False}) \
                as r:
            assert r.status == 200, await r.text()
        status, _ = await chat(s, d.url, GEMMA_ID)
        assert status == 200
        assert d.model_units()
        async with s.delete(d.url + "/models", params={"model": GEMMA_ID}) as r:
            assert r.status == 200, await r.text()
        status, body = await chat(s, d.url, GEMMA_ID)
        assert status == 404, body
    rig.wait_for("the model's unit to stop", lambda: not d.model_units(), timeout=60)
    # A model of a models directory is not the cache's to remove.
    other = llamad_factory(["gemma-x"])
    async with aiohttp.ClientSession() as s, \
            s.delete(other.url + "/models", params={"model": "gemma-x"}) as r:
        assert r.status == 400
        assert "is not removable" in (await r.json())["error"]["message"]
    assert (other.models_dir / "gemma-x.gguf").exists()


async def test_the_openai_client_deletes_a_download(
        llamad_factory: Factory, box: rig.Box, assets: rig.Assets, fake_hub: FakeHub) -> None:
    """llama-server has no DELETE /v1/models/{id} (404); OpenAI's models.delete removes a
    model, so llamad takes it as DELETE /models, in OpenAI's shape."""
    import openai
    d = downloader(box, assets, llamad_factory, fake_hub, "cache-openai")
    async with aiohttp.ClientSession() as s, \
            s.post(d.url + "/api/pull", json={"model": TINY_ID, "stream": False}) as r:
        assert r.status == 200, await r.text()
    client = openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="none", max_retries=0)
    async with client:
        assert TINY_ID in {m.id async for m in client.models.list()}
        gone = await client.models.delete(TINY_ID)
        assert (gone.id, gone.object, gone.deleted) == (TINY_ID, "model", True)
        assert TINY_ID not in {m.id async for m in client.models.list()}
        with pytest.raises(openai.NotFoundError):
            await client.models.delete(TINY_ID)
    assert TINY_ID not in models(d.url)


async def test_ollamas_own_client_pulls_and_deletes(llamad_factory: Factory, box: rig.Box,
                                                    assets: rig.Assets,
                                                    fake_hub: FakeHub) -> None:
    import ollama
    d = downloader(box, assets, llamad_factory, fake_hub, "cache-ollama-client")
    async with ollama.AsyncClient(host=d.url) as client:
        f = fake_hub.file(TINY, TINY_FILE)
        progress = [p async for p in await client.pull(f"hf.co/{TINY}:F16", stream=True)]
        assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
        assert any(p.digest == f"sha256:{f.oid}" and p.completed == p.total == len(f.data)
                   for p in progress)
        assert TINY_ID in {m.model for m in (await client.list()).models}
        with pytest.raises(ollama.ResponseError) as refused:
            await client.pull("org/nothing")
        assert "the hub refuses repository org/nothing" in refused.value.error
        assert (await client.delete(f"hf.co/{TINY}:F16")).status == "success"
        with pytest.raises(ollama.ResponseError) as gone:
            await client.delete(f"hf.co/{TINY}:F16")
        assert gone.value.status_code == 404
