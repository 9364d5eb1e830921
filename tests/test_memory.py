"""Memory estimates from GGUF metadata and llama-server arguments, and the learned store."""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import logging
import re
import struct
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import rig
from gguf import GGUFReader, GGUFValueType
from helpers import ggufgen, llamaserver
from helpers.h100 import H100, H100_ANON, H100_RAM, gemma_info

from llamad.catalog import gguf_info
from llamad.memory import layers
from llamad.memory.estimate import (
    CUDA_FIXED,
    ServerArgs,
    checkpoints,
    estimate,
    memory_limit,
    need,
    parse_args,
)
from llamad.memory.learned import Learned, LearnedStore
from llamad.memory.serverargs import ALL_LAYERS
from llamad.memory.types import Memory

MIB = 1024**2
GIB = 1024**3


@dataclass(frozen=True)
class Meta:
    architecture: str | None = "llama"
    block_count: int | None = 32
    context_length: int | None = 8192
    head_count: int | None = 32
    head_count_kv: int | None = 8
    embedding_length: int | None = 4096
    key_length: int | None = None
    value_length: int | None = None
    size: int = 4_920_000_000
    sliding_window: int | None = None
    feed_forward_length: int | None = None
    full_attention_interval: int | None = None
    ssm_conv_kernel: int | None = None
    ssm_inner_size: int | None = None
    ssm_state_size: int | None = None
    ssm_group_count: int | None = None
    kda_head_dim: int | None = None
    kv_heads: tuple[int, ...] | None = None
    sliding_window_pattern: int | None = None
    swa_pattern: tuple[int, ...] | None = None


LLAMA3_8B = Meta()  # the shape of Llama 3 8B (Q4_K_M file size)


def test_parse_args(subtests) -> None:  # type: ignore[no-untyped-def]
    table = [
        ("defaults", [], ServerArgs()),
        ("layers", ["-ngl", "20"], ServerArgs(gpu_layers=20)),
        ("layers auto", ["--gpu-layers", "auto"], ServerArgs()),
        ("layers all", ["--n-gpu-layers", "all"], ServerArgs()),
        ("layers -1 is auto", ["-ngl", "-1"], ServerArgs()),
        ("no offload", ["-ngl", "0"], ServerArgs(gpu_layers=0)),
        ("context", ["-c", "4096"], ServerArgs(ctx_size=4096)),
        ("context 0 is the model's", ["--ctx-size", "0"], ServerArgs()),
        ("underscores, as in llama.cpp", ["--ctx_size", "4096"], ServerArgs(ctx_size=4096)),
        ("cache types", ["-ctk", "q8_0", "--cache-type-v", "Q4_0"],
         ServerArgs(cache_type_k="q8_0", cache_type_v="q4_0")),
        ("slots", ["-np", "2"], ServerArgs(parallel=2)),
        ("slots auto", ["--parallel", "-1"], ServerArgs()),
        ("unified on", ["-kvu"], ServerArgs(kv_unified=True)),
        ("unified off", ["--no-kv-unified"], ServerArgs(kv_unified=False)),
        ("kv on host", ["-nkvo"], ServerArgs(kv_offload=False)),
        ("per-slot context, ubatch, full SWA",
         ["--kv-unified-per-slot", "2048", "-ub", "256", "--swa-full"],
         ServerArgs(kv_per_slot=2048, ubatch=256, swa_full=True)),
        ("later flag wins", ["-c", "1024", "--ctx-size", "2048"], ServerArgs(ctx_size=2048)),
        ("other flags and values ignored", ["--jinja", "-t", "4", "--alias", "-c"],
         ServerArgs()),
        ("bad number falls back to the default", ["-c", "lots"], ServerArgs()),
        ("batch, flash attention, load mode", ["-b", "256", "-fa", "off", "-lm", "none"],
         ServerArgs(batch=256, flash_attn="off", load_mode="none")),
        ("flash attention on", ["--flash-attn", "on"], ServerArgs(flash_attn="on")),
        ("experts on the host", ["-ncmoe", "10"], ServerArgs(n_cpu_moe=10)),
        ("all experts on the host", ["--cpu-moe"], ServerArgs(n_cpu_moe=ALL_LAYERS)),
        ("tensor overrides add up", ["-ot", r"blk\.1\.ffn.*=CPU,attn=CUDA0", "-ot", "x=CPU"],
         ServerArgs(overrides=((r"blk\.1\.ffn.*", "CPU"), ("attn", "CUDA0"), ("x", "CPU")))),
        ("split mode and shares", ["-sm", "none", "-ts", "3,1"],
         ServerArgs(split_mode="none", tensor_split=(3.0, 1.0))),
        ("projector on the host", ["--mmproj", "p.gguf", "--no-mmproj-offload"],
         ServerArgs(mmproj=True, mmproj_offload=False)),
        ("draft model and its own settings",
         ["-md", "d.gguf", "-ngld", "5", "-ctkd", "q8_0", "-ncmoed", "2", "-otd", "e=CPU"],
         ServerArgs(draft=True, draft_gpu_layers=5, draft_cache_type_k="q8_0",
                    draft_n_cpu_moe=2, draft_overrides=(("e", "CPU"),))),
        # llama-server takes no `--flag=value` (an invalid argument), so neither does llamad
        ("no = form", ["--flash-attn=on", "-c=16"], ServerArgs()),
        ("speculative types add up", ["--spec-type", "ngram-simple", "--spec-type", "a,b"],
         ServerArgs(spec_types=("ngram-simple", "a", "b"))),
    ]
    for name, args, want in table:
        with subtests.test(name):
            assert parse_args(args) == want
    # MTP drafts load a model's NextN layers: named, or maybe inferred from a draft model.
    assert parse_args(["--spec-type", "ngram-simple,draft-mtp"]).mtp
    assert parse_args(["-md", "d.gguf"]).mtp
    assert not parse_args(["-md", "d.gguf", "--spec-type", "draft-simple"]).mtp
    assert not parse_args([]).mtp


def kv_formula(m: Meta, n_ctx: int, bytes_per: float) -> int:
    """The textbook KV size: K and V, per layer, per cell, per KV head, per head dimension."""
    assert m.block_count and m.head_count and m.head_count_kv and m.embedding_length
    head_dim = m.embedding_length // m.head_count
    return int(2 * m.block_count * n_ctx * m.head_count_kv * head_dim * bytes_per)


def test_kv_cache_matches_the_formula(subtests) -> None:  # type: ignore[no-untyped-def]
    table = [
        ("f16, trained context", [], 8192, 2.0),
        ("f16, -c 4096", ["-c", "4096"], 4096, 2.0),
        ("q8_0", ["-ctk", "q8_0", "-ctv", "q8_0"], 8192, 34 / 32),
        ("q4_0", ["-ctk", "q4_0", "-ctv", "q4_0"], 8192, 18 / 32),
        ("4 separate slots share the context", ["-np", "4", "-c", "8192"], 8192, 2.0),
        ("context padded to 256", ["-c", "1000"], 1024, 2.0),
        ("per-slot context sizes the pool", ["--kv-unified-per-slot", "1024"], 4096, 2.0),
    ]
    for name, args, n_ctx, bytes_per in table:
        with subtests.test(name):
            est = estimate(LLAMA3_8B, args, gpu=True)
            assert est.ctx == n_ctx
            assert est.kv.ram + est.kv.vram == kv_formula(LLAMA3_8B, n_ctx, bytes_per)
    # llama.cpp reports 1024 MiB of f16 KV cache for Llama 3 8B at 8192 tokens.
    assert estimate(LLAMA3_8B, [], gpu=True).kv == Memory(0, 1024 * MIB)


def test_offload_splits_weights_and_kv(subtests) -> None:  # type: ignore[no-untyped-def]
    """Without a tensor table, weights split by layer count (the output layer counts as one);
    KV follows the repeating layers: -ngl N puts the last N - 1 of them and the output on
    the GPU, as llama.cpp does. The file's pages are host RAM either way (mapped)."""
    size = LLAMA3_8B.size
    kv = estimate(LLAMA3_8B, [], gpu=True).kv.vram
    table = [
        ("all layers on the GPU", [], Memory(size, size), Memory(0, kv)),
        ("no offload", ["-ngl", "0"], Memory(size, 0), Memory(kv, 0)),
        ("16: 15 repeating layers and the output", ["-ngl", "16"],
         Memory(size, size * 16 // 33), Memory(kv - kv * 15 // 32, kv * 15 // 32)),
        ("KV kept on the host", ["-nkvo"], Memory(size, size), Memory(kv, 0)),
        ("more layers than the model has", ["-ngl", "99"], Memory(size, size), Memory(0, kv)),
        ("read, not mapped: host layers in anonymous memory too", ["-ngl", "16", "-lm", "none"],
         Memory(size + size - size * 16 // 33, size * 16 // 33),
         Memory(kv - kv * 15 // 32, kv * 15 // 32)),
    ]
    for name, args, weights, kv_want in table:
        with subtests.test(name):
            est = estimate(LLAMA3_8B, args, gpu=True)
            assert (est.weights, est.kv) == (weights, kv_want)
            assert est.total.ram == sum(p.ram for p in (est.weights, est.kv, est.compute,
                                                         est.overhead))
    full, cpu = estimate(LLAMA3_8B, [], gpu=True), estimate(LLAMA3_8B, ["-ngl", "0"], gpu=True)
    assert full.overhead.vram == CUDA_FIXED and full.compute.vram > 0
    assert cpu.overhead.vram == 0 and cpu.compute.vram == 0 and cpu.total.vram == 0
    assert estimate(LLAMA3_8B, [], gpu=True, cuda_fixed=100, n_gpus=2).overhead.vram == 200


def test_sliding_window_layers_hold_only_the_window() -> None:
    gemma_like = Meta(architecture="gemma3", block_count=18, head_count=4, head_count_kv=1,
                      embedding_length=640, key_length=256, value_length=256,
                      context_length=32768, sliding_window=512, size=253 * MIB)
    per_cell = 1 * (256 + 256) * 2
    # Layers 5, 11 and 17 attend to everything; the other 15 to a window of 512 tokens
    # for each of the 4 default slots, plus one ubatch.
    want = 3 * 32768 * per_cell + 15 * (512 * 4 + 512) * per_cell
    est = estimate(gemma_like, [], gpu=True)
    assert est.kv.ram + est.kv.vram == want
    swa_full = estimate(gemma_like, ["--swa-full"], gpu=True)
    assert swa_full.kv.ram + swa_full.kv.vram == 18 * 32768 * per_cell


def test_missing_metadata_still_counts_the_weights() -> None:
    bare = Meta(architecture=None, block_count=None, context_length=None, head_count=None,
                head_count_kv=None, embedding_length=None, size=3 * GIB)
    est = estimate(bare, [], gpu=True)
    assert est.weights == Memory(3 * GIB, 3 * GIB) and est.kv == Memory()
    assert est.total.vram > 3 * GIB
    assert estimate(bare, ["-ngl", "0"], gpu=True).total.vram == 0


def test_learned_store_keeps_peaks_and_persists(tmp_path: Path) -> None:
    store = LearnedStore(tmp_path)
    args = ["-c", "4096"]
    assert store.get("m", args) is None
    store.record("m", args, ram=500 * MIB, load_seconds=3.5)
    store.record("m", args, ram=400 * MIB, vram=2 * GIB)  # lower RAM: the peak stays
    got = store.record("m", args, load_seconds=2.0)
    assert got == Learned(ram=500 * MIB, vram=2 * GIB, load_seconds=2.0)
    assert store.get("m", ["-c", "8192"]) is None  # other arguments, other figures
    assert LearnedStore(tmp_path).get("m", args) == got  # read back from disk
    assert [p.name for p in tmp_path.iterdir()] == ["learned.json"]  # no temp files left


def test_learned_store_in_memory_only() -> None:
    store = LearnedStore()
    store.record("m", [], ram=GIB)
    assert store.get("m", []) == Learned(ram=GIB)


def test_corrupt_store_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "learned.json").write_text("{not json")
    store = LearnedStore(tmp_path)
    assert store.get("m", []) is None
    assert "ignoring learned memory figures" in caplog.text
    store.record("m", [], ram=GIB)
    assert json.loads((tmp_path / "learned.json").read_text())["version"] == 1


def test_unwritable_store_keeps_working(tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = LearnedStore(blocker / "state")  # a directory below a file cannot exist
    with caplog.at_level(logging.WARNING):
        assert store.record("m", [], ram=GIB) == Learned(ram=GIB)
    assert "cannot save learned memory figures" in caplog.text
    assert store.get("m", []) == Learned(ram=GIB)


def test_need_prefers_learned_figures(subtests) -> None:  # type: ignore[no-untyped-def]
    est = estimate(LLAMA3_8B, [], gpu=True).total
    table = [
        ("nothing learned", None, est),
        ("learned RAM and VRAM", Learned(ram=GIB, vram=5 * GIB), Memory(GIB, 5 * GIB)),
        ("VRAM not attributable: estimate's VRAM", Learned(ram=GIB), Memory(GIB, est.vram)),
        ("load time alone is no memory figure", Learned(load_seconds=3.0), est),
    ]
    for name, learned, want in table:
        with subtests.test(name):
            assert need(LLAMA3_8B, [], learned, gpu=True) == want


def test_no_gpu_means_no_offload() -> None:
    cpu = estimate(LLAMA3_8B, [], gpu=False)
    hidden = estimate(LLAMA3_8B, ["-ngl", "0"], gpu=True)
    assert cpu.total.vram == hidden.total.vram == 0
    # A CUDA build on a GPU machine maps the CUDA libraries even with no layer offloaded.
    assert hidden.total.ram - cpu.total.ram == hidden.mapped - cpu.mapped > 0


def read_meta(path: Path) -> Meta:
    """The metadata through the gguf package's own reader, independent of llamad's."""
    reader = GGUFReader(path)

    def value(key: str) -> Any:
        # parts/data rather than contents(), which gguf 0.10 (the oldest supported) lacks.
        field = reader.fields.get(key)
        if field is None:
            return None
        part = field.parts[field.data[0]]
        if field.types[0] == GGUFValueType.STRING:
            return bytes(part).decode()
        return part[0].item()

    arch = value("general.architecture")
    return Meta(architecture=arch, block_count=value(f"{arch}.block_count"),
                context_length=value(f"{arch}.context_length"),
                head_count=value(f"{arch}.attention.head_count"),
                head_count_kv=value(f"{arch}.attention.head_count_kv"),
                embedding_length=value(f"{arch}.embedding_length"),
                key_length=value(f"{arch}.attention.key_length"),
                value_length=value(f"{arch}.attention.value_length"),
                sliding_window=value(f"{arch}.attention.sliding_window"),
                feed_forward_length=value(f"{arch}.feed_forward_length"),
                size=path.stat().st_size)


def logits(args: list[str], vocab: int) -> int:
    """The estimate's output buffer: one row of logits per slot."""
    return (parse_args(args).parallel or 4) * vocab * 4


def test_estimate_against_real_llama_server(subtests) -> None:  # type: ignore[no-untyped-def]
    meta = read_meta(rig.GEMMA)
    assert (meta.architecture, meta.block_count, meta.sliding_window) == ("gemma3", 18, 512)
    table = [
        ("defaults: trained context, 4 unified slots", []),
        ("8k context, 2 separate slots, q8_0 cache",
         ["-c", "8192", "-np", "2", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"]),
        ("no flash attention: the scores are materialised", ["-c", "4096", "-fa", "off"]),
        # The sliding-window layers' cache and mask as large as the full layers' (their
        # mask was left out: 16 MiB under llama-server's compute buffer).
        ("--swa-full", ["-c", "8192", "-fa", "off", "--swa-full"]),
    ]
    for name, args in table:
        with subtests.test(name):
            est = estimate(meta, args, gpu=False)
            real = llamaserver.measured(args)
            graph = est.compute.ram - logits(args, 262144)
            print(f"\n{name}: estimate {est.total.ram / MIB:.1f} MiB (KV {est.kv.ram / MIB:.1f},"
                  f" compute {graph / MIB:.2f}); llama-server KV"
                  f" {real.kv / MIB:.1f}, compute {real.compute / MIB:.2f},"
                  f" peak RSS {real.peak_rss / MIB:.1f} MiB")
            assert est.total.vram == 0
            assert abs(est.kv.ram - real.kv) < MIB / 100  # the log rounds to 0.01 MiB
            assert logits(args, 262144) == real.output
            assert real.compute <= graph <= real.compute * 1.1
            # An upper bound, but not a wasteful one.
            assert real.peak_rss <= est.total.ram <= 1.5 * real.peak_rss


def test_projector_compute_buffer(tmp_path: Path, subtests) -> None:  # type: ignore[no-untyped-def]
    """A vision projector's encoder graph against the buffer llama-server reserves for it,
    on generated projectors: Gemma 3's SigLIP (a fixed 896 px image, a plain feed-forward)
    and Qwen2.5-VL's (images of any size, reserved for 2116 merged tokens of 2 x 2 patches;
    a gated feed-forward; window attention, whose mask pairs every patch with every other).
    With flash attention, on by default where the backend has it (auto), no head's scores
    over all patches are kept: counted anyway, Gemma 3's projector looked 1.27 GiB against
    its 0.10. Qwen2.5-VL's was counted for the header's 560 px image: 45 MiB against 705."""
    gemma = gguf_info.read_header(rig.GEMMA)
    meta = gguf_info.combine([gemma], None)
    path = tmp_path / "mmproj.gguf"
    table: list[tuple[str, Callable[[], Path], float]] = [
        (f"siglip {e}/{f}/{h}, {image} px", functools.partial(
            ggufgen.write_gemma3_mmproj, path, text_embd=640, embd=e, ff=f, heads=h, blocks=2,
            image_size=image), 1.1)
        for e, f, h, image in ((1152, 4304, 16, 896), (768, 3072, 12, 448),
                               (1152, 2048, 16, 448), (1280, 5120, 16, 336))]
    table += [(f"qwen2.5-vl {e}/{f}/{h}, window every {wp}", functools.partial(
        ggufgen.write_qwen25vl_mmproj, path, text_embd=640, embd=e, ff=f, heads=h, blocks=4,
        window_pattern=wp), 1.25)
        for e, f, h, wp in ((1280, 3420, 16, 2), (1024, 6840, 16, 2), (1536, 1024, 16, 2),
                            (1280, 3420, 16, 0), (1536, 3420, 16, 0))]
    for name, write, slack in table:  # one file at a time: the largest are 0.2 GB
        info = gguf_info.combine([gemma], gguf_info.read_header(write()))
        for args in (["-c", "1024"], ["-c", "1024", "-fa", "off"], ["-c", "1024", "-fa", "on"]):
            with subtests.test(name, args=args):
                both = [*args, "--mmproj", str(path)]
                graph = estimate(info, both, gpu=False).compute.ram \
                    - estimate(meta, args, gpu=False).compute.ram
                real = llamaserver.measured(both)
                print(f"\n{name} {' '.join(args)}: projector graph {graph / MIB:.2f},"
                      f" llama-server {real.projector / MIB:.2f} MiB")
                assert real.projector <= graph <= real.projector * slack


def test_embeddings_output_every_token(subtests) -> None:  # type: ignore[no-untyped-def]
    """Served for embeddings (--embeddings, --reranking), llama-server outputs every token of
    a batch: its compute buffer holds a row of logits per token of the micro-batch, and its
    output buffer grows to as many rows at the first long input. Gemma 3 270M, 262144 tokens
    of vocabulary: 0.5 GiB each, which the estimate once left out (415 MiB planned, 1.27 GiB
    peak after one request)."""
    meta = read_meta(rig.GEMMA)
    for args in (["-c", "4096", "--embeddings", "--pooling", "mean"],
                 ["-c", "4096", "--reranking", "-fa", "off", "-np", "1"]):
        with subtests.test(" ".join(args)):
            est = estimate(meta, args, gpu=False)
            real = llamaserver.measured(args)
            # The output buffer grown: 512 rows of logits and an embedding (Gemma's 640).
            graph = est.compute.ram - 512 * (262144 + 640) * 4
            assert real.compute <= graph <= real.compute * 1.1, (graph / MIB, real.compute / MIB)
            assert abs(est.kv.ram - real.kv) < MIB / 100
    args = ["-c", "4096", "--embeddings", "--pooling", "mean"]
    est = estimate(meta, args, gpu=False)
    peak = embeddings_peak(args, ["hello " * 450] * 4)
    print(f"\nembeddings: estimate {est.total.ram / MIB:.1f} MiB, peak RSS {peak / MIB:.1f} MiB")
    assert peak <= est.total.ram <= 1.5 * peak


def embeddings_peak(args: list[str], inputs: list[str]) -> int:
    """llama-server's peak RSS after one /v1/embeddings request."""
    peak, answer = peak_after(args, "/v1/embeddings", {"input": inputs, "model": "m"})
    assert len(answer["data"]) == len(inputs)
    return peak


def peak_after(args: list[str], route: str, body: dict[str, Any]) -> tuple[int, Any]:
    """llama-server's peak RSS (Gemma 3 270M) after one request, and its answer."""
    with llamaserver.started("-t", "2", *args) as server:
        server.wait_ready()
        request = urllib.request.Request(f"{server.url}{route}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            assert r.status == 200
            answer = json.loads(r.read())
        return server.peak_rss(), answer


def png(width: int, height: int) -> bytes:
    """An RGB PNG of a colour gradient."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    rows = b"".join(b"\0" + bytes((x * 7 + y * 3) % 256 for x in range(width) for _ in "rgb")
                    for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_vision_model_peak_with_an_image(tmp_path: Path, subtests) -> None:  # type: ignore[no-untyped-def]
    """Gemma 3 with a SigLIP projector (448 px here; at 896 px, the real one's, 643 MiB
    against 664 estimated, and 1,657 against 1,707 without flash attention): llama-server's
    peak once it has encoded an image stays under the estimate, which stays near it."""
    path = ggufgen.write_gemma3_mmproj(tmp_path / "mmproj.gguf", text_embd=640, embd=1152,
                                       ff=4304, heads=16, blocks=2, image_size=448)
    info = gguf_info.combine([gguf_info.read_header(rig.GEMMA)], gguf_info.read_header(path))
    image = "data:image/png;base64," + base64.b64encode(png(64, 64)).decode()
    body = {"max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": image}}]}]}
    for args in (["-c", "4096", "--mmproj", str(path)],
                 ["-c", "4096", "--mmproj", str(path), "-fa", "off"]):
        with subtests.test(args=args[4:]):
            peak, answer = peak_after(args, "/v1/chat/completions", body)
            est = estimate(info, args, gpu=False).total.ram
            print(f"\n{args[4:]}: estimate {est / MIB:.1f}, peak with an image"
                  f" {peak / MIB:.1f} MiB")
            assert answer["usage"]["prompt_tokens"] > 64  # the image's 64 tokens were in it
            assert peak <= est <= 1.25 * peak


# Llama shapes whose compute buffer llama.cpp sizes differently (the graph allocator's
# reuse depends on the shape): embedding, feed-forward, heads, KV heads, head size.
SHAPES = [(1024, 4096, 16, 4, 64), (1024, 8192, 16, 4, 64), (2048, 4096, 16, 4, 128),
          (1024, 1024, 16, 4, 64), (512, 1536, 8, 2, 64)]


def test_compute_buffer_of_other_shapes(tmp_path: Path, subtests) -> None:  # type: ignore[no-untyped-def]
    """The compute-graph term against llama-server's own buffer for models of other shapes
    (two blocks: llama.cpp computes the last block for the output rows only)."""
    for embd, ff, heads, heads_kv, head_dim in SHAPES:
        name = f"embd {embd}, ff {ff}, {heads}/{heads_kv} heads of {head_dim}"
        with subtests.test(name):
            path = ggufgen.write_llama(tmp_path / "m.gguf", embd=embd, ff=ff, heads=heads,
                                       heads_kv=heads_kv, head_dim=head_dim, blocks=2)
            meta = Meta(block_count=2, context_length=32768, head_count=heads,
                        head_count_kv=heads_kv, embedding_length=embd, key_length=head_dim,
                        value_length=head_dim, feed_forward_length=ff,
                        size=path.stat().st_size)
            for args in (["-c", "1024"], ["-c", "4096", "-ub", "256", "-np", "1"]):
                real = llamaserver.measured(args, path)
                graph = estimate(meta, args, gpu=False).compute.ram - logits(args, 262144)
                print(f"\n{name} {' '.join(args)}: compute estimate {graph / MIB:.2f},"
                      f" llama-server {real.compute / MIB:.2f} MiB")
                assert real.compute <= graph <= real.compute * 1.35
            path.unlink()


def test_compute_buffer_of_mixtures_of_experts(tmp_path: Path, subtests) -> None:  # type: ignore[no-untyped-def]
    """Mixture-of-experts models: llama.cpp's graph holds the chosen experts' activations,
    used x expert width a token, and their outputs before they are summed, used x embedding,
    which need room of their own where the embedding is over twice an expert's width (most
    fine-grained MoEs: Qwen3-30B-A3B 2048 against 768). Counted as one dense layer's width,
    Mixtral's graph looked a third of its size; without the outputs, Qwen3-MoE's looked
    half (12 against 20 MiB below). A shared expert (Qwen2-MoE's) runs once the chosen
    ones are summed: where it is the wider stage, its width sets the graph's (18 against 12
    MiB below, without it). The compute term against llama-server's own buffer."""
    shapes = [("qwen3moe", 8, 2, 512, 0), ("qwen3moe", 16, 4, 256, 0),
              ("qwen3moe", 64, 8, 128, 0), ("qwen3moe", 64, 8, 32, 0),
              ("qwen3moe", 64, 16, 64, 0), ("llama", 8, 2, 1024, 0),
              ("qwen2moe", 8, 2, 512, 2048), ("qwen2moe", 64, 8, 128, 4096),
              ("qwen2moe", 64, 8, 128, 1024)]
    for arch, experts, used, ff_exp, shared in shapes:
        name = f"{arch}: {experts} experts of {ff_exp}, {used} used, shared {shared}"
        with subtests.test(name):
            path = ggufgen.write_moe(tmp_path / "moe.gguf", embd=512, heads=8, heads_kv=2,
                                     head_dim=64, experts=experts, used=used,
                                     ff_exp=ff_exp, arch=arch, shared=shared)
            info = gguf_info.combine([gguf_info.read_header(path)], None)
            for args in (["-c", "1024"], ["-c", "4096", "-ub", "256", "-np", "1"]):
                real = llamaserver.measured(args, path)
                graph = estimate(info, args, gpu=False).compute.ram - logits(args, 1024)
                print(f"\n{name} {' '.join(args)}: compute estimate {graph / MIB:.2f},"
                      f" llama-server {real.compute / MIB:.2f} MiB")
                assert real.compute <= graph <= real.compute * 1.35
            path.unlink()


def test_multi_head_latent_attention_caches_no_values(tmp_path: Path, subtests) -> None:  # type: ignore[no-untyped-def]
    """DeepSeek 2's attention as llama.cpp's converter writes it now (key_length_mla in the
    header): the cache holds one compressed latent per token as K, and no V. Counted with a
    V of value_length, DeepSeek V3's KV looked 1.9 times its size (576 + 512 against 576
    per token and layer), so a long context fit in less of the GPU than it does. The same
    model in the older format, every head with its own K and V, is sized as before."""
    for mla in (True, False):
        with subtests.test(mla=mla):
            path = ggufgen.write_deepseek2(tmp_path / "ds2.gguf", embd=512, heads=8,
                                           kv_lora=128, rope=32, nope=32, v_head=64,
                                           ff=1024, mla=mla)
            info = gguf_info.combine([gguf_info.read_header(path)], None)
            assert info.key_length_mla == (64 if mla else None)
            for args in (["-c", "4096", "-np", "1"],
                         ["-c", "16384", "-np", "4", "-ctk", "q8_0", "-ctv", "q8_0"]):
                real = llamaserver.measured(args, path)
                est = estimate(info, args, gpu=False)
                graph = est.compute.ram - logits(args, 1024)
                print(f"\nMLA {mla} {' '.join(args)}: KV estimate {est.kv.ram / MIB:.2f}, "
                      f"llama-server {real.kv / MIB:.2f} MiB; compute estimate "
                      f"{graph / MIB:.2f}, llama-server {real.compute / MIB:.2f} MiB")
                assert abs(est.kv.ram - real.kv) < MIB / 100
                assert real.compute <= graph <= real.compute * 1.35
            path.unlink()


def test_gemma4_sliding_window_layers_and_shared_caches(tmp_path: Path, subtests) -> None:  # type: ignore[no-untyped-def]
    """Gemma 4 (llama.cpp's gemma4.cpp): the header lists its sliding-window layers one by
    one, gives them a head size and KV head count of their own, and its last layers reuse
    earlier layers' caches (`attention.shared_kv_layers`). Counted as full layers, each
    with a cache at the full layers' head size, its KV at -c 16384 -np 4 looked 6.2 times
    llama-server's (224 against 36 MiB). Gemma 3n's layers after the 20th share too."""
    path = ggufgen.write_gemma4(tmp_path / "gemma4.gguf", embd=512, ff=1024, heads=8,
                                swa=[True] * 5 + [False, True, False], kv_heads=(4, 2),
                                head_dims=(64, 128), window=512, shared_kv=2)
    info = gguf_info.combine([gguf_info.read_header(path)], None)
    assert (info.swa_pattern, info.kv_heads, info.shared_kv_layers, info.key_length_swa) == (
        (1, 1, 1, 1, 1, 0, 1, 0), (4, 4, 4, 4, 4, 2, 4, 2), 2, 64)
    kv_and_graph_match(subtests, info, path, (
        ["-c", "16384", "-np", "4"], ["-c", "32768", "-np", "1", "--swa-full"],
        ["-c", "8192", "-np", "2", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"]))
    gemma3n = Meta(architecture="gemma3n", block_count=30, head_count=8, head_count_kv=2)
    assert layers.kv_heads(gemma3n, 30) == [2] * 20 + [0] * 10


def test_llama4_chunked_attention_and_the_headers_patterns() -> None:
    """Llama 4 (llama4.cpp): three of every four layers attend within chunks of 8192 tokens,
    a size llama.cpp fixes whatever the header says (but 0: no chunks), where its header
    gives none. Scout's shape (48 layers, 8 KV heads of 128) at -c 131072 -np 1 holds 12 full
    layers and 36 of 8192 + 512 cells: counted as 48 full layers, 3.3 times that. Other
    architectures' headers may give their pattern's period (a number) or list the layers
    (bools), which llama.cpp reads only for the architectures that have a pattern."""
    scout = Meta(architecture="llama4", block_count=48, head_count=40, head_count_kv=8,
                 embedding_length=5120, key_length=128, value_length=128)
    args = ["-c", "131072", "-np", "1"]
    cell = 8 * (128 + 128) * 2  # bytes of one layer's cell: 8 heads, f16 K and V
    assert estimate(scout, args, gpu=False).kv.ram == (12 * 131072 + 36 * 8704) * cell
    no_chunks = dataclasses.replace(scout, sliding_window=0)
    assert estimate(no_chunks, args, gpu=False).kv.ram == 48 * 131072 * cell
    gemma = Meta(architecture="gemma3", block_count=12, sliding_window=512)
    assert layers.swa_layers(gemma) == {il for il in range(12) if il % 6 < 5}
    every4 = dataclasses.replace(gemma, sliding_window_pattern=4)
    assert layers.swa_layers(every4) == {il for il in range(12) if il % 4 < 3}
    listed = dataclasses.replace(gemma, swa_pattern=(1, 0) * 6)
    assert layers.swa_layers(listed) == {0, 2, 4, 6, 8, 10}
    granite = Meta(architecture="granite", block_count=4, sliding_window=512,
                   swa_pattern=(1, 1, 1, 0))  # llama.cpp's granite reads no pattern
    assert layers.swa_layers(granite) == frozenset()


def test_sliding_window_layers_of_other_architectures(tmp_path: Path) -> None:
    """OLMo 2 with a sliding window (llama.cpp: three layers of every four, as for several
    architectures besides Gemma's): its KV cache as llama-server sizes it, not four full
    layers' worth, which made an explicit long context look four times its size."""
    path = ggufgen.write_llama(tmp_path / "olmo2.gguf", arch="olmo2", embd=512, ff=1024,
                               heads=8, heads_kv=2, head_dim=64, blocks=4, sliding_window=512)
    meta = Meta(architecture="olmo2", block_count=4, context_length=32768, head_count=8,
                head_count_kv=2, embedding_length=512, key_length=64, value_length=64,
                feed_forward_length=1024, sliding_window=512, size=path.stat().st_size)
    args = ["-c", "16384", "-np", "1"]
    real = llamaserver.measured(args, path)
    est = estimate(meta, args, gpu=False)
    assert abs(est.kv.ram - real.kv) < MIB / 100, (est.kv.ram / MIB, real.kv / MIB)


def test_hybrid_models_have_kv_only_on_their_attention_layers(  # type: ignore[no-untyped-def]
        tmp_path: Path, subtests) -> None:
    """A hybrid (LFM2: short-convolution layers where the header's per-layer KV head count
    is 0) has a KV cache on its attention layers only, and a small state per slot on the
    others. Counted as all attention at the model's head count, its KV looked 12 times
    llama-server's, so a long context looked 12 times its size."""
    path = ggufgen.write_lfm2(tmp_path / "lfm2.gguf", embd=512, ff=1024, heads=8,
                              kv_heads=[0, 0, 2, 0, 0, 2], head_dim=64)
    info = gguf_info.combine([gguf_info.read_header(path)], None)
    assert (info.architecture, info.kv_heads, info.shortconv_l_cache) == (
        "lfm2", (0, 0, 2, 0, 0, 2), 3)
    for args in (["-c", "16384", "-np", "4"], ["-c", "8192", "-np", "1", "-ctk", "q8_0"]):
        with subtests.test(args):
            real = llamaserver.measured(args, path)
            est = estimate(info, args, gpu=False)
            print(f"\n{' '.join(args)}: KV and state estimate {est.kv.ram / MIB:.2f}, "
                  f"llama-server {real.kv / MIB:.2f} MiB")
            assert abs(est.kv.ram - real.kv) < MIB / 100


def test_nextn_layers_are_neither_loaded_nor_cached(  # type: ignore[no-untyped-def]
        tmp_path: Path, subtests) -> None:
    """GLM-4.5's last block is a NextN (multi-token prediction) layer: llama-server skips its
    weights and gives it no KV cache unless MTP drafts are on (--spec-type draft-mtp, which
    also makes a draft context whose cache holds that layer alone). -ngl counts it still.
    Counted as a layer like the others, the generated model's weights looked 83.36 MiB
    against llama-server's 55.57, its KV cache 6.00 MiB against 4.00."""
    path = ggufgen.write_glm4moe(tmp_path / "glm.gguf", embd=512, heads=8, heads_kv=2,
                                 head_dim=64, experts=16, used=4, ff_exp=512, trunk=2, nextn=1)
    info = gguf_info.combine([gguf_info.read_header(path)], None)
    assert (info.block_count, info.nextn_predict_layers) == (3, 1)
    for args in (["-c", "4096", "-np", "1"], ["-c", "8192", "-np", "2", "-fa", "off"],
                 ["-c", "4096", "-np", "1", "--spec-type", "draft-mtp"]):
        with subtests.test(args):
            args = [*args, "-lm", "none"]  # read, not mapped: the weights in a buffer
            real = llamaserver.measured(args, path)
            est = estimate(info, args, gpu=False)
            weights = est.weights.ram - est.mapped
            print(f"\n{' '.join(args)}: weights estimate {weights / MIB:.2f}, llama-server "
                  f"{real.model / MIB:.2f} MiB; KV {est.kv.ram / MIB:.2f}, "
                  f"{real.kv / MIB:.2f} MiB")
            assert abs(weights - real.model) < MIB / 100
            assert abs(est.kv.ram - real.kv) < MIB / 100
    # -ngl 2 offloads the output layer and the NextN layer, which holds no weights or cache.
    est = estimate(info, ["-ngl", "2", "-c", "4096"], gpu=True)
    assert info.tensors is not None
    assert (est.weights.vram, est.kv.vram) == (info.tensors.output, 0)


def test_heads_and_widths_per_layer(tmp_path: Path, subtests) -> None:  # type: ignore[no-untyped-def]
    """Nemotron's deci gives heads, KV heads and feed-forward widths per layer: a layer
    without KV heads has no attention, or a linear stand-in for it. Read as no head count,
    its KV cache was left out (0 MiB against llama-server's 8.00 at -c 4096). Without flash
    attention V is stored transposed, and llama.cpp pads every layer's to the widest, those
    without KV heads too."""
    path = ggufgen.write_deci(tmp_path / "deci.gguf", embd=512, heads=(8, 16, 8, 0, 8),
                              kv_heads=(2, 4, 0, 0, 2), ff=(1024, 1536, 1024, 0, 1024),
                              head_dim=64)
    info = gguf_info.combine([gguf_info.read_header(path)], None)
    assert (info.head_count, info.feed_forward_length) == (8, 1536)
    kv_and_graph_match(subtests, info, path, (
        ["-c", "4096", "-np", "1"], ["-c", "8192", "-np", "2", "-fa", "off"],
        ["-c", "16384", "-np", "4", "-ctk", "q8_0", "-ctv", "q8_0"]))


def kv_and_graph_match(subtests: Any, info: gguf_info.GGUFInfo, path: Path,
                       arg_sets: tuple[list[str], ...]) -> None:
    """For each set of arguments: the KV estimate is llama-server's to the hundredth of a
    MiB, and the compute graph's at least llama-server's and at most 1.35 times it (the
    generated models' vocabulary is 1,024 tokens)."""
    for args in arg_sets:
        with subtests.test(args):
            real = llamaserver.measured(args, path)
            est = estimate(info, args, gpu=False)
            graph = est.compute.ram - logits(args, 1024)
            print(f"\n{' '.join(args)}: KV estimate {est.kv.ram / MIB:.2f}, llama-server "
                  f"{real.kv / MIB:.2f} MiB; compute estimate {graph / MIB:.2f}, "
                  f"llama-server {real.compute / MIB:.2f} MiB")
            assert abs(est.kv.ram - real.kv) < MIB / 100
            assert real.compute <= graph <= real.compute * 1.35


def test_context_checkpoints_stay_within_their_bound() -> None:
    """Gemma without --swa-full: llama-server copies its sliding-window layers' cache at each
    prompt (a context checkpoint), up to --ctx-checkpoints per slot. Each copy it logs is
    within llamad's bound per checkpoint, and no more copies are kept than the flag allows;
    MemoryMax under memory-limit = estimate makes room for the whole bound."""
    args = ["-c", "8192", "-np", "1", "--ctx-checkpoints", "3", "--cache-ram", "0"]
    bound = checkpoints(read_meta(rig.GEMMA), args)
    assert bound == 1 * 3 * 15 * 1024 * 1024  # 15 SWA layers x 1024 cells x 1 KiB
    with llamaserver.started("-t", "2", "-lv", "4", *args) as server:
        server.wait_ready()
        prompt = ""
        for turn in range(6):  # one conversation, growing by ~150 tokens a turn
            prompt += f" Turn {turn}: " + "the cat sat on the mat and looked around. " * 15
            body = json.dumps({"prompt": prompt, "n_predict": 1}).encode()
            req = urllib.request.Request(f"{server.url}/completion", body)
            with urllib.request.urlopen(req, timeout=120) as r:
                assert r.status == 200
    log_text = server.log
    made = re.findall(r"created context checkpoint (\d+) of (\d+) .*size = ([\d.]+) MiB",
                      log_text)
    assert len(made) >= 4, log_text[-3000:]  # more turns than it may keep
    assert max(int(n) for n, _, _ in made) == 3 and {int(m) for _, m, _ in made} == {3}
    biggest = max(float(size) for _, _, size in made) * MIB
    print(f"\ncheckpoints: largest {biggest / MIB:.2f} MiB, llamad's bound "
          f"{bound / 3 / MIB:.2f} MiB each")
    assert biggest <= bound / 3


def test_rwkv_keeps_a_state_on_every_layer_and_no_kv(  # type: ignore[no-untyped-def]
        tmp_path: Path, subtests) -> None:
    """RWKV (no attention): each layer keeps a token shift of 2 x embedding and a state of
    embedding x head size floats per slot, as llama-server sizes them. Without them llamad
    counted no memory for a context at all: RWKV-7 2.9B's 32 layers at -np 32 hold 660 MiB."""
    path = ggufgen.write_rwkv6(tmp_path / "rwkv6.gguf", embd=256, ff=512, blocks=3)
    info = gguf_info.combine([gguf_info.read_header(path)], None)
    assert (info.architecture, info.wkv_head_size, info.head_count) == ("rwkv6", 64, 0)
    for args in (["-c", "4096", "-np", "4"], ["-c", "65536", "-np", "1"]):
        with subtests.test(args):
            real = llamaserver.measured(args, path)
            est = estimate(info, args, gpu=False)
            print(f"\n{' '.join(args)}: state estimate {est.kv.ram / MIB:.3f}, "
                  f"llama-server {real.kv / MIB:.3f} MiB")
            assert real.kv > 0 and abs(est.kv.ram - real.kv) < MIB / 100


def test_other_linear_attention_states() -> None:
    """Kimi Linear 48B's shape (its recurrent layers have 0 KV heads): a state per slot of
    3 x (d_conv - 1) x heads x head_dim + head_dim² x heads floats; MiniMax-01's shape:
    attention every 8th layer, a head_dim² x heads state on the others (llama-hparams.cpp
    n_embd_r, n_embd_s; kimi-linear.cpp, minimax-01.cpp)."""
    kimi = Meta(architecture="kimi-linear", block_count=4, head_count=32, head_count_kv=None,
                embedding_length=2304, key_length=128, value_length=128, ssm_conv_kernel=4,
                kda_head_dim=128, kv_heads=(0, 0, 0, 0))
    per_slot = (3 * 3 * 32 * 128 + 128 * 128 * 32) * 4
    assert estimate(kimi, ["-np", "2"], gpu=False).kv.ram == 4 * 2 * per_slot
    mixed = dataclasses.replace(kimi, kv_heads=(0, 32, 0, 32))
    kv_only = dataclasses.replace(mixed, kda_head_dim=None)
    args = ["-c", "4096", "-np", "2"]
    assert estimate(kv_only, args, gpu=False).kv.ram > 0
    assert (estimate(mixed, args, gpu=False).kv.ram - estimate(kv_only, args, gpu=False).kv.ram
            == 2 * 2 * per_slot)
    minimax = Meta(architecture="minimax-01", block_count=16, head_count=64, head_count_kv=8,
                   embedding_length=6144, key_length=128, value_length=128)
    est = estimate(minimax, ["-c", "8192", "-np", "1"], gpu=False)
    assert est.kv.ram == 2 * 8192 * 8 * (128 + 128) * 2 + 14 * 128 * 128 * 64 * 4


def test_qwen3_next_keeps_kv_on_every_fourth_layer_and_a_state_on_the_others() -> None:
    """Qwen3-Next 80B A3B's shape (llama.cpp #17578's print_info): 48 layers, attention on
    every 4th (llama.cpp's qwen3next.cpp: recurrent unless (il + 1) % 4 == 0), 2 KV heads of
    256; the others a gated-delta-net state per slot of (d_conv - 1) x (d_inner + 2 x groups
    x d_state) + d_state x d_inner floats (llama-hparams.cpp n_embd_r, n_embd_s). Counted as
    48 attention layers, its KV at -c 65536 looked 4 times its size (6 GiB for 1.5)."""
    qwen = Meta(architecture="qwen3next", block_count=48, head_count=16, head_count_kv=2,
                embedding_length=2048, key_length=256, value_length=256,
                ssm_conv_kernel=4, ssm_inner_size=4096, ssm_state_size=128, ssm_group_count=16)
    est = estimate(qwen, ["-c", "65536", "-np", "4"], gpu=False)
    kv = 12 * 65536 * 2 * (256 + 256) * 2
    state = 36 * 4 * (3 * (4096 + 2 * 16 * 128) + 128 * 4096) * 4
    assert kv == 1536 * MIB and state == 36 * 4 * 2.09375 * MIB
    assert est.kv.ram == kv + state
    every_2nd = estimate(dataclasses.replace(qwen, full_attention_interval=2),
                         ["-c", "65536", "-np", "4"], gpu=False)
    assert every_2nd.kv.ram == 2 * kv + 24 * 4 * 2.09375 * MIB


def test_h100_estimate_is_a_close_upper_bound(subtests) -> None:  # type: ignore[no-untyped-def]
    """Before any load (the default fixed CUDA cost): at least what NVML measured, at most
    10 % more; weights and KV per device as llama.cpp placed them, the graph just above."""
    info = gemma_info()
    for args, nvml, weights, kv, compute in H100:
        with subtests.test(args):
            est = estimate(info, args.split(), gpu=True)
            assert nvml * MIB <= est.total.vram <= 1.1 * nvml * MIB
            assert abs(est.weights.vram - weights * MIB) <= 0.05 * MIB  # the log rounds
            assert abs(est.kv.vram - kv * MIB) <= 0.05 * MIB
            assert compute * MIB <= est.compute.vram <= (compute + 2) * MIB
    partial = estimate(info, ["-ngl", "10", "-c", "8192"], gpu=True)
    assert abs(partial.kv.ram - 28.0 * MIB) <= 0.05 * MIB  # the host's share of the KV cache
    # -ngl 0 runs with CUDA_VISIBLE_DEVICES= (empty), which keeps llama-server off the GPU.
    assert estimate(info, ["-ngl", "0", "-c", "8192"], gpu=True).total.vram == 0


def test_h100_ram_and_memory_max() -> None:
    """RAM with every layer offloaded: the model file's pages, the CUDA libraries and runtime.
    MemoryMax derived from it holds the page cache once and the anonymous memory with room,
    where the old estimate (69 MiB, limit 359.5 MiB) pinned the unit at its limit."""
    est = estimate(gemma_info(), ["-ngl", "99", "-c", "8192"], gpu=True)
    assert H100_RAM <= est.total.ram <= 1.1 * H100_RAM
    assert est.mapped >= H100_RAM - H100_ANON  # the page cache the cgroup was charged
    for learned_ram in (0, int(H100_RAM)):
        limit = memory_limit(est, learned_ram)
        assert limit - est.mapped >= 1.5 * H100_ANON
        assert limit >= 1.25 * H100_RAM
    assert memory_limit(est, 2 * est.total.ram) > memory_limit(est)  # a bigger learned peak
