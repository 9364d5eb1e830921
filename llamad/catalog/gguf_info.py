"""Header-only GGUF metadata (ggufheader.py reads it, bounded), cached by (dev, inode, size,
mtime)."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from llamad.catalog import files, ggufheader
from llamad.catalog.ggufheader import ARCH_FIELDS, LAYER_ARRAYS, TEMPLATE_KEY, FileHeader, Scalar
from llamad.catalog.tensortable import EXPERTS, GGUFError, TensorBytes
from llamad.statefile import read_json, write_json

# What a header says lives in ggufheader.py; the catalog imports these names from here.
__all__ = ["EXPERTS", "TEMPLATE_KEY", "FileHeader", "GGUFError", "GGUFInfo", "InfoCache",
           "Projector", "Scalar", "TensorBytes", "combine", "metadata", "read_header"]

log = logging.getLogger("llamad.gguf")

StatKey = tuple[int, int, int, int]
CACHE_VERSION = 16  # 16: the bytes llama.cpp repacks on x86 (TensorBytes.repack)


# Slots: one per model stays ~350 bytes. As a dict, from 30 fields on Python 3.11 no
# longer shares its keys with the others and takes 1.7 KB (1.3 MB at 1,000 models).
@dataclass(frozen=True, slots=True)
class GGUFInfo:
    """What a GGUF header says that sizing and the listings need."""

    architecture: str | None
    parameters: int | None
    context_length: int | None
    block_count: int | None
    head_count: int | None
    head_count_kv: int | None
    embedding_length: int | None
    key_length: int | None
    value_length: int | None
    size: int
    quantization: str | None
    modalities: tuple[str, ...]
    sliding_window: int | None = None  # tokens; memory.py sizes SWA layers' cache by it
    key_length_mla: int | None = None  # multi-head latent attention: its cache has no V
    feed_forward_length: int | None = None
    expert_count: int | None = None
    expert_used_count: int | None = None
    expert_feed_forward_length: int | None = None
    expert_shared_feed_forward_length: int | None = None
    # Hybrid and recurrent models: KV heads per layer (0: a recurrent layer), the layers
    # with attention (qwen3next's family: every Nth), their recurrent state's shape.
    kv_heads: tuple[int, ...] | None = None
    # Which layers use a sliding window: every Nth is full (a number), or each (1: sliding);
    # Gemma 4's head size there, and how many layers at the end reuse an earlier layer's KV
    # cache instead of holding one.
    sliding_window_pattern: int | None = None
    swa_pattern: tuple[int, ...] | None = None
    key_length_swa: int | None = None
    value_length_swa: int | None = None
    shared_kv_layers: int | None = None
    full_attention_interval: int | None = None
    ssm_conv_kernel: int | None = None
    ssm_inner_size: int | None = None
    ssm_state_size: int | None = None
    ssm_group_count: int | None = None
    shortconv_l_cache: int | None = None
    wkv_head_size: int | None = None
    token_shift_count: int | None = None
    kda_head_dim: int | None = None
    # The last blocks that are multi-token prediction (NextN) layers (layers.nextn_layers).
    nextn_predict_layers: int | None = None
    # Heads per layer, where the header gives them as an array (Nemotron's deci, OpenELM);
    # head_count is then the first layer's, as llama.cpp's n_head() is.
    heads: tuple[int, ...] | None = None
    tensors: TensorBytes | None = None  # where the weights' bytes sit, for offload estimates
    projector: Projector | None = None  # the paired mmproj file, when there is one
    # tokenizer.chat_template is in the header; without it llama-server falls back to ChatML
    # (presets.run_settings picks llama.cpp's built-in template for the architecture instead).
    chat_template: bool = True


# Projectors that take images of any size (by clip.projector_type): llama-server reserves
# their graph at load for this many merged tokens (clip.cpp's warmup), each the square of
# the merge (the header's spatial_merge_size or projector.scale_factor, else this) in patches.
WARMUP = {"qwen2vl_merger": (46 * 46, 2), "qwen2.5vl_merger": (46 * 46, 2),
          "qwen3vl_merger": (46 * 46, 2), "glm4v": (46 * 46, 2), "pixtral": (256, 1),
          "kimivl": (256, 1), "gemma4v": (256, 3)}


class Projector(NamedTuple):
    """A multimodal projector (mmproj) file: its size and its encoder's shape, whose
    compute graph llama-server reserves at load (memory/projector.py)."""

    size: int
    tokens: int  # patches of the image llama-server reserves for, or audio frames
    embedding: int
    feed_forward: int
    heads: int
    gated: bool = False  # clip.use_silu: the converters that set it write SwiGLU encoders
    window: bool = False  # window attention (Qwen2.5-VL): a mask of every patch pair

    @classmethod
    def of(cls, head: FileHeader) -> Projector:
        f = head.fields

        def num(kind: str, key: str, default: int) -> int:
            value = f.get(f"clip.{kind}.{key}")
            return value if type(value) is int and value > 0 else default

        audio = "clip.audio.embedding_length" in f and "clip.vision.embedding_length" not in f
        kind = "audio" if audio else "vision"
        warmup = WARMUP.get(str(f.get("clip.vision.projector_type", f.get(
            "clip.projector_type"))))
        if audio:
            tokens = 1500  # Whisper-style audio encoders see 30 s as 1500 frames
        elif warmup:
            merge = num(kind, "spatial_merge_size", 0) or num(
                kind, "projector.scale_factor", warmup[1])
            tokens = warmup[0] * merge * merge
        else:
            tokens = (num(kind, "image_size", 896) // num(kind, "patch_size", 14)) ** 2
        embd = num(kind, "embedding_length", 1152)
        return cls(head.size, tokens, embd, num(kind, "feed_forward_length", 4 * embd),
                   num(kind, "attention.head_count", 16), f.get("clip.use_silu") is True,
                   num(kind, "n_wa_pattern", 0) > 0)


def _not_gguf(head: bytes) -> str | None:
    """Why a file is not a GGUF file at all, from its first bytes, naming what a new user
    most often has instead; None where it begins as one. The bytes themselves are never
    told: the file may be a link to one only root may read (docs/security.md)."""
    if head[:4] == b"GGUF":
        return None
    if not head:
        return "is empty"
    if head.startswith(b"version https://git-lfs"):
        return ("is a Git LFS pointer, not the model: its repository was cloned without "
                "git-lfs (`git lfs pull` fetches the file)")
    if head.lstrip()[:1] == b"<":
        return ("is not a GGUF file but a web page: the download link leads to the model's "
                "page rather than to the file")
    return "is not a GGUF file: it does not begin with 'GGUF'"


def read_header(path: Path) -> FileHeader:
    """Parse one file's header; raise GGUFError if it is not a complete GGUF file, or not a
    regular file llamad may read (files.py: never blocks, never as root what a model unit
    could not read)."""
    return _reading(path, ggufheader.parse)


def metadata(path: Path) -> dict[str, Scalar | None]:
    """Every key of the file's header (ggufheader.metadata): its value, or None for an
    array. The whole header is walked: call it on a worker thread. Raises GGUFError."""
    return _reading(path, ggufheader.metadata)


T = TypeVar("T")


def _reading(path: Path, read: Callable[[int, int], T]) -> T:
    try:
        fd, st = files.open_regular(path)
    except files.Refused as e:
        raise GGUFError(str(e)) from None
    try:
        why = _not_gguf(os.pread(fd, 64, 0))
        if why:
            raise GGUFError(why)
        return read(fd, st.st_size)
    except OSError as e:
        raise GGUFError(f"cannot be read ({e.strerror or e})") from e
    except GGUFError as e:
        if str(e) != "truncated":
            raise
        raise GGUFError(f"is a truncated or damaged GGUF file ({st.st_size} bytes; an "
                        "interrupted copy or download?)") from None
    finally:
        os.close(fd)


def _quantization(head: FileHeader) -> str | None:
    return head.file_type or head.tensor_type


def _modalities(mmproj: FileHeader | None) -> tuple[str, ...]:
    if mmproj is None:
        return ("text",)
    vision = mmproj.fields.get("clip.has_vision_encoder")
    audio = mmproj.fields.get("clip.has_audio_encoder")
    if vision is None and audio is None:
        vision = True
    return ("text",) + (("image",) if vision else ()) + (("audio",) if audio else ())


def combine(shards: list[FileHeader], mmproj: FileHeader | None) -> GGUFInfo:
    """Build one model's GGUFInfo from its shards' headers (first shard first)."""
    first = shards[0]
    fields = first.fields
    arch = fields.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    p = f"{arch}." if arch else "-"
    # This runs for every model on every rescan: one pass over prefixed keys made once per
    # architecture. (type() rather than isinstance(): a bool is no count.)
    ints = {name: value if type(value) is int else None
            for name, key in _arch_keys(p) for value in (fields.get(key),)}
    # Per-layer arrays instead of a number: the first layer's heads (llama.cpp sizes a head
    # by them), the widest feed-forward stage (the compute graph's).
    if ints["head_count"] is None and first.heads:
        ints["head_count"] = first.heads[0]
    if ints["feed_forward_length"] is None and first.ff_lengths:
        ints["feed_forward_length"] = max(first.ff_lengths)
    return GGUFInfo(
        architecture=arch,
        parameters=sum(s.parameters for s in shards) or None,
        size=sum(s.size for s in shards),
        quantization=_quantization(first),
        modalities=_modalities(mmproj),
        chat_template=first.chat_template,
        tensors=first.tensors if len(shards) == 1 else functools.reduce(
            TensorBytes.plus, (s.tensors for s in shards)),
        projector=Projector.of(mmproj) if mmproj is not None else None,
        kv_heads=first.kv_heads or None,
        swa_pattern=first.swa_pattern or None,
        heads=first.heads or None,
        **ints,
    )


@functools.cache
def _arch_keys(prefix: str) -> tuple[tuple[str, str], ...]:
    return tuple((name, prefix + key) for name, key in ARCH_FIELDS.items())


def _header(value: dict[str, Any]) -> FileHeader:
    tensors = TensorBytes.load(value.pop("tensors"))
    value |= {field: tuple(value[field]) for field in LAYER_ARRAYS}
    return FileHeader(**value, tensors=tensors)


def _stat_key(st: os.stat_result) -> StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class InfoCache:
    """Headers (or why a file was rejected) by path, valid while the stat key matches.

    Optionally backed by a JSON file so a short-lived command (`llamad models`) is
    as fast on its second run as the daemon is on a rescan.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._entries: dict[str, tuple[StatKey, FileHeader | str]] = {}
        self._dirty = False
        if path is not None:
            self._load(path)

    def header(self, path: Path, st: os.stat_result | None = None,
               confine: Callable[[Path], None] | None = None) -> FileHeader:
        """The file's header; `confine` (files.confine) is asked before a file is read."""
        st = st or path.stat()
        key, name = _stat_key(st), str(path)
        hit = self._entries.get(name)
        if hit is None or hit[0] != key:
            try:
                if confine is not None:
                    confine(path)
                value: FileHeader | str = read_header(path)
            except ggufheader.TooSlow:
                raise  # a busy machine's refusal: not remembered
            except (files.Refused, GGUFError) as e:
                value = str(e)
            hit = (key, value)
            self._entries[name] = hit
            self._dirty = True
        if isinstance(hit[1], str):
            raise GGUFError(hit[1])
        return hit[1]

    def known(self, path: Path, st: os.stat_result) -> bool:
        """Whether the file's header (or why it was refused) is cached for this stat."""
        hit = self._entries.get(str(path))
        return hit is not None and hit[0] == _stat_key(st)

    def retain(self, paths: Iterable[str]) -> None:
        """Forget files that are gone, so the cache does not grow without bound."""
        keep = set(paths)
        for name in [n for n in self._entries if n not in keep]:
            del self._entries[name]
            self._dirty = True

    def __len__(self) -> int:
        return len(self._entries)

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        data = {"version": CACHE_VERSION, "gguf": "gguf", "entries": {
            n: [list(k), asdict(v) if isinstance(v, FileHeader) else v]
            for n, (k, v) in self._entries.items()}}
        if write_json(self.path, data, "the metadata cache"):
            self._dirty = False

    def _load(self, path: Path) -> None:
        data = read_json(path, "the metadata cache")
        try:
            if data is None or data.get("version") != CACHE_VERSION:
                return
            for name, (key, value) in data["entries"].items():
                header = value if isinstance(value, str) else _header(value)
                self._entries[name] = (tuple(key), header)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            # Entries of another shape only cost a slower scan.
            log.debug("ignoring the metadata cache %s: %s", path, e)
            self._entries.clear()
