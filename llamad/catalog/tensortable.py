"""A GGUF file's tensor table boiled down to a few sums (TensorBytes), as ggufheader.py reads
it: what placing the weights on devices, overriding them and repacking them needs.

GGUFError lives here, below ggufheader.py, so that the table can refuse a file too."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

MAX_LAYERS = 4096  # llama.cpp's own limit is 512 (LLAMA_MAX_LAYERS)
MAX_KINDS = 4096  # tensor names within a layer (ffn_up.weight ...): real files have tens
# A mixture-of-experts layer's expert weights, as llama.cpp's --cpu-moe pattern names them.
EXPERTS = re.compile(r"ffn_(up|down|gate_up|gate)_(ch|)exps")
# Tensors llama.cpp keeps with the input layer, which always stays on the host.
INPUT_TENSORS = ("token_embd", "position_embd", "token_types", "per_layer_token_embd")
# Types whose matrices llama.cpp's CPU backend copies into a buffer of its own, interleaved
# for its AVX2 kernels, where it holds them (ggml-cpu/repack.cpp, on x86 with AVX2: rows a
# multiple of 8, 2-D or 3-D experts; Q2_K needs a build with AVX-512, as the pinned one is not).
REPACKED = frozenset(("Q4_0", "Q4_K", "IQ4_NL", "MXFP4"))


class GGUFError(Exception):
    """The file is not a complete, readable GGUF file; the message says why."""


class Tensor(NamedTuple):
    """One tensor info of a header: its name, bytes, shape (ne, innermost first) and type."""

    name: str
    size: int
    shape: tuple[int, ...]
    type: str

    @property
    def repacked(self) -> bool:
        """llama.cpp repacks it where it multiplies it on an x86 CPU with AVX2."""
        return self.type in REPACKED and len(self.shape) in (2, 3) and self.shape[1] % 8 == 0


class TensorBytes(NamedTuple):
    """The tensor table boiled down to what placement needs: bytes per repeating layer
    (`blk.N.*`), of the input layer (token embeddings, kept on the host), and of the output
    layer (everything else: output norm and head). Without an `output.weight` tensor the head
    is tied to the token embedding, which llama.cpp then also copies to the output's device.
    For tensor overrides (--cpu-moe, --n-cpu-moe, -ot): the expert weights per layer, and
    per tensor name within a layer (`ffn_up.weight`) its bytes over all layers and in how
    many layers it is. Repacking (memory/repack.py): the bytes of the matrices llama.cpp
    copies on x86, of the repeating layers and of the head (a tied head: the token embedding,
    which it copies for the output layer; never for the input layer, which it only reads
    rows of). Sums, not per layer: 1,000s of models stay small in memory."""

    layers: tuple[int, ...] = ()
    input: int = 0
    output: int = 0
    tied: bool = True
    vocab: int = 0  # token embedding rows
    experts: tuple[int, ...] = ()  # bytes of blk.N.ffn_*_exps per layer; () for dense models
    kinds: tuple[tuple[str, int, int], ...] = ()  # (name in the layer, bytes, layers)
    repack: int = 0  # of the repeating layers
    repack_head: int = 0

    @classmethod
    def of(cls, tensors: Iterable[Tensor]) -> TensorBytes:
        layers: dict[int, int] = {}
        experts: dict[int, int] = {}
        kinds: dict[str, tuple[int, int]] = {}
        inp, out, vocab, tied, repack, head, embd = 0, 0, 0, True, 0, 0, 0
        for t in tensors:
            name, size, packed = t.name, t.size, t.size if t.repacked else 0
            block = _block(name)
            if block is not None:
                layers[block] = layers.get(block, 0) + size
                kind = name.split(".", 2)[2] if name.count(".") >= 2 else ""
                total, count = kinds.get(kind, (0, 0))
                kinds[kind] = (total + size, count + 1)
                if len(kinds) > MAX_KINDS:
                    raise GGUFError(f"names more than {MAX_KINDS} kinds of layer tensors")
                if EXPERTS.search(kind):
                    experts[block] = experts.get(block, 0) + size
                repack += packed
            elif name.startswith(INPUT_TENSORS):
                inp += size
                if name == "token_embd.weight":
                    vocab, embd = (t.shape[-1] if len(t.shape) > 1 else 0), packed
            else:
                out += size
                tied = tied and name != "output.weight"
                head += packed
        n = max(layers, default=-1) + 1
        return cls(tuple(layers.get(i, 0) for i in range(n)), inp, out, tied, vocab,
                   tuple(experts.get(i, 0) for i in range(n)) if experts else (),
                   tuple((k, t, c) for k, (t, c) in sorted(kinds.items())), repack,
                   head + (embd if tied else 0))

    def plus(self, other: TensorBytes) -> TensorBytes:
        """Two shards of one model together."""
        kinds = {k: (t, c) for k, t, c in self.kinds}
        for k, t, c in other.kinds:
            total, count = kinds.get(k, (0, 0))
            kinds[k] = (total + t, count + c)
        # A tied shard's head counts its token embedding: not the head where another shard
        # has output.weight.
        head = (self.repack_head + other.repack_head if self.tied == other.tied
                else other.repack_head if self.tied else self.repack_head)
        return TensorBytes(_add(self.layers, other.layers), self.input + other.input,
                           self.output + other.output, self.tied and other.tied,
                           self.vocab or other.vocab, _add(self.experts, other.experts),
                           tuple((k, t, c) for k, (t, c) in sorted(kinds.items())),
                           self.repack + other.repack, head)

    @classmethod
    def load(cls, value: list[Any]) -> TensorBytes:
        """From its JSON form in the header cache (lists for tuples)."""
        layers, inp, out, tied, vocab, experts, kinds, repack, head = value
        return cls(tuple(layers), inp, out, tied, vocab, tuple(experts),
                   tuple((str(k), int(t), int(c)) for k, t, c in kinds), int(repack), int(head))


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(map(sum, itertools.zip_longest(a, b, fillvalue=0)))


def _block(name: str) -> int | None:
    if not name.startswith("blk."):
        return None
    number = name[4:].partition(".")[0]
    if not number.isdigit():
        return None
    if len(number) > 6 or int(number) >= MAX_LAYERS:
        raise GGUFError(f"names a tensor of layer {number[:12]}; llamad reads at most "
                        f"{MAX_LAYERS} layers")
    return int(number)
