"""Write small, real GGUF files with the gguf package, for tests and benchmarks."""

from __future__ import annotations

import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np


def write_model(path: Path, *, arch: str = "llama", context: int = 4096, blocks: int = 2,
                heads: int = 4, heads_kv: int = 2, embd: int = 64, rows: int = 8,
                file_type: int | None = int(gguf.LlamaFileType.ALL_F32),
                extra: dict[str, int | str | bool] | None = None,
                split: tuple[int, int] | None = None) -> Path:
    """A tiny model: `blocks` F32 weight matrices of rows x embd plus a vocabulary.

    split=(n, count) writes shard n (1-based) of a count-file split set.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    if split is None or split[0] == 1:
        w.add_context_length(context)
        w.add_block_count(blocks)
        w.add_head_count(heads)
        w.add_head_count_kv(heads_kv)
        w.add_embedding_length(embd)
        if file_type is not None:
            w.add_file_type(file_type)
        w.add_token_list([f"tok{i}" for i in range(32)])
    if split is not None:
        w.add_uint16("split.no", split[0] - 1)
        w.add_uint16("split.count", split[1])
        w.add_int32("split.tensors.count", blocks * split[1])
    for key, value in (extra or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    shard = 0 if split is None else split[0] - 1
    for i in range(blocks):
        data = np.full((rows, embd), float(i), dtype=np.float32)
        w.add_tensor(f"blk.{shard * blocks + i}.attn_q.weight", data)
    return _written(w, path)


def write_split(directory: Path, stem: str, count: int, **kw: object) -> list[Path]:
    """A split set named like llama.cpp's gguf-split output: stem-0000N-of-0000M.gguf."""
    return [write_model(directory / f"{stem}-{n:05d}-of-{count:05d}.gguf", split=(n, count),
                        **kw)  # type: ignore[arg-type]
            for n in range(1, count + 1)]


def write_mmproj(path: Path, *, vision: bool = True, audio: bool = False) -> Path:
    return write_model(path, arch="clip", file_type=None,
                       extra={"clip.has_vision_encoder": vision, "clip.has_audio_encoder": audio})


def write_gemma3_mmproj(path: Path, *, text_embd: int, embd: int, ff: int, heads: int,
                        blocks: int = 1, image_size: int = 896, patch_size: int = 14) -> Path:
    """A Gemma 3 vision projector (SigLIP encoder) llama-server loads beside a Gemma 3 model
    whose embedding is `text_embd`: every tensor its loader asks for, zeros. Its compute
    buffer, reserved at load for one image of `image_size`, is real."""
    w = _clip_writer(path, "gemma3", "gelu", embedding_length=embd, feed_forward_length=ff,
                     block_count=blocks, projection_dim=text_embd, image_size=image_size,
                     patch_size=patch_size, **{"attention.head_count": heads})
    w.add_tensor("v.patch_embd.weight", _f16(embd, 3, patch_size, patch_size))
    w.add_tensor("v.position_embd.weight",
                 np.zeros(((image_size // patch_size) ** 2, embd), dtype=np.float32))
    vectors = {"v.patch_embd.bias": embd, "v.post_ln.weight": embd, "v.post_ln.bias": embd,
               "mm.soft_emb_norm.weight": embd}
    for i in range(blocks):
        _clip_block(w, vectors, i, embd, ff, gated=False)
    _vectors(w, vectors)
    w.add_tensor("mm.input_projection.weight", _f16(embd, text_embd))
    return _written(w, path)


def write_qwen25vl_mmproj(path: Path, *, text_embd: int, embd: int, ff: int, heads: int,
                          blocks: int = 8, window_pattern: int = 8) -> Path:
    """A Qwen2.5-VL vision projector llama-server loads beside a model whose embedding is
    `text_embd`: 14 px patches merged 2 x 2, a gated feed-forward, window attention with
    full attention every `window_pattern` blocks. Zeros; its compute buffer is real."""
    w = _clip_writer(path, "qwen2.5vl_merger", "silu", embedding_length=embd,
                     feed_forward_length=ff, block_count=blocks, projection_dim=text_embd,
                     image_size=560, patch_size=14, n_wa_pattern=window_pattern,
                     **{"attention.head_count": heads})
    w.add_tensor("v.patch_embd.weight", _f16(embd, 3, 14, 14))
    w.add_tensor("v.patch_embd.weight.1", _f16(embd, 3, 14, 14))
    vectors = {"v.post_ln.weight": embd, "mm.0.bias": 4 * embd, "mm.2.bias": text_embd}
    for i in range(blocks):
        _clip_block(w, vectors, i, embd, ff, gated=True)
    _vectors(w, vectors)
    w.add_tensor("mm.0.weight", _f16(4 * embd, 4 * embd))
    w.add_tensor("mm.2.weight", _f16(text_embd, 4 * embd))
    return _written(w, path)


def _clip_writer(path: Path, projector: str, activation: str, **vision: int) -> gguf.GGUFWriter:
    """A projector file's header: its type, activation and `clip.vision.*` numbers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_string("clip.projector_type", projector)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool(f"clip.use_{activation}", True)
    for key, value in vision.items():
        w.add_uint32(f"clip.vision.{key}", value)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    return w


def _clip_block(w: gguf.GGUFWriter, vectors: dict[str, int], i: int, embd: int, ff: int,
                gated: bool) -> None:
    """Encoder block i's matrices; its biases and norms go into `vectors`, written later."""
    shapes = [("attn_q", (embd, embd)), ("attn_k", (embd, embd)), ("attn_v", (embd, embd)),
              ("attn_out", (embd, embd)), ("ffn_up", (ff, embd)), ("ffn_down", (embd, ff))]
    for name, shape in shapes + ([("ffn_gate", (ff, embd))] if gated else []):
        w.add_tensor(f"v.blk.{i}.{name}.weight", _f16(*shape))
        vectors[f"v.blk.{i}.{name}.bias"] = shape[0]
    norms = ("ln1.weight", "ln2.weight") + (() if gated else ("ln1.bias", "ln2.bias"))
    vectors.update({f"v.blk.{i}.{norm}": embd for norm in norms})


def _vectors(w: gguf.GGUFWriter, vectors: dict[str, int]) -> None:
    for name, size in vectors.items():
        w.add_tensor(name, np.zeros(size, dtype=np.float32))


def truncate(path: Path, keep: int) -> Path:
    """Cut a file down to its first `keep` bytes (a download that stopped)."""
    with open(path, "r+b") as f:
        f.truncate(keep)
    return path


def copy_slowly(src: Path, dst: Path, chunks: int, pause: float) -> None:
    """Copy in `chunks` writes with pauses between them, like a slow network copy."""
    import time

    data = src.read_bytes()
    step = max(1, len(data) // chunks)
    with open(dst, "wb") as f:
        for start in range(0, len(data), step):
            f.write(data[start:start + step])
            f.flush()
            time.sleep(pause)


def copy_file(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def write_llama(path: Path, *, embd: int, ff: int, heads: int, heads_kv: int, head_dim: int,
                blocks: int = 1, vocab: int = 1024, context: int = 32768, arch: str = "llama",
                sliding_window: int = 0) -> Path:
    """A llama-architecture model llama-server loads and runs: every tensor of a llama block,
    F16 zeros, and a byte-level vocabulary. Its answers are nonsense; its buffers are real.
    `arch="olmo2"` (heads x head_dim = embd) has OLMo 2's norms instead, and with
    `sliding_window` its sliding-window layers."""
    w = _attention_model(path, arch, embd=embd, ff=ff, heads=heads, heads_kv=heads_kv,
                         head_dim=head_dim, blocks=blocks, vocab=vocab, context=context,
                         eps=1e-5)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    for i in range(blocks):
        for name, shape in (("ffn_gate", (ff, embd)), ("ffn_up", (ff, embd)),
                            ("ffn_down", (embd, ff))):
            w.add_tensor(f"blk.{i}.{name}.weight", _f16(*shape))
        norms = {"attn_norm": embd, "ffn_norm": embd} if arch == "llama" else {
            "post_attention_norm": embd, "post_ffw_norm": embd, "attn_q_norm": embd,
            "attn_k_norm": heads_kv * head_dim}
        _norms(w, i, norms)
    return _written(w, path)


def write_moe(path: Path, *, embd: int, heads: int, heads_kv: int, head_dim: int,
              experts: int, used: int, ff_exp: int, blocks: int = 2, vocab: int = 1024,
              arch: str = "qwen3moe", shared: int = 0) -> Path:
    """A mixture-of-experts model llama-server loads and runs: `experts` experts of width
    `ff_exp` on every layer, `used` of them per token. Qwen3-MoE's tensors; with
    arch="llama" Mixtral's (whose header gives the experts' width as feed_forward_length
    only, and no Q/K norms); with arch="qwen2moe" Qwen2-MoE's, a shared expert of width
    `shared` beside the chosen ones."""
    w = _attention_model(path, arch, embd=embd, ff=ff_exp, heads=heads, heads_kv=heads_kv,
                         head_dim=head_dim, blocks=blocks, vocab=vocab, context=32768,
                         eps=1e-6)
    w.add_expert_count(experts)
    w.add_expert_used_count(used)
    if arch != "llama":
        w.add_expert_feed_forward_length(ff_exp)
    if shared:
        w.add_uint32(f"{arch}.expert_shared_feed_forward_length", shared)
    for i in range(blocks):
        for name, shape in (("ffn_gate_exps", (experts, ff_exp, embd)),
                            ("ffn_up_exps", (experts, ff_exp, embd)),
                            ("ffn_down_exps", (experts, embd, ff_exp))):
            w.add_tensor(f"blk.{i}.{name}.weight", _f16(*shape))
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", np.zeros((experts, embd), np.float32))
        if shared:
            for part, dims in (("ffn_gate_shexp", (shared, embd)),
                               ("ffn_up_shexp", (shared, embd)),
                               ("ffn_down_shexp", (embd, shared))):
                w.add_tensor(f"blk.{i}.{part}.weight", _f16(*dims))
            w.add_tensor(f"blk.{i}.ffn_gate_inp_shexp.weight", np.zeros(embd, np.float32))
        norms = {"attn_norm": embd, "ffn_norm": embd}
        if arch == "qwen3moe":
            norms |= {"attn_q_norm": head_dim, "attn_k_norm": head_dim}
        _norms(w, i, norms)
    return _written(w, path)


def write_glm4moe(path: Path, *, embd: int, heads: int, heads_kv: int, head_dim: int,
                  experts: int, used: int, ff_exp: int, trunk: int = 2, nextn: int = 1,
                  vocab: int = 1024) -> Path:
    """A GLM-4.5-style mixture of experts llama-server loads and runs: `trunk` layers and
    after them `nextn` NextN (multi-token prediction) layers, each with a shared expert;
    the NextN layers also hold their projection and norms."""
    blocks = trunk + nextn
    w = _attention_model(path, "glm4moe", embd=embd, ff=ff_exp, heads=heads,
                         heads_kv=heads_kv, head_dim=head_dim, blocks=blocks, vocab=vocab,
                         context=32768, eps=1e-5)
    w.add_expert_count(experts)
    w.add_expert_used_count(used)
    w.add_expert_feed_forward_length(ff_exp)
    w.add_uint32("glm4moe.expert_shared_count", 1)
    w.add_uint32("glm4moe.leading_dense_block_count", 0)
    w.add_uint32("glm4moe.nextn_predict_layers", nextn)
    for i in range(blocks):
        for name, shape in (("ffn_gate_exps", (experts, ff_exp, embd)),
                            ("ffn_up_exps", (experts, ff_exp, embd)),
                            ("ffn_down_exps", (experts, embd, ff_exp)),
                            ("ffn_gate_shexp", (ff_exp, embd)), ("ffn_up_shexp", (ff_exp, embd)),
                            ("ffn_down_shexp", (embd, ff_exp))):
            w.add_tensor(f"blk.{i}.{name}.weight", _f16(*shape))
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", np.zeros((experts, embd), np.float32))
        w.add_tensor(f"blk.{i}.exp_probs_b.bias", np.zeros(experts, np.float32))
        norms = {"attn_norm": embd, "post_attention_norm": embd}
        if i >= trunk:
            w.add_tensor(f"blk.{i}.nextn.eh_proj.weight", _f16(embd, 2 * embd))
            norms |= {"nextn.enorm": embd, "nextn.hnorm": embd, "nextn.shared_head_norm": embd}
        _norms(w, i, norms)
    return _written(w, path)


def write_deci(path: Path, *, embd: int, heads: Sequence[int], kv_heads: Sequence[int],
               ff: Sequence[int], head_dim: int, vocab: int = 1024) -> Path:
    """A Nemotron-style `deci` model llama-server loads and runs, its header giving the
    heads, KV heads and feed-forward width of each layer as arrays: attention where a
    layer has KV heads, a linear stand-in where it has heads but none, nothing where it has
    neither; a feed-forward stage where its width is not 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "deci")
    w.add_context_length(32768)
    w.add_block_count(len(heads))
    w.add_embedding_length(embd)
    w.add_feed_forward_length(list(ff))
    w.add_head_count(list(heads))
    w.add_head_count_kv(list(kv_heads))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    _byte_vocabulary(w, vocab)
    w.add_tensor("token_embd.weight", _f16(vocab, embd))
    w.add_tensor("output_norm.weight", np.ones(embd, dtype=np.float32))
    w.add_tensor("output.weight", _f16(vocab, embd))
    for i, (n_head, kv, width) in enumerate(zip(heads, kv_heads, ff, strict=True)):
        tensors = {"attn_output": (embd, embd)} if n_head and not kv else {}
        if kv:
            tensors = {"attn_q": (n_head * head_dim, embd), "attn_k": (kv * head_dim, embd),
                       "attn_v": (kv * head_dim, embd),
                       "attn_output": (embd, n_head * head_dim)}
        if width:
            tensors |= {"ffn_gate": (width, embd), "ffn_up": (width, embd),
                        "ffn_down": (embd, width)}
        for name, shape in tensors.items():
            w.add_tensor(f"blk.{i}.{name}.weight", _f16(*shape))
        _norms(w, i, ({"attn_norm": embd} if n_head else {}) | (
            {"ffn_norm": embd} if width else {}))
    return _written(w, path)


def attention_header(path: Path, arch: str, *, embd: int, ff: int, heads: int, heads_kv: int,
                     head_dim: int, blocks: int, vocab: int, context: int, eps: float,
                     file_type: gguf.LlamaFileType) -> gguf.GGUFWriter:
    """A writer with an attention model's header keys and a made-up vocabulary, no tensors
    yet (quantgen.py's models share it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(context)
    w.add_block_count(blocks)
    w.add_embedding_length(embd)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(eps)
    w.add_file_type(int(file_type))
    _byte_vocabulary(w, vocab)
    return w


def _attention_model(path: Path, arch: str, *, embd: int, ff: int, heads: int, heads_kv: int,
                     head_dim: int, blocks: int, vocab: int, context: int,
                     eps: float) -> gguf.GGUFWriter:
    """What the generated attention models share: their header, a byte-level vocabulary,
    the input and output layers and each block's attention; the caller adds the rest."""
    w = attention_header(path, arch, embd=embd, ff=ff, heads=heads, heads_kv=heads_kv,
                         head_dim=head_dim, blocks=blocks, vocab=vocab, context=context,
                         eps=eps, file_type=gguf.LlamaFileType.MOSTLY_F16)
    w.add_tensor("token_embd.weight", _f16(vocab, embd))
    w.add_tensor("output_norm.weight", np.ones(embd, dtype=np.float32))
    w.add_tensor("output.weight", _f16(vocab, embd))
    for i in range(blocks):
        for name, shape in (("attn_q", (heads * head_dim, embd)),
                            ("attn_k", (heads_kv * head_dim, embd)),
                            ("attn_v", (heads_kv * head_dim, embd)),
                            ("attn_output", (embd, heads * head_dim))):
            w.add_tensor(f"blk.{i}.{name}.weight", _f16(*shape))
    return w


def _norms(w: gguf.GGUFWriter, i: int, norms: dict[str, int]) -> None:
    for norm, size in norms.items():
        w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(size, dtype=np.float32))


def write_deepseek2(path: Path, *, embd: int, heads: int, kv_lora: int, rope: int,
                    nope: int, v_head: int, ff: int, blocks: int = 2, mla: bool = True,
                    vocab: int = 1024) -> Path:
    """A DeepSeek-2 model (multi-head latent attention) llama-server loads and runs, dense
    layers only. With `mla` its header says so as llama.cpp's converter writes it today (one
    KV head of kv_lora + rope, the per-head sizes under key_length_mla/value_length_mla);
    without, as older files did (every head with its own K and V)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_context_length(32768)
    w.add_block_count(blocks)
    w.add_embedding_length(embd)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    if mla:
        w.add_head_count_kv(1)
        w.add_key_length(kv_lora + rope)
        w.add_value_length(kv_lora)
        w.add_uint32("deepseek2.attention.key_length_mla", nope + rope)
        w.add_uint32("deepseek2.attention.value_length_mla", v_head)
    else:
        w.add_head_count_kv(heads)
        w.add_key_length(nope + rope)
        w.add_value_length(v_head)
    w.add_rope_dimension_count(rope)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_uint32("deepseek2.leading_dense_block_count", blocks)
    w.add_uint32("deepseek2.attention.q_lora_rank", 64)
    w.add_uint32("deepseek2.attention.kv_lora_rank", kv_lora)
    w.add_uint32("deepseek2.expert_feed_forward_length", ff)
    w.add_uint32("deepseek2.expert_shared_count", 0)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    _byte_vocabulary(w, vocab)

    w.add_tensor("token_embd.weight", _f16(vocab, embd))
    w.add_tensor("output_norm.weight", np.ones(embd, dtype=np.float32))
    w.add_tensor("output.weight", _f16(vocab, embd))
    attention = {"attn_k_b": (heads, kv_lora, nope), "attn_v_b": (heads, v_head, kv_lora)} \
        if mla else {"attn_kv_b": (heads * (nope + v_head), kv_lora)}
    for i in range(blocks):
        for name, shape in {"attn_q_a": (64, embd), "attn_q_b": (heads * (nope + rope), 64),
                            "attn_kv_a_mqa": (kv_lora + rope, embd), **attention,
                            "attn_output": (embd, heads * v_head), "ffn_gate": (ff, embd),
                            "ffn_up": (ff, embd), "ffn_down": (embd, ff)}.items():
            w.add_tensor(f"blk.{i}.{name}.weight", _f16(*shape))
        for norm, size in (("attn_norm", embd), ("attn_q_a_norm", 64),
                           ("attn_kv_a_norm", kv_lora), ("ffn_norm", embd)):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(size, dtype=np.float32))
    return _written(w, path)


def write_gemma4(path: Path, *, embd: int, ff: int, heads: int, swa: Sequence[bool],
                 kv_heads: tuple[int, int], head_dims: tuple[int, int], window: int,
                 shared_kv: int = 0, vocab: int = 1024) -> Path:
    """A Gemma 4 model llama-server loads and runs: sliding-window layers where `swa` says,
    their KV heads and head size the first of `kv_heads` and `head_dims`, the full layers'
    the second; the last `shared_kv` layers reuse earlier layers' caches. Dense, no
    per-layer embeddings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "gemma4")
    w.add_context_length(131072)
    w.add_block_count(len(swa))
    w.add_embedding_length(embd)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv([kv_heads[0] if s else kv_heads[1] for s in swa])
    w.add_key_length(head_dims[1])
    w.add_value_length(head_dims[1])
    w.add_key_length_swa(head_dims[0])
    w.add_value_length_swa(head_dims[0])
    w.add_rope_dimension_count(head_dims[1])
    w.add_rope_dimension_count_swa(head_dims[0])
    w.add_sliding_window(window)
    w.add_sliding_window_pattern(list(swa))
    w.add_uint32("gemma4.attention.shared_kv_layers", shared_kv)
    w.add_uint32("gemma4.embedding_length_per_layer_input", 0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    _byte_vocabulary(w, vocab)

    def ones(size: int) -> np.ndarray:
        return np.ones(size, dtype=np.float32)

    w.add_tensor("token_embd.weight", _f16(vocab, embd))
    w.add_tensor("output_norm.weight", ones(embd))
    w.add_tensor("rope_freqs.weight", ones(head_dims[1] // 2))
    for i, sliding in enumerate(swa):
        dim, kv = (head_dims[0], kv_heads[0]) if sliding else (head_dims[1], kv_heads[1])
        tensors = {"attn_q": _f16(heads * dim, embd), "attn_output": _f16(embd, heads * dim),
                   "attn_norm": ones(embd), "attn_q_norm": ones(dim),
                   "post_attention_norm": ones(embd), "ffn_norm": ones(embd),
                   "ffn_gate": _f16(ff, embd), "ffn_up": _f16(ff, embd),
                   "ffn_down": _f16(embd, ff), "post_ffw_norm": ones(embd)}
        if i < len(swa) - shared_kv:
            tensors |= {"attn_k": _f16(kv * dim, embd), "attn_v": _f16(kv * dim, embd),
                        "attn_k_norm": ones(dim)}
        for name, data in tensors.items():
            w.add_tensor(f"blk.{i}.{name}.weight", data)
    return _written(w, path)


def write_lfm2(path: Path, *, embd: int, ff: int, heads: int, kv_heads: Sequence[int],
               head_dim: int, l_cache: int = 3, vocab: int = 1024, context: int = 32768) -> Path:
    """A hybrid LFM2 model llama-server loads and runs: a short-convolution (recurrent)
    layer wherever `kv_heads` has 0, an attention layer elsewhere, F16 zeros."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "lfm2")
    w.add_context_length(context)
    w.add_block_count(len(kv_heads))
    w.add_embedding_length(embd)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(list(kv_heads))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_uint32("lfm2.shortconv.l_cache", l_cache)
    _byte_vocabulary(w, vocab)

    w.add_tensor("token_embd.weight", _f16(vocab, embd))
    w.add_tensor("token_embd_norm.weight", np.ones(embd, dtype=np.float32))
    for i, kv in enumerate(kv_heads):
        tensors = {"ffn_gate": (ff, embd), "ffn_up": (ff, embd), "ffn_down": (embd, ff)}
        if kv:
            tensors |= {"attn_q": (heads * head_dim, embd), "attn_k": (kv * head_dim, embd),
                        "attn_v": (kv * head_dim, embd), "attn_output": (embd, heads * head_dim)}
        else:
            tensors |= {"shortconv.in_proj": (3 * embd, embd), "shortconv.out_proj": (embd, embd)}
            # ggml's convolution takes its kernel in F32 only.
            w.add_tensor(f"blk.{i}.shortconv.conv.weight", np.zeros((embd, l_cache), np.float32))
        for name, shape in tensors.items():
            w.add_tensor(f"blk.{i}.{name}.weight", _f16(*shape))
        norms = {"attn_norm": embd, "ffn_norm": embd}
        if kv:
            norms |= {"attn_q_norm": head_dim, "attn_k_norm": head_dim}
        for norm, size in norms.items():
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(size, dtype=np.float32))
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    return _written(w, path)


def write_rwkv6(path: Path, *, embd: int, ff: int, blocks: int, head_size: int = 64,
                vocab: int = 1024) -> Path:
    """An RWKV-6 model llama-server loads and runs (llama.cpp's rwkv6.cpp tensors): no
    attention, a recurrent state on every layer, F32 zeros (its element-wise ops want F32)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_context_length(1048576)
    w.add_block_count(blocks)
    w.add_embedding_length(embd)
    w.add_feed_forward_length(ff)
    w.add_head_count(0)
    w.add_layer_norm_eps(1e-5)
    w.add_uint32("rwkv6.wkv.head_size", head_size)
    w.add_uint32("rwkv6.time_mix_extra_dim", 8)
    w.add_uint32("rwkv6.time_decay_extra_dim", 16)
    _byte_vocabulary(w, vocab)
    # numpy shapes: ggml's dimensions reversed.
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (vocab, embd), "token_embd_norm.weight": (embd,),
        "token_embd_norm.bias": (embd,), "output_norm.weight": (embd,),
        "output_norm.bias": (embd,), "output.weight": (vocab, embd)}
    layer = {"attn_norm.weight": (embd,), "attn_norm.bias": (embd,),
             "attn_norm_2.weight": (embd,), "attn_norm_2.bias": (embd,),
             "time_mix_w1.weight": (8 * 5, embd), "time_mix_w2.weight": (5, embd, 8),
             "time_mix_lerp_x.weight": (1, 1, embd), "time_mix_lerp_fused.weight": (5, 1, 1, embd),
             "time_mix_first.weight": (embd // head_size, head_size),
             "time_mix_decay.weight": (embd,), "time_mix_decay_w1.weight": (16, embd),
             "time_mix_decay_w2.weight": (embd, 16), "time_mix_ln.weight": (embd,),
             "time_mix_ln.bias": (embd,), "channel_mix_lerp_k.weight": (1, 1, embd),
             "channel_mix_lerp_r.weight": (1, 1, embd), "channel_mix_key.weight": (ff, embd),
             "channel_mix_value.weight": (embd, ff),
             "channel_mix_receptance.weight": (embd, embd),
             **{f"time_mix_{m}.weight": (embd, embd) for m in (
                 "key", "value", "receptance", "gate", "output")}}
    for i in range(blocks):
        shapes |= {f"blk.{i}.{name}": shape for name, shape in layer.items()}
    for name, shape in shapes.items():
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    return _written(w, path)


def _f16(*shape: int) -> np.ndarray:
    """Zero weights: the generated models' answers are nonsense, their buffers real."""
    return np.zeros(shape, dtype=np.float16)


def _written(w: gguf.GGUFWriter, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _byte_vocabulary(w: gguf.GGUFWriter, vocab: int) -> None:
    """A SentencePiece-style vocabulary of `vocab` made-up tokens, <unk> <s> </s> first."""
    w.add_tokenizer_model("llama")
    tokens = [b"<unk>", b"<s>", b"</s>"] + [bytes([97 + i % 26]) * (1 + i // 26)
                                             for i in range(vocab - 3)]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

# -- hostile files (docs/security.md, "Hostile model files") --------------------------------


def _s(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def raw_gguf(kv: list[tuple[bytes, int, bytes]], tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    """A GGUF v3 file by hand: its key-value pairs (key, type, packed value), tensor infos."""
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kv))
    data = head + b"".join(_s(k) + struct.pack("<I", t) + v for k, t, v in kv) + tensors
    return data + b"\0" * (-len(data) % 32)


def write_strings(f: BinaryIO, count: int) -> None:
    """A header of one array of `count` empty strings (sparse: no disk)."""
    f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s(b"a") + struct.pack("<IIQ", 9, 8, count))
    f.truncate(f.tell() + 8 * count)


def write_bombs(d: Path) -> dict[str, str]:
    """The security review's header bombs (M5, L6): file name -> words of its problem line."""
    with open(d / "tensors.gguf", "wb") as f:  # 2^40 tensor infos claimed, 4.8 MB of zeros
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0))
        f.truncate(24 + 24 * 200_000)
    with open(d / "strings.gguf", "wb") as f:  # a string array of 2^62 entries, sparse 1 TiB
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s(b"a") +
                struct.pack("<IIQ", 9, 8, 2**62))
        f.truncate(2**40)
    (d / "negative.gguf").write_bytes(raw_gguf([
        (b"general.architecture", 8, _s(b"llama")),
        (b"llama.context_length", 11, struct.pack("<q", -2**62))]))
    (d / "layers.gguf").write_bytes(raw_gguf([], _s(b"blk.4000000000.w") + struct.pack(
        "<IqIQ", 1, 32, 0, 0), 1) + b"\0" * 256)
    (d / "nested.gguf").write_bytes(raw_gguf([(b"a", 9, struct.pack("<IQ", 9, 1))]))
    return {"tensors.gguf": "claims 1099511627776 tensors",
            "strings.gguf": "truncated or damaged",
            "negative.gguf": "llama.context_length of type INT64, where llama.cpp reads a UINT32",
            "layers.gguf": "layer 4000000000", "nested.gguf": "array of ARRAY"}
