"""Generated llama models with quantised weights (Q4_0, Q4_K, Q8_0 ...): the types whose
matrices llama.cpp's CPU backend may repack into a buffer of its own. Zero blocks, so the
answers are nonsense; the buffers llama-server allocates for them are real."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType


def write_quantized(path: Path, qtype: Q, *, embd: int, ff: int, heads: int, heads_kv: int,
                    head_dim: int, blocks: int, vocab: int = 1024, context: int = 4096,
                    embd_type: Q | None = None, output_type: Q | None = None,
                    tied: bool = False) -> Path:
    """A llama model whose matrices are all `qtype` but the token embedding (`embd_type`)
    and the head (`output_type`), both `qtype` by default; `tied`: no head of its own (the
    token embedding serves as one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(context)
    w.add_block_count(blocks)
    w.add_embedding_length(embd)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_0))
    _vocabulary(w, vocab)
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


def _vocabulary(w: gguf.GGUFWriter, vocab: int) -> None:
    """A SentencePiece-style vocabulary of `vocab` made-up tokens, <unk> <s> </s> first."""
    w.add_tokenizer_model("llama")
    w.add_token_list([b"<unk>", b"<s>", b"</s>"] + [bytes([97 + i % 26]) * (1 + i // 26)
                                                     for i in range(vocab - 3)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
