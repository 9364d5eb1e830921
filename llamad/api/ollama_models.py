"""What Ollama's clients see of llamad's models: their names, /api/tags, /api/show, /api/ps,
and what fits a model's context (an /api/embed input, an /api/chat history).

Names: Ollama's `model:tag`, where no tag means `latest`. llamad's `gemma` is listed as
`gemma:latest` and answers to both; a Hugging Face name as Ollama spells it
(`hf.co/user/repo:Q4_K_M`) means llama.cpp's cache model `user/repo:Q4_K_M`, and without
a tag the one of that repository's cached quantizations that llama.cpp would pick (Q4_K_M,
then Q8_0), else the first by name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from llamad.api import listing
from llamad.catalog import argv, hub
from llamad.catalog.catalog import Model
from llamad.catalog.gguf_info import TEMPLATE_KEY, Scalar, metadata
from llamad.catalog.presets import CHAT_TEMPLATE, canonical_name
from llamad.memory import estimate as memory
from llamad.supervisor.events import State
from llamad.supervisor.scheduler import ttl_left
from llamad.supervisor.slot import SlotView
from llamad.supervisor.supervisor import Supervisor

LATEST = "latest"
HF_HOSTS = ("hf.co/", "huggingface.co/")
# What Ollama shows for a model kept loaded for good (keep_alive -1): its largest duration.
FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)
# /api/ps lists what serves, or is about to: not a model on its way out.
RUNNING = (State.STARTING, State.LOADING, State.READY, State.SLEEPING)
EMBEDDINGS = argv.canonical("--embeddings")
TEMPLATE_FILE = argv.canonical("--chat-template-file")
MAX_TEMPLATE = 1 << 20  # bytes of a chat template file read for /api/show


def _tag(name: str) -> str:
    """The tag of `name` ('' without one): after a ':' in its last path part."""
    last = name.rsplit("/", 1)[-1]
    return last.rpartition(":")[2] if ":" in last else ""


def display_name(model_id: str) -> str:
    """llamad's model id as Ollama lists names: always with a tag."""
    return model_id if _tag(model_id) else f"{model_id}:{LATEST}"


def candidates(name: str, known: Collection[str]) -> list[str]:
    """llamad names an Ollama name may mean, the most exact first."""
    out = [name]
    base = name[:-len(LATEST) - 1] if _tag(name).lower() == LATEST else name
    for host in HF_HOSTS:
        if base.lower().startswith(host):
            base = base[len(host):]
    if base != name:
        out.append(base)
    if base.count("/") == 1:  # user/repo[:QUANT], as llama.cpp's cache names them
        if _tag(base):
            out.append(canonical_name(base))
        else:
            repo = base.lower() + ":"
            out += sorted((k for k in known if k.lower().startswith(repo)), key=_preference)
    return _other_case(list(dict.fromkeys(out)), known)


def _other_case(out: list[str], known: Collection[str]) -> list[str]:
    """Ollama finds a model whatever the case of its name (`ollama run Qwen3`: its store's
    paths are lower case). llamad's ids are file names, which case tells apart: after the
    exact spellings, a known id that differs only in case, where it is the only one (all
    ids are looked at only when no exact spelling is one)."""
    if any(name in known for name in out):
        return out
    for name in list(out):
        same = [k for k in known if k.lower() == name.lower()]
        if len(same) == 1 and same[0] not in out:
            out.append(same[0])
    return out


def _preference(model_id: str) -> tuple[int, str]:
    """llama.cpp's default quantizations first, as a pull without one fetches, then by name."""
    tag = _tag(model_id).upper()
    return (hub.DEFAULT_TAGS.index(tag) if tag in hub.DEFAULT_TAGS else len(hub.DEFAULT_TAGS),
            model_id)


def parameter_size(n: int | None) -> str:
    """Ollama's spelling of a parameter count: 268.10M, 8B, 7.6B."""
    if not n:
        return ""
    for scale, unit, digits in ((1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 0)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{digits}f}{unit}"
    return str(n)


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def digest(model: Model) -> str:
    """Stands for Ollama's manifest digest: it changes when the file does (llamad does not
    hash whole model files)."""
    size = model.info.size if model.info else 0
    return hashlib.sha256(f"{model.id}\0{model.path}\0{size}\0{model.created}".encode()
                          ).hexdigest()


def details(model: Model) -> dict[str, Any]:
    info = model.info
    family = (info.architecture if info else None) or ""
    return {"parent_model": "", "format": "gguf", "family": family,
            "families": [family] if family else [],
            "parameter_size": parameter_size(info.parameters if info else None),
            "quantization_level": (info.quantization if info else None) or ""}


def tag_entry(model: Model) -> dict[str, Any]:
    """One model of GET /api/tags."""
    name = display_name(model.id)
    return {"name": name, "model": name, "modified_at": iso(model.created),
            "size": model.info.size if model.info else 0, "digest": digest(model),
            "details": details(model)}


def ps_entry(sup: Supervisor, slot: SlotView) -> dict[str, Any]:
    """One model of GET /api/ps: memory as llamad measured it (its plan until the first
    sample), and when its idle TTL will stop it."""
    running = slot.sampled_pid == slot.main_pid != 0
    mem = slot.used if running and slot.used.ram else sup.measure.need(slot.model)
    now = time.monotonic()
    ttl = sup.ttl(slot)
    left = ttl_left(sup.view(slot), now, ttl)
    if ttl is None or slot.pinned:
        expires = datetime.now(UTC) + FOREVER
    else:  # busy or loading: the TTL starts once it is idle
        expires = datetime.now(UTC) + timedelta(seconds=ttl if left is None else left)
    name = display_name(slot.model.id)
    return {"name": name, "model": name, "size": mem.ram + mem.vram, "digest": digest(slot.model),
            "details": details(slot.model),
            "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "size_vram": mem.vram,
            "context_length": listing.n_ctx(slot.model) or 0}


def ps(sup: Supervisor, slots: Iterable[SlotView]) -> dict[str, Any]:
    models = [ps_entry(sup, s) for s in slots if s.state in RUNNING]
    models.sort(key=lambda m: m["expires_at"], reverse=True)  # as Ollama: longest left first
    return {"models": models}


@functools.lru_cache(maxsize=64)
def _header(path: Path, stamp: tuple[int, int]) -> dict[str, Scalar | None]:
    return metadata(path)


def header(path: Path) -> dict[str, Scalar | None]:
    """The model file's header keys (cached while the file is unchanged); slow the first
    time: call it on a worker thread."""
    st = path.stat()
    return _header(path, (st.st_mtime_ns, st.st_size))


def embeds(model: Model) -> bool:
    """llama-server makes embeddings only when started with --embeddings."""
    return argv.has(model.settings.args, EMBEDDINGS)


def embed_limit(model: Model) -> int:
    """Tokens llama-server embeds in one input: one physical batch (it cannot split an
    input among batches unless it pools by the last token), and no more than the context
    one request may use."""
    s = memory.parse_args(model.settings.args)
    batch = min(s.batch, s.ubatch)
    return min(batch, listing.n_ctx(model) or batch)


@dataclass(frozen=True)
class Fit:
    """Ollama's `truncate`: an input longer than `limit` tokens is cut to fit, or refused."""

    limit: int
    truncate: bool


IMAGE_TOKENS = 768  # an image in a history being shortened: Ollama's guess (chatPrompt)


def prompt_budget(chat: dict[str, Any], refusal: bytes) -> int | None:
    """The tokens a chat's prompt may have, if llama-server refused it as longer than its
    context (else None): the context, less room for the answer (llama-server does not make
    room by shifting the context, as Ollama's runner does): num_predict, at most a quarter."""
    try:
        err = json.loads(refusal).get("error")
    except (ValueError, AttributeError):
        return None
    if not isinstance(err, dict) or err.get("type") != "exceed_context_size_error" or \
            not isinstance(n_ctx := err.get("n_ctx"), int):
        return None
    n_predict = chat.get("n_predict", -1)
    return n_ctx - (min(n_predict, n_ctx // 4) if n_predict > 0 else n_ctx // 4)


def kept_messages(messages: list[dict[str, Any]], start: int) -> list[dict[str, Any]]:
    """The messages from `start` on, after the system messages before it (Ollama's)."""
    return [m for m in messages[:start] if m.get("role") == "system"] + messages[start:]


def image_parts(messages: list[dict[str, Any]]) -> int:
    return sum(isinstance(m.get("content"), list) and sum(
        isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"])
        for m in messages)


def capabilities(model: Model, template: str) -> list[str]:
    """What Ollama's clients ask a model for, as far as its header and arguments tell."""
    caps = ["completion"]
    if embeds(model):
        caps.append("embedding")
    if model.info and "image" in model.info.modalities:
        caps.append("vision")
    if "tools" in template:
        caps.append("tools")
    if thinks(template):
        caps.append("thinking")
    return caps


# What marks a chat template as a reasoning model's (Qwen3's switch, DeepSeek's tags,
# gpt-oss's effort, Mistral's [THINK], the reasoning_content that llama-server hands back).
THINKING_MARKS = ("enable_thinking", "<think>", "</think>", "reasoning_content",
                  "reasoning_effort", "[THINK]")


def thinks(template: str) -> bool:
    return any(mark in template for mark in THINKING_MARKS)


def show(model: Model, keys: dict[str, Scalar | None], n_ctx: int | None,
         own: str | None = None) -> dict[str, Any]:
    """POST /api/show, from the GGUF header (`keys`: header(model.path)) and the chat
    template given by flag (`own`: own_template(model.settings.args)), which llama-server
    applies in place of the header's, so its capabilities are the ones to tell. `parameters`
    in the Modelfile's words: `num_ctx`, the tokens one request may use (`n_ctx`), is what
    clients such as Continue size their prompts by (they assume 8,192 without it)."""
    info = model.info
    template = keys.pop(TEMPLATE_KEY, None)
    template = own if own is not None else template if isinstance(template, str) else ""
    extra = {"context_length": info.context_length, "embedding_length": info.embedding_length} \
        if info else {}
    if info and info.parameters:  # Ollama's model_info counts them (the header rarely does)
        keys.setdefault("general.parameter_count", info.parameters)
    return {
        "license": keys.get("general.license") or "",
        "modelfile": f"# Modelfile generated by llamad\nFROM {model.path}\n",
        "parameters": f"{'num_ctx':<30} {n_ctx}" if n_ctx else "",
        "template": template,
        "details": {**details(model), **{k: v for k, v in extra.items() if v}},
        "model_info": keys,
        "capabilities": capabilities(model, template),
        "modified_at": iso(model.created),
    }


def own_template(args: tuple[str, ...]) -> str | None:
    """The chat template a preset (or llamad, presets.run_settings) gives by flag: a file's
    text (read here: call it on a worker thread), else --chat-template's (a template, or
    the name of one of llama.cpp's); None without either, or if the file cannot be read
    (its model cannot start either)."""
    file = argv.last(args, TEMPLATE_FILE)
    if file is not None and file.value:
        try:
            with open(file.value, "rb") as f:
                return f.read(MAX_TEMPLATE).decode(errors="replace")
        except OSError:
            return None
    option = argv.last(args, CHAT_TEMPLATE.canonical)
    return option.value if option is not None and option.value else None
