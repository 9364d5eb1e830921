"""Ollama's model store as Ollama lays it out: manifests naming blobs by digest."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import ggufgen
from helpers.catalogs import DEBOUNCE, Feed, config, problems_about

from llamad.catalog.catalog import Catalog, scan
from llamad.catalog.gguf_info import InfoCache
from llamad.catalog.ollamastore import MODEL, PROJECTOR, discover, model_name
from llamad.catalog.watcher import CatalogWatcher

TEMPLATE = "application/vnd.ollama.image.template"


def blob(store: Path, data: bytes | None = None, model: bool = True) -> str:
    """A blob as Ollama names it; its digest."""
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    tmp = store / "blobs" / "partial"
    if data is None:
        (ggufgen.write_mmproj if not model else ggufgen.write_model)(tmp)
    else:
        tmp.write_bytes(data)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.rename(store / "blobs" / f"sha256-{digest}")
    return f"sha256:{digest}"


def manifest(store: Path, name: str, layers: list[tuple[str, str]] | str) -> Path:
    """name: host/namespace/model/tag."""
    path = store / "manifests" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    body = layers if isinstance(layers, str) else json.dumps({
        "schemaVersion": 2, "layers": [{"mediaType": m, "digest": d, "size": 1}
                                       for m, d in layers]})
    path.write_text(body)
    return path


def test_names_as_ollama_lists_them() -> None:
    assert model_name("registry.ollama.ai", "library", "llama3.2", "latest") == "llama3.2"
    assert model_name("registry.ollama.ai", "library", "llama3.2", "1b") == "llama3.2:1b"
    assert model_name("registry.ollama.ai", "someone", "m", "latest") == "someone/m"
    assert model_name("hf.co", "user", "repo", "Q4_K_M") == "hf.co/user/repo:Q4_K_M"


def test_models_projectors_and_what_cannot_be_served(tmp_path: Path) -> None:
    store = tmp_path / "models"
    model, template = blob(store), blob(store, b"{{ .Prompt }}")
    manifest(store, "registry.ollama.ai/library/tiny/latest",
             [(MODEL, model), (TEMPLATE, template)])
    manifest(store, "registry.ollama.ai/library/tiny/1b", [(MODEL, model)])
    manifest(store, "registry.ollama.ai/library/eyes/latest",
             [(MODEL, model), (PROJECTOR, blob(store, model=False))])
    manifest(store, "hf.co/user/repo/Q4_K_M", [(MODEL, model)])
    manifest(store, "registry.ollama.ai/library/textonly/latest", [(TEMPLATE, template)])
    # What llamad cannot serve: each one problem line, the rest served.
    manifest(store, "registry.ollama.ai/library/broken/latest", "{not json")
    manifest(store, "registry.ollama.ai/library/huge/latest", " " * (2 << 20) + "{}")
    manifest(store, "registry.ollama.ai/library/nolayers/latest", '{"layers": 3}')
    manifest(store, "registry.ollama.ai/library/missing/latest", [(MODEL, "sha256:" + "0" * 64)])
    manifest(store, "registry.ollama.ai/library/odd/latest", [(MODEL, "md5:abc")])
    manifest(store, "registry.ollama.ai/library/lora/latest",
             [(MODEL, model), ("application/vnd.ollama.image.adapter", template)])
    fifo = store / "manifests/registry.ollama.ai/library/fifo/latest"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    problems: list[str] = []
    found = {name: (shards, mmproj) for name, shards, mmproj in discover(store, problems)}
    path = store / "blobs" / model.replace(":", "-")
    assert found == {
        "tiny": ((path,), None), "tiny:1b": ((path,), None),
        "hf.co/user/repo:Q4_K_M": ((path,), None), "eyes": ((path,), found["eyes"][1])}
    assert found["eyes"][1] is not None and found["eyes"][1].parent == store / "blobs"
    why = {p.split("/library/")[1].split("/")[0]: p for p in problems}
    assert set(why) == {"broken", "huge", "nolayers", "missing", "odd", "lora", "fifo"}, problems
    assert "not a JSON manifest of at most 1 MiB" in why["huge"]
    assert "LoRA adapter" in why["lora"] and "FIFO" in why["fifo"]
    assert "cannot be read" in why["missing"] and "not sha256" in why["odd"]
    assert all(p.startswith("Ollama's ") and p.endswith("; skipped.") for p in problems)


def test_the_catalog_serves_a_fresh_pull_at_once(tmp_path: Path) -> None:
    # A blob just pulled is whole (Ollama renames it into place): not held back to settle.
    store = tmp_path / "ollama"
    manifest(store, "registry.ollama.ai/library/tiny/latest", [(MODEL, blob(store))])
    ggufgen.write_model(tmp_path / "dir" / "local.gguf")
    os.utime(tmp_path / "dir" / "local.gguf", (1, 1_000_000_000))
    snap = scan(config(tmp_path / "dir", ollama_models=store), cache=InfoCache())
    assert sorted(snap.models) == ["local", "tiny"] and not snap.settling
    assert snap.models["tiny"].source == "ollama" and snap.models["local"].source == "models_dir"
    assert snap.models["tiny"].info is not None
    # A name both places use is one problem, as between any two places.
    manifest(store, "registry.ollama.ai/library/local/latest", [(MODEL, blob(store))])
    snap = scan(config(tmp_path / "dir", ollama_models=store), cache=InfoCache())
    assert problems_about(snap, "'local' is used by both")
    # Off: nothing read there.
    snap = scan(config(tmp_path / "dir", ollama_models=None), cache=InfoCache())
    assert sorted(snap.models) == ["local"]


async def test_a_pull_after_the_start_appears(tmp_path: Path) -> None:
    store = tmp_path / "usr" / "share" / "ollama" / "models"  # Ollama not installed yet
    catalog = Catalog(config(tmp_path, ollama_models=store), settle=0.6)
    feed = Feed(catalog)
    async with CatalogWatcher(catalog, debounce=DEBOUNCE):
        digest = blob(store)
        manifest(store, "registry.ollama.ai/library/tiny/latest", [(MODEL, digest)])
        await feed.until(lambda s: "tiny" in s.models)
        manifest(store, "registry.ollama.ai/library/tiny/1b", [(MODEL, digest)])
        await feed.until(lambda s: "tiny:1b" in s.models)
        (store / "manifests/registry.ollama.ai/library/tiny/latest").unlink()  # ollama rm
        await feed.until(lambda s: "tiny" not in s.models)


def test_the_command_line_shows_the_store(tmp_path: Path) -> None:
    store = tmp_path / "ollama"
    digest = blob(store)
    manifest(store, "registry.ollama.ai/library/tiny/latest", [(MODEL, digest)])
    manifest(store, "registry.ollama.ai/library/lora/latest",
             [(MODEL, digest), ("application/vnd.ollama.image.adapter", digest)])
    conf = tmp_path / "llamad.conf"
    conf.write_text(f"models-dir = {tmp_path / 'none'}\nllama-cache = no\n"
                    f"llama-server = /bin/true\nollama-models = {store}\n")
    env = {**os.environ, "HOME": str(tmp_path)}
    run = [sys.executable, "-m", "llamad"]
    listed = subprocess.run([*run, "models", "--json", "--config", str(conf)], env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    assert [(m["id"], m["source"]) for m in json.loads(listed.stdout)] == [("tiny", "ollama")]
    assert "library/lora/latest adds a LoRA adapter" in listed.stderr
    checked = subprocess.run([*run, "check-config", "--config", str(conf)], env=env,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and f"; ollama-models {store}; " in checked.stdout
    # Here, under /tmp, as in a home directory: a store the model units cannot see.
    assert f"ollama-models: {store} is under /tmp, which model units see as an empty" in \
        checked.stderr, checked.stderr


def test_a_manifest_nested_too_deep_is_one_problem(tmp_path: Path) -> None:
    # json.loads raises RecursionError, not ValueError, for deep nesting: one such file
    # stopped the whole scan (every other model went unlisted).
    store = tmp_path / "models"
    model = blob(store)
    manifest(store, "registry.ollama.ai/library/deep/latest", "[" * 200_000)
    manifest(store, "registry.ollama.ai/library/fine/latest", [(MODEL, model)])
    problems: list[str] = []
    assert [name for name, _, _ in discover(store, problems)] == ["fine"]
    assert len(problems) == 1 and "deep/latest is not a JSON manifest" in problems[0]
