"""What kind each layer of a model is, from its GGUF metadata, as llama.cpp decides it:
sliding-window, full attention, or recurrent (a fixed state instead of a KV cache)."""

from __future__ import annotations

from typing import Protocol

# llama.cpp hard-codes which layers use sliding-window attention (load_swa_pattern, for
# a model whose header gives a sliding window): one full layer every N, the last of each N
# or, negative here, the first. The header may give N instead (`sliding_window_pattern` as a
# number), or list the layers (as bools), which SWA_LISTED's read too. Not listed: every
# layer counts as full, an upper bound.
SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "gemma-embedding": 6, "cohere2": 4,
               "gpt-oss": 2, "exaone4": 4, "exaone-moe": 4, "olmo2": 4, "afmoe": 4,
               "mellum": 4, "muse-glimmer": 4, "plamo3": 8, "llama4": 4, "cohere2moe": -4,
               "laguna": -4, "smallthinker": -4, "modern-bert": -3}
SWA_LISTED = frozenset({"gemma4", "gemma4-assistant", "granite_swa", "maple", "mimo2",
                        "step35", "spark2_5", "dots3note"})
# Windows llama.cpp sets itself: Llama 4's chunked attention (8192 tokens unless the header's
# sliding_window is 0, also where it gives none), SmallThinker's (4096 where it gives one).
FIXED_WINDOW = {"llama4": 8192, "smallthinker": 4096}
# Recurrent layers keep a fixed state per sequence instead of a KV cache (llama.cpp's
# memory-recurrent, f32): every layer of Mamba's and RWKV's, which have no attention; of
# Falcon-H1 every layer, beside its attention; of Qwen3-Next's family and MiniMax-01 all but
# every `full_attention_interval`-th (4 unless the header says; MiniMax-01's 8); of other
# hybrids (LFM2, Granite 4.0-H, Nemotron-H, Jamba, Kimi Linear...) the layers whose KV head
# count is 0.
NO_ATTENTION = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
# Layers without KV heads that keep no state either: Nemotron's (deci) with no attention.
NO_STATE = frozenset({"deci"})
STATE_EVERYWHERE = NO_ATTENTION | {"falcon-h1"}
ATTENTION_EVERY = {"qwen3next": 4, "qwen35": 4, "qwen35moe": 4, "qwen4exp": 4, "minimax-01": 8}
STATE_BYTES = 4
# Layers from the first that hold a KV cache of their own; the others reuse an earlier
# layer's (llama.cpp's n_layer_kv_from_start): Gemma 3n's first 20, Gemma 4's all but the
# header's `attention.shared_kv_layers`.
KV_FROM_START = {"gemma3n": 20}
# NextN (multi-token prediction) layers, the header's last `nextn_predict_layers` blocks: of
# these architectures llama-server neither loads them (TENSOR_SKIP) nor gives them a KV cache
# or recurrent state (they are past llama.cpp's n_layer()), unless MTP drafts are on; -ngl
# still counts them. Not listed, they count as any layer, an upper bound: BailingMoE 3's and
# Nemotron-H's hybrid caches keep their KV, though their weights are skipped.
NEXTN_SKIPPED = frozenset({"glm4", "glm4moe", "glm-dsa", "glm5-next", "deepseek2",
                           "deepseek32", "deepseek4", "qwen3next", "qwen35", "qwen35moe",
                           "qwen4exp", "mimo2", "step35", "hy_v3", "cohere2moe", "bailingmoe2",
                           "exaone4", "exaone-moe", "dots3note"})


class ModelInfo(Protocol):
    """GGUF metadata; gguf_info.GGUFInfo has these. Read too when present: `sliding_window`,
    `sliding_window_pattern`, `key_length_mla`, `key_length_swa`, `value_length_swa`,
    `shared_kv_layers`, `feed_forward_length`, `expert_count`, `expert_used_count`,
    `expert_feed_forward_length`, `expert_shared_feed_forward_length`, the recurrent state's
    `full_attention_interval`, `ssm_*`, `shortconv_l_cache`, `wkv_head_size`,
    `token_shift_count`, `kda_head_dim` and `nextn_predict_layers` (ints); `swa_pattern`,
    `kv_heads` and `heads` (per layer); and `tensors` (gguf_info.TensorBytes), without which
    weights are split by layer count."""

    @property
    def architecture(self) -> str | None: ...
    @property
    def block_count(self) -> int | None: ...
    @property
    def context_length(self) -> int | None: ...
    @property
    def head_count(self) -> int | None: ...
    @property
    def head_count_kv(self) -> int | None: ...
    @property
    def embedding_length(self) -> int | None: ...
    @property
    def key_length(self) -> int | None: ...
    @property
    def value_length(self) -> int | None: ...
    @property
    def size(self) -> int: ...


def window(info: ModelInfo) -> int:
    given = getattr(info, "sliding_window", None)
    arch = info.architecture or ""
    if arch == "llama4" and given is None:
        given = FIXED_WINDOW[arch]
    if not (isinstance(given, int) and given > 0):
        return 0
    return FIXED_WINDOW.get(arch, given)


def swa_layers(info: ModelInfo) -> frozenset[int]:
    arch, n_layer = info.architecture or "", info.block_count or 0
    listed = getattr(info, "swa_pattern", None)
    if (arch in SWA_PATTERN or arch in SWA_LISTED) and isinstance(listed, tuple) and listed:
        return frozenset(il for il, on in enumerate(listed[:n_layer]) if on)
    if arch not in SWA_PATTERN:
        return frozenset()
    every = getattr(info, "sliding_window_pattern", None)
    n = every if isinstance(every, int) else abs(SWA_PATTERN[arch])
    first = SWA_PATTERN[arch] < 0  # the full layer is the first of each n
    return frozenset(il for il in range(n_layer)
                     if n == 0 or (il % n != 0 if first else il % n < n - 1))


def nextn_layers(info: ModelInfo, mtp: bool = False) -> int:
    """How many of the last blocks llama-server neither loads nor caches: NEXTN_SKIPPED's
    NextN layers, unless MTP drafts load them (`mtp`). None where they are all the model has
    (llama.cpp then keeps them), or where the file has no tensors in the first of them
    (llama.cpp's DeepSeek 4 then counts them as trunk layers; an upper bound for the rest)."""
    n, nextn = info.block_count or 0, getattr(info, "nextn_predict_layers", None) or 0
    if mtp or info.architecture not in NEXTN_SKIPPED or not 0 < nextn < n:
        return 0
    table = getattr(getattr(info, "tensors", None), "layers", ())
    return nextn if len(table) > n - nextn and table[n - nextn] > 0 else 0


def kv_heads(info: ModelInfo, n_layer: int, mtp: bool = False) -> list[int]:
    """KV heads of each layer's own cache: 0 for a recurrent layer, for one that reuses an
    earlier layer's cache, and for a NextN layer left unloaded (`mtp`: nextn_layers)."""
    own = own_kv_layers(info, n_layer, mtp)
    return [h if il < own else 0 for il, h in enumerate(_heads(info, n_layer))]


def padded_v(info: ModelInfo, n_layer: int, mtp: bool = False) -> list[int] | None:
    """Each layer's V width (floats a cell) when V is stored transposed (flash attention off)
    and layers' widths differ: llama.cpp pads every layer with a cache of its own to the
    widest (TAG_V_CACHE_VARIABLE), even one without KV heads (deci's). None where every
    layer's is the same."""
    swa, v_len = swa_layers(info), (head_sizes(info)[1], head_sizes(info, swa=True)[1])
    widths = [h * v_len[il in swa] for il, h in enumerate(_heads(info, n_layer))]
    if len(set(widths)) < 2:
        return None
    own = own_kv_layers(info, n_layer, mtp)
    recurrent = set(recurrent_layers(info, n_layer, mtp))
    return [max(widths) if il < own and il not in recurrent else 0 for il in range(n_layer)]


def head_sizes(info: ModelInfo, swa: bool = False) -> tuple[int, int]:
    """Floats of one KV head's key and value in one cell (of a sliding-window layer: Gemma 4
    gives those their own head size). With multi-head latent attention (DeepSeek 2 and 3,
    Kimi K2, GLM-4.7-Flash: the header gives key_length_mla) llama.cpp caches the compressed
    latent as the one head's K, and no V."""
    head_dim = (info.embedding_length or 0) // (info.head_count or 1)
    k_len, v_len = info.key_length or head_dim, info.value_length or head_dim
    if swa:
        k_len = getattr(info, "key_length_swa", None) or k_len
        v_len = getattr(info, "value_length_swa", None) or v_len
    if getattr(info, "key_length_mla", None):
        v_len = 0
    return k_len, v_len


def own_kv_layers(info: ModelInfo, n_layer: int, mtp: bool = False) -> int:
    """The first layers that hold a KV cache of their own: not those that reuse an earlier
    layer's, nor the NextN layers left unloaded (nextn_layers)."""
    shared = getattr(info, "shared_kv_layers", None) or 0
    trunk = n_layer - nextn_layers(info, mtp)
    return max(0, min(trunk, KV_FROM_START.get(info.architecture or "", n_layer - shared)))


def _heads(info: ModelInfo, n_layer: int) -> list[int]:
    # KV heads per layer; where the header gives neither array nor number, the heads' own
    # (llama.cpp: n_head_kv defaults to n_head, layer by layer).
    given = getattr(info, "kv_heads", None)
    if given is None and info.head_count_kv is None:
        given = getattr(info, "heads", None)
    if isinstance(given, tuple) and len(given) >= n_layer:
        heads = list(given[:n_layer])
    else:
        heads = [info.head_count_kv or info.head_count or 0] * n_layer
    arch = info.architecture or ""
    if arch in ATTENTION_EVERY:
        every = getattr(info, "full_attention_interval", None) or ATTENTION_EVERY[arch]
        heads = [h if (il + 1) % every == 0 else 0 for il, h in enumerate(heads)]
    return [0] * n_layer if arch in NO_ATTENTION else heads


def recurrent_layers(info: ModelInfo, n_layer: int, mtp: bool = False) -> list[int]:
    """The layers with a recurrent state: those without KV heads, or all of them; never a
    NextN layer left unloaded."""
    trunk = n_layer - nextn_layers(info, mtp)
    if (info.architecture or "") in NO_STATE:
        return []
    if (info.architecture or "") in STATE_EVERYWHERE:
        return list(range(trunk))
    return [il for il, heads in enumerate(_heads(info, n_layer)[:trunk]) if heads == 0]


def state_bytes(info: ModelInfo) -> int:
    """A recurrent layer's state for one sequence, as llama.cpp's n_embd_r (the convolution's
    or token shift's rows) and n_embd_s (the state proper) size it, f32; 0 where the header
    gives no shape."""
    embd = info.embedding_length or 0
    wkv = getattr(info, "wkv_head_size", None) or 0
    if wkv:  # RWKV
        return ((getattr(info, "token_shift_count", None) or 2) + wkv) * embd * STATE_BYTES
    conv, inner, state, groups, l_cache, kda = (getattr(info, k, None) or 0 for k in (
        "ssm_conv_kernel", "ssm_inner_size", "ssm_state_size", "ssm_group_count",
        "shortconv_l_cache", "kda_head_dim"))
    heads = info.head_count or 0
    if l_cache:  # LFM2's short convolution
        rows = embd * (l_cache - 1)
    elif kda:  # Kimi Linear's delta attention: q, k and v convolved
        rows = 3 * (conv - 1 if conv > 0 else 3) * heads * kda
    else:  # Mamba's convolution
        rows = max(conv - 1, 0) * (inner + 2 * groups * state)
    if kda:
        full = kda * kda * heads
    elif info.architecture == "minimax-01":  # lightning attention: a head_dim² per head
        head = info.key_length or (embd // heads if heads else 0)
        full = head * head * heads
    else:
        full = state * inner
    return (rows + full) * STATE_BYTES
