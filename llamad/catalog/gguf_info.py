"""Header-only GGUF metadata through the gguf package, cached by (dev, inode, size, mtime)."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger("llamad.gguf")

Scalar = str | int | float | bool
StatKey = tuple[int, int, int, int]
CACHE_VERSION = 6


TEMPLATE_KEY = "tokenizer.chat_template"
# A projector's (mmproj) encoder shape, for the memory of its compute graph.
CLIP_FIELDS = ("image_size", "patch_size", "embedding_length", "feed_forward_length",
               "attention.head_count", "block_count")
CLIP_KEYS = tuple(f"clip.{kind}.{key}" for kind in ("vision", "audio") for key in CLIP_FIELDS)
KEPT_KEYS = frozenset(("general.architecture", "general.file_type",
                       "clip.has_vision_encoder", "clip.has_audio_encoder", *CLIP_KEYS))
# GGUFInfo's whole-number fields and the keys `<arch>.<key>` they come from.
ARCH_FIELDS = {
    "context_length": "context_length", "block_count": "block_count",
    "head_count": "attention.head_count", "head_count_kv": "attention.head_count_kv",
    "embedding_length": "embedding_length", "key_length": "attention.key_length",
    "value_length": "attention.value_length", "sliding_window": "attention.sliding_window",
    "feed_forward_length": "feed_forward_length", "expert_count": "expert_count",
    "expert_used_count": "expert_used_count",
    "expert_feed_forward_length": "expert_feed_forward_length",
}
KEPT_ARCH_KEYS = tuple(ARCH_FIELDS.values())
# Tensors llama.cpp keeps with the input layer, which always stays on the host.
INPUT_TENSORS = ("token_embd", "position_embd", "token_types", "per_layer_token_embd")
# A mixture-of-experts layer's expert weights, as llama.cpp's --cpu-moe pattern names them.
EXPERTS = re.compile(r"ffn_(up|down|gate_up|gate)_(ch|)exps")


class GGUFError(Exception):
    """The file is not a complete, readable GGUF file; the message says why."""


@dataclass(frozen=True)
class GGUFInfo:
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
    feed_forward_length: int | None = None
    expert_count: int | None = None
    expert_used_count: int | None = None
    expert_feed_forward_length: int | None = None
    tensors: TensorBytes | None = None  # where the weights' bytes sit, for offload estimates
    projector: Projector | None = None  # the paired mmproj file, when there is one
    # tokenizer.chat_template is in the header; without it llama-server falls back to ChatML
    # (presets.run_settings picks llama.cpp's built-in template for the architecture instead).
    chat_template: bool = True


class TensorBytes(NamedTuple):
    """The tensor table boiled down to what placement needs: bytes per repeating layer
    (`blk.N.*`), of the input layer (token embeddings, kept on the host), and of the output
    layer (everything else: output norm and head). Without an `output.weight` tensor the head
    is tied to the token embedding, which llama.cpp then also copies to the output's device.
    For tensor overrides (--cpu-moe, --n-cpu-moe, -ot): the expert weights per layer, and
    per tensor name within a layer (`ffn_up.weight`) its bytes over all layers and in how
    many layers it is."""

    layers: tuple[int, ...] = ()
    input: int = 0
    output: int = 0
    tied: bool = True
    vocab: int = 0  # token embedding rows
    experts: tuple[int, ...] = ()  # bytes of blk.N.ffn_*_exps per layer; () for dense models
    kinds: tuple[tuple[str, int, int], ...] = ()  # (name in the layer, bytes, layers)

    @classmethod
    def of(cls, tensors: Iterable[tuple[str, int, int]]) -> TensorBytes:
        """From (name, bytes, last dimension) per tensor."""
        layers: dict[int, int] = {}
        experts: dict[int, int] = {}
        kinds: dict[str, tuple[int, int]] = {}
        inp = out = vocab = 0
        tied = True
        for name, size, rows in tensors:
            block = _block(name)
            if block is not None:
                layers[block] = layers.get(block, 0) + size
                kind = name.split(".", 2)[2]
                total, count = kinds.get(kind, (0, 0))
                kinds[kind] = (total + size, count + 1)
                if EXPERTS.search(kind):
                    experts[block] = experts.get(block, 0) + size
            elif name.startswith(INPUT_TENSORS):
                inp += size
                vocab = rows if name == "token_embd.weight" else vocab
            else:
                out += size
                tied = tied and name != "output.weight"
        n = max(layers, default=-1) + 1
        return cls(tuple(layers.get(i, 0) for i in range(n)), inp, out, tied, vocab,
                   tuple(experts.get(i, 0) for i in range(n)) if experts else (),
                   tuple((k, t, c) for k, (t, c) in sorted(kinds.items())))

    def plus(self, other: TensorBytes) -> TensorBytes:
        """Two shards of one model together."""
        kinds = dict((k, (t, c)) for k, t, c in self.kinds)
        for k, t, c in other.kinds:
            total, count = kinds.get(k, (0, 0))
            kinds[k] = (total + t, count + c)
        return TensorBytes(_add(self.layers, other.layers), self.input + other.input,
                           self.output + other.output, self.tied and other.tied,
                           self.vocab or other.vocab, _add(self.experts, other.experts),
                           tuple((k, t, c) for k, (t, c) in sorted(kinds.items())))

    @classmethod
    def load(cls, value: list[Any]) -> TensorBytes:
        """From its JSON form in the header cache (lists for tuples)."""
        layers, inp, out, tied, vocab, experts, kinds = value
        return cls(tuple(layers), inp, out, tied, vocab, tuple(experts),
                   tuple((str(k), int(t), int(c)) for k, t, c in kinds))


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    n = max(len(a), len(b))
    return tuple(x + y for x, y in zip(a + (0,) * (n - len(a)), b + (0,) * (n - len(b)),
                                       strict=True))


class Projector(NamedTuple):
    """A multimodal projector (mmproj) file: its size and its encoder's shape, whose
    compute graph llama-server reserves for the largest image (or audio clip) at load."""

    size: int
    tokens: int  # patches of the largest image, or audio frames
    embedding: int
    feed_forward: int
    heads: int

    @classmethod
    def of(cls, head: FileHeader) -> Projector:
        f = head.fields

        def num(kind: str, key: str, default: int) -> int:
            value = f.get(f"clip.{kind}.{key}")
            return value if type(value) is int and value > 0 else default

        audio = "clip.audio.embedding_length" in f and "clip.vision.embedding_length" not in f
        kind = "audio" if audio else "vision"
        # Whisper-style audio encoders see 30 s as 1500 frames.
        tokens = (num(kind, "image_size", 896) // num(kind, "patch_size", 14)) ** 2 \
            if not audio else 1500
        embd = num(kind, "embedding_length", 1152)
        return cls(head.size, tokens, embd, num(kind, "feed_forward_length", 4 * embd),
                   num(kind, "attention.head_count", 16))


def _block(name: str) -> int | None:
    if not name.startswith("blk."):
        return None
    number = name[4:].partition(".")[0]
    return int(number) if number.isdigit() else None


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


@functools.cache
def _gguf() -> tuple[Any, Any]:
    """The gguf package and a reader class built on it, imported on first use.

    gguf pulls in numpy: 18 MB and 75 ms that a daemon whose headers are all
    in the on-disk cache never needs.
    """
    import gguf
    import numpy as np

    class HeaderReader(gguf.GGUFReader):
        """GGUFReader that steps over array values instead of unpacking every element.

        A tokenizer holds hundreds of thousands of strings; GGUFReader turns each into
        numpy views, which takes seconds for one model. Only scalar keys are needed here.
        """

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
            if raw_type != gguf.GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype, count = gguf.GGUFValueType(int(raw_itype[0])), int(alen[0])
            offs = orig_offs + 12
            if itype == gguf.GGUFValueType.STRING:
                order = ">" if self.byte_order == "S" else "<"
                buf = memoryview(self.data)  # type: ignore[arg-type]
                for _ in range(count):
                    offs += 8 + struct.unpack_from(order + "Q", buf, offs)[0]
            elif itype in self.gguf_scalar_to_np:
                offs += count * np.dtype(self.gguf_scalar_to_np[itype]).itemsize
            else:
                return super()._get_field_parts(orig_offs, raw_type)
            if offs > len(self.data):
                raise ValueError("array runs past the end of the file")
            return offs - orig_offs, [raw_itype, alen], [], [gguf.GGUFValueType.ARRAY, itype]

    return gguf, HeaderReader


def _scalar(gguf: Any, field: Any) -> Scalar | None:
    if not field.data or field.types[0] == gguf.GGUFValueType.ARRAY:
        return None
    part = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", "replace")
    value: Scalar = part[0].item()
    return bool(value) if field.types[0] == gguf.GGUFValueType.BOOL else value


def _file_type(gguf: Any, fields: dict[str, Scalar]) -> str | None:
    file_type = fields.get("general.file_type")
    if not isinstance(file_type, int):
        return None
    try:
        name: str = gguf.LlamaFileType(file_type).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _not_gguf(head: bytes) -> str | None:
    """Why a file is not a GGUF file at all, from its first bytes, naming what a new user
    most often has instead; None where it begins as one."""
    if head[:4] == b"GGUF":
        return None
    if not head:
        return "is empty"
    if head.startswith(b"version https://git-lfs"):
        return ("is a Git LFS pointer, not the model: its repository was cloned without "
                "git-lfs (`git lfs pull` fetches the file)")
    shown = "".join(chr(b) if 32 <= b < 127 else "." for b in head[:16])
    if head.lstrip()[:1] == b"<":
        return (f"is not a GGUF file but a web page ({shown!r}...): the download link leads "
                "to the model's page rather than to the file")
    return f"is not a GGUF file: it begins with {shown!r}, not 'GGUF'"


def _reader(path: Path) -> tuple[Any, Any, int]:
    """The gguf package, a reader of the file's header, and the file's size; GGUFError if
    it is not a complete GGUF file."""
    gguf, reader_class = _gguf()
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            why = _not_gguf(f.read(64))
        if why:
            raise GGUFError(why)
        return gguf, reader_class(path), size
    except OSError as e:
        raise GGUFError(f"cannot be read ({e.strerror or e})") from e
    except GGUFError:
        raise
    except Exception as e:  # the gguf package raises many types for bad input
        raise GGUFError(f"is a truncated or damaged GGUF file ({size} bytes; an interrupted "
                        "copy or download?)") from e


def read_header(path: Path) -> FileHeader:
    """Parse one file's header; raise GGUFError if it is not a complete GGUF file."""
    gguf, reader, size = _reader(path)
    arch = _scalar(gguf, reader.fields["general.architecture"]) \
        if "general.architecture" in reader.fields else None
    # Only the keys llamad reads: thousands of cached headers stay small.
    wanted = KEPT_KEYS | {f"{arch}.{key}" for key in KEPT_ARCH_KEYS}
    fields = {k: v for k, f in reader.fields.items()
              if k in wanted and (v := _scalar(gguf, f)) is not None}
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=reader.data_offset)
    if end > size:
        raise GGUFError(f"is incomplete: its tensors need {end} bytes but it has {size}")
    types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    params = sum(int(t.n_elements) for t in reader.tensors)
    tensor_type = types.most_common(1)[0][0] if types else None
    table = TensorBytes.of((t.name, int(t.n_bytes), int(t.shape[-1]) if len(t.shape) > 1 else 0)
                           for t in reader.tensors)
    return FileHeader(fields=fields, parameters=params, tensor_type=tensor_type, size=size,
                      file_type=_file_type(gguf, fields), tensors=table,
                      chat_template=TEMPLATE_KEY in reader.fields)


def metadata(path: Path) -> dict[str, Scalar | None]:
    """Every key of the file's header: its value, or None for an array (a tokenizer's
    vocabulary is not worth reading for this). The whole header is walked: call it on a
    worker thread. Raises GGUFError."""
    gguf, reader, _ = _reader(path)
    return {k: _scalar(gguf, f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


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
        **ints,
    )


@functools.cache
def _arch_keys(prefix: str) -> tuple[tuple[str, str], ...]:
    return tuple((name, prefix + key) for name, key in ARCH_FIELDS.items())


def _header(value: dict[str, Any]) -> FileHeader:
    tensors = TensorBytes.load(value.pop("tensors"))
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

    def header(self, path: Path, st: os.stat_result | None = None) -> FileHeader:
        st = st or path.stat()
        key, name = _stat_key(st), str(path)
        hit = self._entries.get(name)
        if hit is None or hit[0] != key:
            try:
                value: FileHeader | str = read_header(path)
            except GGUFError as e:
                value = str(e)
            hit = (key, value)
            self._entries[name] = hit
            self._dirty = True
        if isinstance(hit[1], str):
            raise GGUFError(hit[1])
        return hit[1]

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
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, separators=(",", ":")))
            tmp.replace(self.path)
            self._dirty = False
        except OSError as e:
            log.debug("cannot write the metadata cache %s: %s", self.path, e)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            if data.get("version") != CACHE_VERSION:
                return
            for name, (key, value) in data["entries"].items():
                header = value if isinstance(value, str) else _header(value)
                self._entries[name] = (tuple(key), header)
        except (OSError, ValueError, TypeError, KeyError) as e:
            # A missing or damaged cache only costs a slower scan.
            log.debug("ignoring the metadata cache %s: %s", path, e)
            self._entries.clear()
