"""Generated llama models with quantised weights (Q4_0, Q4_K, Q8_0 ...): the types whose
matrices llama.cpp's CPU backend may repack into a buffer of its own. Zero blocks, so the
answers are nonsense; the buffers llama-server allocates for them are real."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from helpers.ggufgen import attention_header

Q = GGMLQuantizationType


def write_quantized(path: Path, qtype: Q, *, embd: int, ff: int, heads: int, heads_kv: int,
                    head_dim: int, blocks: int, vocab: int = 1024, context: int = 4096,
                    embd_type: Q | None = None, output_type: Q | None = None,
                    tied: bool = False) -> Path:
    """A llama model whose matrices are all `qtype` but the token embedding (`embd_type`)
    and the head (`output_type`), both `qtype` by default; `tied`: no head of its own (the
    token embedding serves as one)."""
    w = attention_header(path, "llama", embd=embd, ff=ff, heads=heads, heads_kv=heads_kv,
                         head_dim=head_dim, blocks=blocks, vocab=vocab, context=context,
                         eps=1e-5, file_type=gguf.LlamaFileType.MOSTLY_Q4_0)
    _matrix(w, "token_embd.weight", vocab, embd, embd_type or qtype)
    w.add_tensor("output_norm.weight", np.ones(embd, dtype=np.float32))
    if not tied:
        _matrix(w, "output.weight", vocab, embd, output_type or qtype)
    for i in range(blocks):
        for name, rows, cols in (("attn_q", heads * head_dim, embd),
                                 ("attn_k", heads_kv * head_dim, embd),
                                 ("attn_v", heads_kv * head_dim, embd),
                                 ("attn_output", embd, heads * head_dim),
                                 ("ffn_gate", ff, embd), ("ffn_up", ff, embd),
                                 ("ffn_down", embd, ff)):
            _matrix(w, f"blk.{i}.{name}.weight", rows, cols, qtype)
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(embd, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _matrix(w: gguf.GGUFWriter, name: str, rows: int, cols: int, qtype: Q) -> None:
    """`rows` rows of `cols` elements (GGUF's ne = [cols, rows]) of zero blocks."""
    block, size = GGML_QUANT_SIZES[qtype]
    assert cols % block == 0, (name, cols, qtype)
    w.add_tensor(name, np.zeros((rows, cols // block * size), dtype=np.uint8), raw_dtype=qtype)
