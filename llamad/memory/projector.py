"""The compute graph a multimodal projector's encoder reserves when llama-server loads it
(clip.cpp's warmup, one image of the projector's largest fixed size or, for those taking
any size, of its warmup size), as llama-server sizes it. Each term was measured against
llama-server's own buffer on generated projectors (tests/test_memory.py,
test_projector_compute_buffer): Gemma 3's SigLIP shapes exact to the MiB, Qwen2.5-VL's
1.0-1.16x. The constants 600 and 1200 are measured too: about one or two patches' unfolded
pixels (14 x 14 x 3 floats each) that the gated encoders' graphs still hold.
"""

from __future__ import annotations

from llamad.catalog.gguf_info import Projector
from llamad.sizes import MIB

# Head sizes CUDA has flash-attention kernels for (ggml-cuda/fattn.cu, K and V alike).
CUDA_FLASH_HEADS = frozenset((40, 64, 72, 80, 96, 112, 128, 256))


def flash(proj: Projector, flash_attn: str, on_gpu: bool) -> bool:
    """Whether the encoder uses flash attention: llama-server's default (auto) does wherever
    the backend has it, the CPU for every head size, CUDA for CUDA_FLASH_HEADS."""
    if flash_attn != "auto":
        return flash_attn == "on"
    return not on_gpu or proj.embedding // proj.heads in CUDA_FLASH_HEADS


def graph(proj: Projector, flash_attn: str, on_gpu: bool) -> int:
    """Bytes: per patch, the largest stage's floats. A plain feed-forward's is ff + 3 x
    embedding, a gated one's (SwiGLU: up, gate, their product) 3 x ff + 3 x embedding (2 x ff
    + 4 x embedding beside a window mask), attention's 5 x embedding; window attention
    (Qwen2.5-VL) keeps a mask of every patch against every other, in f32 and, for flash
    attention, in f16; without flash attention each head's scores over all patches beside
    6 x embedding. A MiB more for the image itself, the pooling and the projection."""
    n, embd, ff = proj.tokens, proj.embedding, proj.feed_forward
    if not proj.gated:
        per_patch = max(ff + 3 * embd, 5 * embd)
    elif proj.window:
        per_patch = max(2 * ff + 4 * embd + 600, 5 * embd + 600)
    else:
        per_patch = max(3 * ff + 3 * embd + 1200, 5 * embd + 600)
    mask = n if proj.window else 0
    if flash(proj, flash_attn, on_gpu):
        per_patch += mask * 3 // 2
    else:
        per_patch = max(per_patch, n * proj.heads + 6 * embd + mask)
    return n * per_patch * 4 + MIB
