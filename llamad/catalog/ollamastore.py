"""Models an Ollama installation pulled, served from its store as they lie, under Ollama's names.

Ollama keeps `<store>/manifests/<host>/<namespace>/<model>/<tag>` (JSON) and the files they
name by digest in `<store>/blobs/sha256-<hex>`. A manifest's layers say what each blob is:
the GGUF model, a projector, and what llama-server does not read (Ollama's Go template,
its parameters, the licence), which are left out: llama-server takes the chat template
from the GGUF header, as it does for every other model. Names, as `ollama list` shows them:
`registry.ollama.ai/library/llama3.2/latest` is `llama3.2` (and `llama3.2:latest` to Ollama's
clients), another tag `llama3.2:1b`, another namespace `user/model:tag`, another host
`hf.co/user/repo:Q4_K_M`. Ollama writes a blob under another name and renames it once it
is whole, and a manifest after its blobs, so a model listed here is never half there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from llamad.catalog import files

MANIFEST_BYTES = 1 << 20  # Ollama's are ~1 KB
MODEL = "application/vnd.ollama.image.model"
PROJECTOR = "application/vnd.ollama.image.projector"
ADAPTER = "application/vnd.ollama.image.adapter"
HOST, NAMESPACE, LATEST = "registry.ollama.ai", "library", "latest"
_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:_-]{0,253}")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

StoredModel = tuple[str, tuple[Path, ...], Path | None]  # id, shards, projector


def model_name(host: str, namespace: str, model: str, tag: str) -> str:
    """The name `ollama list` shows, without Ollama's default tag (llamad's clients of
    Ollama's API add it back, and answer to both)."""
    parts = [model] if (host, namespace) == (HOST, NAMESPACE) else \
        [namespace, model] if host == HOST else [host, namespace, model]
    return "/".join(parts) + ("" if tag == LATEST else f":{tag}")


def _dirs(path: Path, pattern: re.Pattern[str]) -> list[Path]:
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return []
    return [path / n for n in names if pattern.fullmatch(n) and (path / n).is_dir()]


def manifests(store: Path) -> list[tuple[Path, str]]:
    """(manifest file, model name) for every manifest in the store, in name order."""
    out = []
    for host in _dirs(store / "manifests", _HOST):
        for namespace in _dirs(host, _PART):
            for model in _dirs(namespace, _PART):
                try:
                    tags = sorted(os.listdir(model))
                except OSError:
                    continue
                out += [(model / tag, model_name(host.name, namespace.name, model.name, tag))
                        for tag in tags if _PART.fullmatch(tag)]
    return out


def _layers(manifest: Path, within: tuple[Path, ...]) -> list[dict[str, object]]:
    """The manifest's layers; raises files.Refused with why it cannot be used."""
    files.confine(manifest, within)
    try:
        data = json.loads(files.read_small(manifest, MANIFEST_BYTES + 1))
    except (ValueError, RecursionError):  # RecursionError: nested too deep for json
        raise files.Refused("is not a JSON manifest of at most 1 MiB") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise files.Refused("has no list of layers")
    return layers


def _blob(store: Path, within: tuple[Path, ...], layers: list[dict[str, object]],
          kind: str) -> Path | None:
    """The blob of the one layer of this media type; None without one."""
    digests = [x.get("digest") for x in layers if x.get("mediaType") == kind]
    if not digests:
        return None
    m = _DIGEST.fullmatch(str(digests[0])) if len(digests) == 1 else None
    if m is None:
        raise files.Refused(f"names {len(digests)} {kind} layers or a digest that is not "
                            "sha256")
    blob = store / "blobs" / f"sha256-{m.group(1)}"
    files.confine(blob, within)
    files.regular_stat(blob)
    return blob


def discover(store: Path, problems: list[str]) -> list[StoredModel]:
    """Every model the store holds whole; a manifest llamad cannot serve is one problem line."""
    within = files.roots([store])
    out: list[StoredModel] = []
    for manifest, name in manifests(store):
        try:
            layers = _layers(manifest, within)
            if any(x.get("mediaType") == ADAPTER for x in layers):
                raise files.Refused("adds a LoRA adapter to its model, which llamad does not "
                                    "apply")
            model = _blob(store, within, layers, MODEL)
            if model is None:
                continue  # not a model (Ollama stores other images too)
            out.append((name, (model,), _blob(store, within, layers, PROJECTOR)))
        except files.Refused as e:
            problems.append(f"Ollama's {manifest} {e}; skipped.")
    return out
