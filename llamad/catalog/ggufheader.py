"""A GGUF file's header -> FileHeader, read with hard bounds: the file is untrusted.

Anyone in group `llamad` may drop a GGUF file where llamad (root) reads it, at every start.
gguf-py's reader builds Python and numpy objects for every entry the header claims: a
4.8 MB file of zeros claiming 2^40 tensors cost 901 MiB and 13.5 s, a sparse file with a
string array of 2^62 entries hours of CPU (docs/security.md, "Hostile model files"). This
reader keeps nothing per entry, and checks every count and length against the bytes left
in the file before it acts on it:

- tensors at most MAX_TENSORS and at least 24 bytes each, key-value pairs at most MAX_KEYS
  and at least 13 bytes each; array counts and string lengths within the bytes left;
- at most MAX_STRINGS array strings stepped over, MAX_LAYERS layers, GGML_MAX_DIMS
  dimensions, and CPU_SECONDS of this thread's time per file;
- the keys llamad keeps (KEPT_KEYS, the architecture's ARCH_FIELDS) must have the type
  llama.cpp reads them as (UINT32 for numbers; CLIP_SOME's are left out instead), so no
  negative or oversized number reaches the memory estimate.

It reads through one 1 MiB window with pread (never mmap: a file truncated meanwhile would
be SIGBUS), so it costs about that much memory whatever the file claims.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# The tensor table's sums (and GGUFError, which it raises too) live in tensortable.py.
from llamad.catalog.tensortable import MAX_LAYERS as MAX_LAYERS
from llamad.catalog.tensortable import GGUFError as GGUFError
from llamad.catalog.tensortable import Tensor, TensorBytes

Scalar = str | int | float | bool
Value = Scalar | tuple[int, ...]  # a kept array: one of LAYER_ARRAYS

TEMPLATE_KEY = "tokenizer.chat_template"
# A projector's (mmproj) encoder shape, type and activation, for its compute graph's size.
CLIP_FIELDS = ("image_size", "patch_size", "embedding_length", "feed_forward_length",
               "attention.head_count", "block_count", "n_wa_pattern", "spatial_merge_size",
               "projector.scale_factor")
CLIP_KEYS = tuple(f"clip.{kind}.{key}" for kind in ("vision", "audio") for key in CLIP_FIELDS)
CLIP_BOOLS = ("clip.has_vision_encoder", "clip.has_audio_encoder", "clip.use_silu")
CLIP_TYPES = ("clip.projector_type", "clip.vision.projector_type")
# Keys llama.cpp reads for some projector types only: one of another type is left out, not
# refused, since llama.cpp may never read it in that file.
CLIP_SOME = frozenset((CLIP_TYPES[1], *(k for k in CLIP_KEYS if k.endswith(CLIP_FIELDS[6:]))))
KEPT_KEYS = frozenset(("general.architecture", "general.file_type", *CLIP_BOOLS, *CLIP_TYPES,
                       *CLIP_KEYS))
# GGUFInfo's whole-number fields and the keys `<arch>.<key>` they come from.
ARCH_FIELDS = {
    "context_length": "context_length", "block_count": "block_count",
    "head_count": "attention.head_count", "head_count_kv": "attention.head_count_kv",
    "embedding_length": "embedding_length", "key_length": "attention.key_length",
    "value_length": "attention.value_length", "sliding_window": "attention.sliding_window",
    "sliding_window_pattern": "attention.sliding_window_pattern",  # as a number: the period
    "key_length_mla": "attention.key_length_mla", "key_length_swa": "attention.key_length_swa",
    "value_length_swa": "attention.value_length_swa",
    "shared_kv_layers": "attention.shared_kv_layers",
    "feed_forward_length": "feed_forward_length", "expert_count": "expert_count",
    "expert_used_count": "expert_used_count",
    "expert_feed_forward_length": "expert_feed_forward_length",
    "expert_shared_feed_forward_length": "expert_shared_feed_forward_length",
    # Hybrid and recurrent models (llama.cpp's memory-recurrent): which layers are
    # recurrent, and the size of their state.
    "full_attention_interval": "full_attention_interval",
    "ssm_conv_kernel": "ssm.conv_kernel", "ssm_inner_size": "ssm.inner_size",
    "ssm_state_size": "ssm.state_size", "ssm_group_count": "ssm.group_count",
    "shortconv_l_cache": "shortconv.l_cache", "wkv_head_size": "wkv.head_size",
    "token_shift_count": "token_shift_count", "kda_head_dim": "kda.head_dim",
    "nextn_predict_layers": "nextn_predict_layers",  # the last blocks: multi-token prediction
}
KEPT_ARCH_KEYS = tuple(ARCH_FIELDS.values())
# The per-layer arrays kept, one of each at most, by FileHeader field (llama.cpp's
# get_key_or_arr): the KV heads of each layer (0 for a hybrid model's recurrent layers, which
# have no KV cache), which layers use a sliding window (Gemma 4's, a bool each), and the heads
# and feed-forward width of each layer (Nemotron's `deci`, OpenELM).
LAYER_ARRAYS = {"kv_heads": "attention.head_count_kv",
                "swa_pattern": "attention.sliding_window_pattern",
                "heads": "attention.head_count", "ff_lengths": "feed_forward_length"}
MAX_TENSORS = 65_536  # the biggest published models have a few thousand per file
MAX_KEYS = 100_000  # real files have tens
MAX_STRINGS = 8_000_000  # array strings per file: vocabularies and merges have up to ~1M
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 63  # GGML_MAX_NAME less its NUL: llama.cpp refuses longer tensor names
MAX_KEPT = 4096  # bytes of a kept string value
MAX_SHOWN = 64 * 1024, 1024 * 1024  # `metadata`: bytes of a string value, and of all of them
# Per file. A real header takes well under a second here (Gemma 3 270M's, with its 262,144
# tokens: 0.03-0.14 s), but over 5 s on Debian 13 under qemu's emulation on a busy host (the
# VM tier, tests/vm/). Going over it is a refusal for this scan only (TooSlow).
CPU_SECONDS = 30.0
_WINDOW, _CHECK_EVERY = 1 << 20, 4096  # bytes read at a time; items between CPU checks

# GGUF value types (the file format's own numbering) and how a scalar of each is stored.
UINT32, INT32, BOOL, STRING, ARRAY = 4, 5, 7, 8, 9
_SCALARS = {0: struct.Struct("<B"), 1: struct.Struct("<b"), 2: struct.Struct("<H"),
            3: struct.Struct("<h"), 4: struct.Struct("<I"), 5: struct.Struct("<i"),
            6: struct.Struct("<f"), 7: struct.Struct("<?"), 10: struct.Struct("<Q"),
            11: struct.Struct("<q"), 12: struct.Struct("<d")}
_TYPE_NAMES = dict(enumerate(("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32",
                               "BOOL", "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64")))
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_HEAD = struct.Struct("<4sIQQ")


class TooSlow(GGUFError):
    """Reading the header took more than CPU_SECONDS: on a busy or emulated machine a real
    file can, so this refusal is not remembered (InfoCache): the next scan reads it again."""


@dataclass(frozen=True)
class FileHeader:
    """What one file's header says; enough to build GGUFInfo without reading it again."""

    fields: dict[str, Scalar]
    parameters: int
    tensor_type: str | None  # the most common type of the weight matrices
    size: int
    file_type: str | None = None  # general.file_type by name, e.g. "Q4_K_M"
    tensors: TensorBytes = TensorBytes()  # noqa: RUF009 (a tuple: immutable)
    chat_template: bool = True
    kv_heads: tuple[int, ...] = ()  # per layer, where the header gives them as an array
    swa_pattern: tuple[int, ...] = ()  # per layer: 1 where it uses a sliding window
    heads: tuple[int, ...] = ()  # per layer, where the header gives them as an array
    ff_lengths: tuple[int, ...] = ()  # the same for the feed-forward width


@functools.cache
def _ggml() -> tuple[dict[int, tuple[str, int, int]], dict[int, str]]:
    """ggml's tensor types (number -> name, block size, bytes per block) and llama.cpp's
    file types by number, from the gguf package, imported on first use (it pulls in numpy:
    a daemon whose headers are all in the on-disk cache never needs it)."""
    from gguf.constants import GGML_QUANT_SIZES, LlamaFileType

    types = {int(t): (t.name, block, size) for t, (block, size) in GGML_QUANT_SIZES.items()}
    files = {int(f): f.name.removeprefix("MOSTLY_").removeprefix("ALL_") for f in LlamaFileType}
    return types, files


class _Source:
    """The file's bytes through one window, never past its size, within its CPU budget."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size, self.pos = fd, size, 0
        self.window, self.at, self.strings = b"", 0, 0
        self.deadline = time.thread_time() + CPU_SECONDS

    def need(self, n: int) -> None:
        if n > self.size - self.pos:
            raise GGUFError("truncated")

    def take(self, n: int) -> bytes:
        self.need(n)
        start = self.pos - self.at
        if start < 0 or start + n > len(self.window):
            self.window, self.at, start = os.pread(self.fd, max(n, _WINDOW), self.pos), \
                self.pos, 0
            if len(self.window) < n:
                raise GGUFError("truncated")  # the file shrank while being read
        self.pos += n
        return self.window[start:start + n]

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self.take(8))[0])

    def skip(self, n: int) -> None:
        self.need(n)
        self.pos += n

    def string_length(self, at_most: int | None = None) -> int:
        n = self.u64()
        self.need(n)
        if at_most is not None and n > at_most:
            raise GGUFError(f"holds a name of {n} bytes where at most {at_most} are allowed")
        return n

    def tick(self) -> None:
        if time.thread_time() > self.deadline:
            raise TooSlow(f"took more than {CPU_SECONDS:.0f} s of CPU to read its header "
                            "(a real one takes well under one)")

    def skip_strings(self, count: int) -> None:
        """Step over `count` strings, each a length and its bytes."""
        self.need(count * 8)
        self.strings += count
        if self.strings > MAX_STRINGS:
            raise GGUFError(f"holds more than {MAX_STRINGS} strings in arrays")
        unpack = _U64.unpack_from
        while count:
            self.take(8)  # the window now holds the next length at least
            window, off = self.window, self.pos - 8 - self.at
            end = len(window) - 8
            stop = max(count - _CHECK_EVERY * 16, 0)
            while count > stop and off <= end:
                off += 8 + unpack(window, off)[0]
                count -= 1
            self.pos = self.at + off
            if self.pos > self.size:
                raise GGUFError("truncated")
            self.tick()


def _value(src: _Source, kind: int, keep: int) -> Value | None:
    """One value of type `kind`, returned only when kept (`keep`: the longest string
    kept; 0 keeps nothing); arrays are stepped over, but for a kept array of up to
    MAX_LAYERS 32-bit whole numbers or bools."""
    if kind == STRING:
        n = src.string_length()
        if not keep or n > keep:
            src.skip(n)
            return None
        return src.take(n).decode("utf-8", "replace")
    if kind == ARRAY:
        item, count = src.u32(), src.u64()
        if keep and item in (UINT32, INT32) and count <= MAX_LAYERS:
            return struct.unpack(f"<{count}{'I' if item == UINT32 else 'i'}",
                                 src.take(4 * count))
        if keep and item == BOOL and count <= MAX_LAYERS:
            return tuple(1 if b else 0 for b in src.take(count))
        if item == STRING:
            src.skip_strings(count)
        elif item in _SCALARS:
            src.skip(count * _SCALARS[item].size)
        else:
            raise GGUFError(f"holds an array of {_TYPE_NAMES.get(item, f'type {item}')}, "
                            "which GGUF does not allow")
        return None
    if kind not in _SCALARS:
        raise GGUFError(f"holds a value of unknown type {kind}")
    value: Scalar = _SCALARS[kind].unpack(src.take(_SCALARS[kind].size))[0]
    return value if keep else None


Keep = Callable[[str, int], int]  # (key, type) -> the longest string value kept; 0: none


def _walk_keys(src: _Source, count: int, keep: Keep,
               longest: int) -> Iterator[tuple[str | None, int, Value | None]]:
    """(key, type, value) of each key-value pair; the key None where longer than `longest`,
    the value None unless `keep` says so."""
    for i in range(count):
        n = src.string_length()
        name = src.take(n).decode("utf-8", "replace") if n <= longest else None
        if name is None:
            src.skip(n)
        kind = src.u32()
        value = _value(src, kind, keep(name, kind) if name is not None else 0)
        if i % _CHECK_EVERY == 0:
            src.tick()
        yield name, kind, value


_ARCH_SUFFIXES = tuple("." + key for key in (*KEPT_ARCH_KEYS, *LAYER_ARRAYS.values()))
_ARRAY_SUFFIXES = tuple("." + key for key in LAYER_ARRAYS.values())


def _keys(src: _Source, count: int) -> tuple[dict[str, tuple[int, Value]], bool]:
    """The kept keys' (type, value): KEPT_KEYS, and those that may be the architecture's;
    and whether the header holds a chat template."""
    kept: dict[str, tuple[int, Value]] = {}
    template = False

    def keep(name: str, kind: int) -> int:
        wanted = name in KEPT_KEYS or name == "general.alignment" or (
            name.endswith(_ARCH_SUFFIXES) and len(kept) < 256)
        if kind == ARRAY:  # one of each at most: a header cannot make the reader keep more
            suffix = next((s for s in _ARRAY_SUFFIXES if name.endswith(s)), None)
            wanted = wanted and suffix is not None and not any(
                isinstance(value, tuple) and key.endswith(suffix)
                for key, (_, value) in kept.items())
        return MAX_KEPT if wanted else 0
    for name, kind, value in _walk_keys(src, count, keep, max(map(len, KEPT_KEYS)) + 64):
        template = template or name == TEMPLATE_KEY
        if value is not None and name is not None:
            if name in kept:
                raise GGUFError(f"holds the key {name} twice")
            kept[name] = (kind, value)
    return kept, template


def _typed(kept: dict[str, tuple[int, Value]], key: str, want: int) -> Scalar | None:
    """A kept key's value, if it has the type llama.cpp reads it as; GGUFError if not."""
    if key not in kept:
        return None
    kind, value = kept[key]
    if kind != want or isinstance(value, tuple):
        raise GGUFError(f"has {key} of type {_TYPE_NAMES.get(kind, kind)}, where llama.cpp "
                        f"reads a {_TYPE_NAMES[want]}")
    return value


def _fields(kept: dict[str, tuple[int, Value]]) -> tuple[dict[str, Scalar],
                                                         dict[str, tuple[int, ...]]]:
    """The kept scalars by key, and the per-layer arrays by FileHeader field."""
    arch = _typed(kept, "general.architecture", STRING)
    out: dict[str, Scalar] = {} if arch is None else {"general.architecture": arch}
    wanted = [("general.file_type", UINT32), *((key, BOOL) for key in CLIP_BOOLS),
              *((key, STRING) for key in CLIP_TYPES), *((key, UINT32) for key in CLIP_KEYS)]
    wanted += [(f"{arch}.{key}", UINT32) for key in KEPT_ARCH_KEYS] if arch else []
    # A negative count (an INT32 array) would shrink the estimate: such an array is left out.
    arrays = {field: array for field, key in LAYER_ARRAYS.items()
              if isinstance(array := kept.get(f"{arch}.{key}", (0, None))[1], tuple)
              and min(array, default=0) >= 0}
    for key, kind in wanted:
        found = kept.get(key, (kind, None))
        if isinstance(found[1], tuple) or (key in CLIP_SOME and found[0] != kind):
            continue
        value = _typed(kept, key, kind)
        if value is not None:
            out[key] = value
    return out, arrays


class _Tally:
    """What the tensor infos add up to, kept as sums (never a list of tensors)."""

    def __init__(self) -> None:
        self.parameters, self.end = 0, 0  # end: relative to the data section
        self.types: Counter[str] = Counter()


def _tensors(src: _Source, count: int, tally: _Tally) -> Iterator[Tensor]:
    """Each tensor info, tallied as they pass."""
    types, _ = _ggml()
    for i in range(count):
        name = src.take(src.string_length(MAX_NAME)).decode("utf-8", "replace")
        dims = src.u32()
        if dims > MAX_DIMS:
            raise GGUFError(f"has a tensor of {dims} dimensions; GGUF allows {MAX_DIMS}")
        shape = struct.unpack(f"<{dims}q", src.take(8 * dims))
        kind, offset = src.u32(), src.u64()
        if any(d < 0 for d in shape) or kind not in types:
            raise GGUFError(f"has a tensor with a bad shape or unknown type {kind}")
        type_name, block, size = types[kind]
        elements = math.prod(shape)
        if elements >= 2**63 or (shape and shape[0] % block):
            raise GGUFError(f"has a tensor whose shape does not fit its type {type_name}")
        nbytes = elements // block * size
        tally.parameters += elements
        tally.end = max(tally.end, offset + nbytes)
        if dims >= 2:
            tally.types[type_name] += 1
        if i % _CHECK_EVERY == 0:
            src.tick()
        yield Tensor(name, nbytes, shape, type_name)


def _counts(src: _Source) -> tuple[int, int]:
    """The header's tensor and key counts, checked against the file and llamad's bounds."""
    _, version, n_tensors, n_keys = _HEAD.unpack(src.take(_HEAD.size))
    if version & 0xFFFF == 0:
        raise GGUFError("is a GGUF file of the other byte order (big-endian), which "
                        "llama.cpp cannot load here")
    if version not in (2, 3):
        raise GGUFError(f"is a GGUF file of version {version}; llama.cpp reads versions 2 and 3")
    if n_tensors > MAX_TENSORS or n_keys > MAX_KEYS:
        raise GGUFError(f"claims {n_tensors} tensors and {n_keys} keys; llamad reads at most "
                        f"{MAX_TENSORS} and {MAX_KEYS}")
    src.need(n_tensors * 24 + n_keys * 13)  # the least each takes: else it is cut short
    return n_tensors, n_keys


def parse(fd: int, size: int) -> FileHeader:
    """The header of the open GGUF file `fd` of `size` bytes; GGUFError if it is not a
    complete one (the caller has checked the magic)."""
    src = _Source(fd, size)
    n_tensors, n_keys = _counts(src)
    kept, template = _keys(src, n_keys)
    fields, arrays = _fields(kept)
    alignment = _typed(kept, "general.alignment", UINT32)
    alignment = 32 if alignment is None else int(alignment)
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"has general.alignment {alignment}, not a power of two")
    tally = _Tally()
    table = TensorBytes.of(_tensors(src, n_tensors, tally))
    data = src.pos + (-src.pos % alignment if n_tensors else 0)
    if data + tally.end > size:
        raise GGUFError(f"is incomplete: its tensors need {data + tally.end} bytes but it has "
                        f"{size}")
    file_type = fields.get("general.file_type")
    return FileHeader(
        fields=fields, parameters=tally.parameters,
        tensor_type=tally.types.most_common(1)[0][0] if tally.types else None, size=size,
        file_type=_ggml()[1].get(file_type) if type(file_type) is int else None, tensors=table,
        chat_template=template, **arrays)


def metadata(fd: int, size: int) -> dict[str, Scalar | None]:
    """Every key of the open GGUF file's header: its value, or None for an array, for a
    string past MAX_SHOWN[0] bytes, and for every value once MAX_SHOWN[1] bytes are kept.
    Walks the whole header: call it on a worker thread. Raises GGUFError."""
    src = _Source(fd, size)
    _, n_keys = _counts(src)
    left = MAX_SHOWN[1]

    def keep(name: str, kind: int) -> int:
        return min(MAX_SHOWN[0], left) if kind != ARRAY and left > 0 else 0
    out: dict[str, Scalar | None] = {}
    for name, _, value in _walk_keys(src, n_keys, keep, 1024):
        if name is not None and left > 0:
            out[name] = None if isinstance(value, tuple) else value
            left -= len(name) + (len(value) if isinstance(value, str) else 8)
    return out
