"""Bytes of the GPU's layers that tensor overrides keep on the host (llama-server's
tensor_buft_overrides): the expert weights of the first --n-cpu-moe layers, the dense
feed-forward weights of the first --n-cpu-ffn layers, and tensors an -ot pattern sends to
a CPU buffer. Pure."""

from __future__ import annotations

import functools
import re

from llamad.catalog.gguf_info import EXPERTS, TensorBytes
from llamad.memory import layers
from llamad.memory.layers import ModelInfo
from llamad.memory.serverargs import ServerArgs

# common.h's LLM_FFN_DENSE_REGEX, which --n-cpu-ffn matches after `blk\.N`.
DENSE_FFN = re.compile(r"^ffn_(up|down|gate)\.")


@functools.lru_cache(maxsize=256)
def _pattern(text: str) -> re.Pattern[str] | None:
    try:
        return re.compile(text)
    except re.error:
        return None  # llama-server itself refuses it at start; the unit's log says so


def moved(info: ModelInfo, s: ServerArgs, first: int, n_layer: int) -> int:
    """Of the repeating layers `first`.. on the GPU, the bytes overrides keep on the host
    (an -ot pattern matched against `blk.N.<name>`, with that tensor's average size per
    layer)."""
    table: TensorBytes | None = getattr(info, "tensors", None)
    if table is None or not (s.n_cpu_moe or s.n_cpu_ffn or s.overrides):
        return 0
    cpu = [p for text, buft in s.overrides if buft.upper().startswith("CPU")
           and (p := _pattern(text)) is not None]
    total = 0
    for il in range(first, n_layer - layers.nextn_layers(info, s.mtp)):
        has_experts = il < len(table.experts) and table.experts[il] > 0
        experts_out = il < s.n_cpu_moe and has_experts
        total += table.experts[il] if experts_out else 0
        for kind, size, count in table.kinds:
            if EXPERTS.search(kind) and (experts_out or not has_experts):
                continue
            if (il < s.n_cpu_ffn and DENSE_FFN.search(kind)) or any(
                    p.search(f"blk.{il}.{kind}") for p in cpu):
                total += size // max(1, count)
    return total
