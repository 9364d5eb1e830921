"""Models an Ollama installation already pulled, served by llamad from Ollama's own store
(`ollama-models`), in the shipped sandbox, to Ollama's Python client and OpenAI clients."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import ollama
import rig
from helpers.daemon import Factory

DIGEST = "a" * 64  # Ollama names blobs by their sha256; llamad does not re-hash them
MODEL = "application/vnd.ollama.image.model"
TEMPLATE = "application/vnd.ollama.image.template"


def ollama_store(assets: rig.Assets) -> Path:
    """Ollama's layout with the Gemma file as the blob of two tags, and a Go template
    llama-server has no use for."""
    store = assets.dir.parent / "ollama-store"
    (store / "blobs").mkdir(parents=True, mode=0o755, exist_ok=True)
    blob = store / "blobs" / f"sha256-{DIGEST}"
    if not blob.exists():
        os.link(assets.model, blob)
    (store / "blobs" / f"sha256-{'b' * 64}").write_text("{{ .Prompt }}")
    layers = [{"mediaType": MODEL, "digest": f"sha256:{DIGEST}", "size": blob.stat().st_size},
              {"mediaType": TEMPLATE, "digest": f"sha256:{'b' * 64}", "size": 12}]
    for tag in ("latest", "270m"):
        path = store / "manifests/registry.ollama.ai/library/gemma3" / tag
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    for d in [store, *store.rglob("*")]:
        d.chmod(0o755 if d.is_dir() else 0o644)
    return store


def test_ollamas_pulled_models_are_served(llamad_factory: Factory, assets: rig.Assets) -> None:
    store = ollama_store(assets)
    d = llamad_factory([], sandbox=True, **{"ollama-models": str(store)})
    client = ollama.Client(host=d.url)
    try:
        listed = {m.model: m for m in client.list().models}
        assert set(listed) == {"gemma3:latest", "gemma3:270m"}
        details = listed["gemma3:270m"].details
        assert details is not None and details.family == "gemma3"

        answer = client.chat(model="gemma3:270m", options={"num_predict": 8, "temperature": 0},
                             messages=[{"role": "user", "content": "Say hello."}])
        said = answer.message.content or ""
        assert said.strip() and "<|im_start|>" not in said, said
        assert answer.model == "gemma3:270m"
    finally:
        client.close()  # type: ignore[no-untyped-call]  # ollama's close() has no hints
    units = d.model_units()
    assert list(units.values()) == ["active"], units
    argv = d.show(next(iter(units)), "ExecStart")
    assert f"--model {store}/blobs/sha256-{DIGEST}" in argv, argv

    # The same models to OpenAI's clients, under the names `ollama list` shows.
    with urllib.request.urlopen(d.url + "/v1/models", timeout=30) as r:
        listing = {m["id"]: m for m in json.load(r)["data"]}
    assert set(listing) == {"gemma3", "gemma3:270m"}
    assert {m["source"] for m in listing.values()} == {"ollama"}
    assert listing["gemma3:270m"]["status"]["value"] == "loaded"
