"""What llama-server loads of a model beyond its file's header and tensors: header values
--override-kv replaces (llama-model-loader applies them to every key it reads), and LoRA
adapters (--lora, --lora-scaled) whose tensors it reads into buffers of their own.

Gemma 3 270M with `--override-kv gemma3.context_length=int:131072` and no -c runs at 131072
tokens: 738 MiB peak RSS, where its header's 32768 gave an estimate of 496. A 58 MiB
adapter added 60 MiB to the peak, which no estimate counted."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from llamad.memory.layers import ModelInfo
from llamad.memory.serverargs import ServerArgs, parse_args, stoi

# Header keys (after `ARCH.`) the estimate reads that an override may change without
# changing any tensor's shape, and the ModelInfo field each is.
FIELDS = {"context_length": "context_length", "attention.sliding_window": "sliding_window",
          "expert_used_count": "expert_used_count"}


def header(info: ModelInfo, s: ServerArgs) -> ModelInfo:
    """`info` as llama-server reads it with these overrides: the first of each key counts
    (llama-model-loader keeps the first), and only as an int, the keys' type (another is
    ignored with a warning). A value below 1 is left out: no estimate for it."""
    arch = info.architecture
    if not s.kv_overrides or not arch or not dataclasses.is_dataclass(info):
        return info
    changes: dict[str, int] = {}
    for key, typed in s.kv_overrides:
        field = FIELDS.get(key[len(arch) + 1:]) if key.startswith(f"{arch}.") else None
        kind, _, value = typed.partition(":")
        if field is None or field in changes or kind != "int" or not hasattr(info, field):
            continue
        changes[field] = stoi(value, 0)  # std::atol, as llama.cpp reads it
    changes = {k: v for k, v in changes.items() if v > 0}
    replaced: Any = dataclasses.replace(info, **changes) if changes else info
    return replaced


def adapter_bytes(args: tuple[str, ...]) -> int:
    """Bytes of the LoRA adapters these arguments load: their files' sizes (the tensors,
    and a header of a few KiB). A file llamad cannot see counts nothing: llama-server's
    start fails on it, or it is confined where llamad's catalog does not reach."""
    total = 0
    for path in parse_args(args).adapters:
        try:
            total += os.stat(path).st_size
        except OSError:
            continue
    return total
