"""Memory a model needs: estimated from GGUF metadata and llama-server's arguments, or learned.

The estimate is an upper bound: llama-server's own `--fit` (on by default) may shrink context or
offload to fit, never grow. After a real load the supervisor records the measured peak, and that
figure wins over the estimate for the same model and arguments from then on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from llamad.scheduler import Memory

log = logging.getLogger("llamad.memory")

MIB = 1024**2
# Per-process costs beyond weights, KV cache and compute graph. Rough figures for this
# llama-server: process + HTTP server on the host; CUDA context and cuBLAS workspace on a GPU.
PROCESS_RAM = 64 * MIB
GPU_CONTEXT = 384 * MIB
# Compute buffer per token of a batch and per embedding dimension. Fitted to llama-server's own
# figures: 52.8 MiB for Gemma 3 270M (640 wide) and about 258 MiB for Llama 3 8B (4096 wide)
# at the default batch of 512; logits are few (one per slot) and fit in PROCESS_RAM.
GRAPH_BYTES = 128

# Bytes per element of each KV cache type (block size over elements per block for quantised ones).
CACHE_TYPE_BYTES = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32,
}
# llama.cpp hard-codes which layers use sliding-window attention: one full layer every N.
SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "gemma-embedding": 6, "cohere2": 4,
               "gpt-oss": 2, "exaone4": 4}


class ModelInfo(Protocol):
    """GGUF metadata; gguf_info.GGUFInfo has these. `sliding_window` (int, the GGUF key
    `<arch>.attention.sliding_window`) is read too when present."""

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


@dataclass(frozen=True)
class ServerArgs:
    """The llama-server settings that decide memory, with this llama-server's defaults."""

    gpu_layers: int | None = None  # None: auto or all, i.e. every layer llama-server can place
    ctx_size: int = 0  # 0: the model's trained context
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    parallel: int | None = None  # None: auto, which means 4 slots sharing one unified cache
    kv_unified: bool | None = None
    kv_per_slot: int = 0
    ubatch: int = 512
    swa_full: bool = False
    kv_offload: bool = True


@dataclass(frozen=True)
class Estimate:
    weights: Memory
    kv: Memory
    compute: Memory
    ctx: int  # KV cells of a full-attention layer: the context all slots share

    @property
    def total(self) -> Memory:
        parts = (self.weights, self.kv, self.compute)
        return Memory(sum(p.ram for p in parts), sum(p.vram for p in parts))


_VALUE_FLAGS = {
    "-ngl": "gpu_layers", "--gpu-layers": "gpu_layers", "--n-gpu-layers": "gpu_layers",
    "-c": "ctx_size", "--ctx-size": "ctx_size",
    "-ctk": "cache_type_k", "--cache-type-k": "cache_type_k",
    "-ctv": "cache_type_v", "--cache-type-v": "cache_type_v",
    "-np": "parallel", "--parallel": "parallel",
    "--kv-unified-per-slot": "kv_per_slot", "-ub": "ubatch", "--ubatch-size": "ubatch",
}
_SWITCHES = {
    "-kvu": ("kv_unified", True), "--kv-unified": ("kv_unified", True),
    "-no-kvu": ("kv_unified", False), "--no-kv-unified": ("kv_unified", False),
    "--swa-full": ("swa_full", True),
    "-nkvo": ("kv_offload", False), "--no-kv-offload": ("kv_offload", False),
    "-kvo": ("kv_offload", True), "--kv-offload": ("kv_offload", True),
}


def parse_args(args: Sequence[str]) -> ServerArgs:
    """Pick the memory-relevant settings out of a llama-server argv (later flags win)."""
    found: dict[str, object] = {}
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag in _VALUE_FLAGS:
            if not eq:
                i += 1
                value = args[i] if i < len(args) else ""
            found[_VALUE_FLAGS[flag]] = value
        elif flag in _SWITCHES:
            key, on = _SWITCHES[flag]
            found[key] = on
        i += 1
    return _settings(found)


def _settings(found: dict[str, object]) -> ServerArgs:
    def number(key: str, default: int) -> int:
        try:
            return int(str(found.get(key, default)))
        except ValueError:
            return default

    layers = str(found.get("gpu_layers", "auto"))
    gpu_layers = None if layers in ("auto", "all") or number("gpu_layers", -1) < 0 else int(layers)
    parallel = number("parallel", -1)
    unified = found.get("kv_unified")
    return ServerArgs(
        gpu_layers=gpu_layers, ctx_size=max(0, number("ctx_size", 0)),
        cache_type_k=str(found.get("cache_type_k", "f16")).lower(),
        cache_type_v=str(found.get("cache_type_v", "f16")).lower(),
        parallel=parallel if parallel > 0 else None,
        kv_unified=unified if isinstance(unified, bool) else None,
        kv_per_slot=max(0, number("kv_per_slot", 0)), ubatch=max(1, number("ubatch", 512)),
        swa_full=bool(found.get("swa_full", False)), kv_offload=bool(found.get("kv_offload", True)),
    )


def estimate(info: ModelInfo, args: Sequence[str], *, gpu: bool) -> Estimate:
    """Estimated RAM and VRAM of llama-server running this model with these arguments.

    `gpu`: whether the machine has a GPU to offload to. Unknown metadata makes the estimate
    cruder, never smaller than the weights.
    """
    s = parse_args(args)
    n_layer = info.block_count or 0
    on_gpu = n_layer + 1 if s.gpu_layers is None else min(s.gpu_layers, n_layer + 1)
    on_gpu = on_gpu if gpu else 0
    # Offloading counts the repeating layers plus the output layer; the input embedding
    # always stays on the host.
    share = on_gpu / (n_layer + 1) if n_layer else (1.0 if on_gpu else 0.0)
    weights_vram = int(info.size * share)
    weights = Memory(info.size - weights_vram, weights_vram)

    ctx, kv_bytes = _kv(info, s)
    kv_share = min(on_gpu, n_layer) / n_layer if n_layer and s.kv_offload else 0.0
    kv = Memory(kv_bytes - int(kv_bytes * kv_share), int(kv_bytes * kv_share))

    graph = s.ubatch * (info.embedding_length or 4096) * GRAPH_BYTES
    compute = Memory(PROCESS_RAM + graph, 0) if on_gpu == 0 else Memory(
        PROCESS_RAM + graph // 8, GPU_CONTEXT + graph)
    return Estimate(weights, kv, compute, ctx)


def _kv(info: ModelInfo, s: ServerArgs) -> tuple[int, int]:
    """(context cells, KV cache bytes) as llama.cpp sizes the cache."""
    n_layer, heads = info.block_count or 0, info.head_count or 0
    if not n_layer or not heads or not info.embedding_length:
        return 0, 0
    n_seq = s.parallel or 4
    unified = s.kv_unified if s.kv_unified is not None else s.parallel is None
    n_ctx = s.ctx_size or (n_seq * s.kv_per_slot) or info.context_length or 4096
    n_ctx = _pad(n_ctx)
    if unified:
        full_cells = n_ctx
        swa_cells = min(n_ctx, _pad(_window(info) * n_seq + s.ubatch))
    else:
        per_seq = _pad(n_ctx // n_seq)
        full_cells = per_seq * n_seq
        swa_cells = n_seq * min(per_seq, _pad(_window(info) + s.ubatch))
    head_dim = info.embedding_length // heads
    k_len, v_len = info.key_length or head_dim, info.value_length or head_dim
    per_cell = (info.head_count_kv or heads) * (
        k_len * _type_bytes(s.cache_type_k) + v_len * _type_bytes(s.cache_type_v))
    n_swa = 0 if s.swa_full or not _window(info) else _swa_layers(info)
    cells = (n_layer - n_swa) * full_cells + n_swa * swa_cells
    return full_cells, int(cells * per_cell)


def _window(info: ModelInfo) -> int:
    window = getattr(info, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else 0


def _swa_layers(info: ModelInfo) -> int:
    pattern = SWA_PATTERN.get(info.architecture or "")
    n_layer = info.block_count or 0
    if not pattern:
        return 0
    return sum(1 for il in range(n_layer) if il % pattern < pattern - 1)


def _type_bytes(name: str) -> float:
    return CACHE_TYPE_BYTES.get(name, 2.0)


def _pad(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Learned:
    """Measured on a real load: peak RAM (systemd's MemoryCurrent), peak VRAM (None where the
    GPU could not attribute memory to the process) and seconds from start to ready."""

    ram: int = 0
    vram: int | None = None
    load_seconds: float | None = None


def need(info: ModelInfo, args: Sequence[str], learned: Learned | None, *, gpu: bool) -> Memory:
    """What the scheduler should plan for: the learned figures, the estimate where none."""
    est = estimate(info, args, gpu=gpu).total
    if learned is None or not learned.ram:
        return est
    return Memory(learned.ram, est.vram if learned.vram is None else learned.vram)


class LearnedStore:
    """Learned figures per model and arguments, in memory and, given a state dir, in a JSON file.

    Arguments are part of the key because context size, offload and cache type change memory.
    Pass the model's own llama-server arguments, not the per-run socket path or port.
    """

    FILE = "learned.json"

    def __init__(self, state_dir: Path | None = None) -> None:
        self._path = state_dir / self.FILE if state_dir is not None else None
        self._entries: dict[str, Learned] = self._read()

    @staticmethod
    def key(model: str, args: Sequence[str]) -> str:
        digest = hashlib.sha256("\0".join(args).encode()).hexdigest()[:16]
        return f"{model}#{digest}"

    def get(self, model: str, args: Sequence[str]) -> Learned | None:
        return self._entries.get(self.key(model, args))

    def record(self, model: str, args: Sequence[str], *, ram: int = 0, vram: int | None = None,
               load_seconds: float | None = None) -> Learned:
        """Fold in a measurement: memory keeps its peak, the load time its latest value."""
        key = self.key(model, args)
        old = self._entries.get(key, Learned())
        new = Learned(
            ram=max(old.ram, ram),
            vram=old.vram if vram is None else max(old.vram or 0, vram),
            load_seconds=old.load_seconds if load_seconds is None else load_seconds,
        )
        if new != old:
            self._entries[key] = new
            self._write()
        return new

    def _read(self) -> dict[str, Learned]:
        if self._path is None or not self._path.exists():
            return {}
        try:
            raw = json.loads(self._path.read_text())
            return {k: Learned(int(v["ram"]), _opt_int(v.get("vram")), _opt_float(
                v.get("load_seconds"))) for k, v in raw["models"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring learned memory figures in %s: %s", self._path, e)
            return {}

    def _write(self) -> None:
        if self._path is None:
            return
        body = json.dumps({"version": 1, "models": {k: asdict(v) for k, v in
                                                    sorted(self._entries.items())}}, indent=1)
        tmp = ""
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a crash never leaves a half-written file behind.
            fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".learned.")
            with os.fdopen(fd, "w") as f:
                f.write(body)
            os.replace(tmp, self._path)
        except OSError as e:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            log.warning("cannot save learned memory figures to %s: %s", self._path, e)


def _opt_int(v: object) -> int | None:
    return None if v is None else int(str(v))


def _opt_float(v: object) -> float | None:
    return None if v is None else float(str(v))
