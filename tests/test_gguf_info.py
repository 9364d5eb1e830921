"""Header-only metadata from real GGUF files: the Gemma model and files written here."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
import rig
from helpers import ggufgen

from llamad.catalog.gguf_info import GGUFError, InfoCache, combine, read_header
from llamad.catalog.ggufheader import MAX_LAYERS


def test_gemma_metadata_is_read_quickly() -> None:
    assert rig.GEMMA.exists(), "run tools/setup-dev to assemble the Gemma model"
    start = time.perf_counter()
    head = read_header(rig.GEMMA)
    elapsed = time.perf_counter() - start
    info = combine([head], None)
    assert info.architecture == "gemma3" and info.quantization == "Q4_K_M"
    assert (info.context_length, info.block_count, info.embedding_length) == (32768, 18, 640)
    assert (info.head_count, info.head_count_kv, info.key_length) == (4, 1, 256)
    assert info.size == rig.GEMMA.stat().st_size
    assert 260_000_000 < (info.parameters or 0) < 280_000_000
    # The 262k-entry vocabulary is stepped over, not unpacked (GGUFReader alone: ~10 s).
    assert elapsed < 2.0


def test_written_model_and_split_set(tmp_path: Path) -> None:
    single = combine([read_header(ggufgen.write_model(tmp_path / "a.gguf", context=1234,
                                                      blocks=3))], None)
    assert (single.architecture, single.context_length, single.block_count) == ("llama", 1234, 3)
    assert single.parameters == 3 * 8 * 64 and single.quantization == "F32"
    shards = ggufgen.write_split(tmp_path / "s", "m", 3)
    heads = [read_header(p) for p in shards]
    info = combine(heads, read_header(ggufgen.write_mmproj(tmp_path / "s" / "mmproj.gguf")))
    assert info.size == sum(p.stat().st_size for p in shards)
    assert info.parameters == 3 * 2 * 8 * 64
    assert info.modalities == ("text", "image")


def test_modalities_follow_the_projector(tmp_path: Path) -> None:
    head = read_header(ggufgen.write_model(tmp_path / "m.gguf"))
    audio = read_header(ggufgen.write_mmproj(tmp_path / "a.gguf", vision=False, audio=True))
    both = read_header(ggufgen.write_mmproj(tmp_path / "b.gguf", vision=True, audio=True))
    assert combine([head], None).modalities == ("text",)
    assert combine([head], audio).modalities == ("text", "audio")
    assert combine([head], both).modalities == ("text", "image", "audio")


def test_projector_shape_from_its_header(tmp_path: Path, subtests) -> None:  # type: ignore[no-untyped-def]
    """The image a projector's graph is sized for: its fixed size in patches, or, for one
    that takes any size, llama-server's warmup in merged tokens times the merge squared (the
    header's, else the type's own); a SiLU feed-forward is gated; n_wa_pattern is window
    attention. llama.cpp reads some of these keys for some projector types only, so one of
    the wrong type makes no file unservable. The figures themselves are checked against
    llama-server in test_memory.py."""
    table: list[tuple[str, dict[str, int | str | bool], tuple[int, bool, bool]]] = [
        ("fixed size", {"clip.projector_type": "gemma3", "clip.vision.image_size": 896,
                        "clip.vision.patch_size": 14}, (4096, False, False)),
        ("qwen2.5-vl", {"clip.projector_type": "qwen2.5vl_merger", "clip.use_silu": True,
                        "clip.vision.image_size": 560, "clip.vision.n_wa_pattern": 8},
         (46 * 46 * 4, True, True)),
        ("pixtral, merged 2 x 2 by its header", {
            "clip.projector_type": "pixtral", "clip.vision.spatial_merge_size": 2,
            "clip.use_silu": True}, (1024, True, False)),
        ("gemma 4, its type's own merge", {"clip.projector_type": "gemma4v"}, (256 * 9, False,
                                                                               False)),
        ("a key only some projectors read, of the wrong type, is left out, not refused", {
            "clip.projector_type": "gemma3", "clip.vision.n_wa_pattern": "8",
            "clip.vision.spatial_merge_size": "2"}, (4096, False, False)),
        ("mixed modalities name the vision type apart", {
            "clip.projector_type": "qwen2.5o", "clip.vision.projector_type": "qwen2.5vl_merger",
            "clip.vision.projector.scale_factor": 3}, (46 * 46 * 9, False, False)),
    ]
    for name, extra, (tokens, gated, window) in table:
        with subtests.test(name):
            path = ggufgen.write_model(tmp_path / "p.gguf", arch="clip", file_type=None,
                                       extra={"clip.has_vision_encoder": True,
                                              "clip.vision.embedding_length": 1152, **extra})
            proj = combine([read_header(ggufgen.write_model(tmp_path / "m.gguf"))],
                           read_header(path)).projector
            assert proj is not None
            assert (proj.tokens, proj.gated, proj.window) == (tokens, gated, window)


def test_corrupt_and_truncated_files_are_errors(tmp_path: Path) -> None:
    full = ggufgen.write_model(tmp_path / "full.gguf")
    size = full.stat().st_size
    cases = {
        "empty": b"",
        "text": b"hello, not a model\n" * 10,
        "half header": full.read_bytes()[:60],
        "no tensor data": full.read_bytes()[:size // 2],
        "last byte missing": full.read_bytes()[:size - 1],
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        with pytest.raises(GGUFError):
            read_header(path)
    # What a new user most often has instead of a model, in words, never the file's bytes
    # (the file may be a link to one only root may read: docs/security.md).
    said = {
        b"": "is empty",
        b"hello, not a model\n": "is not a GGUF file: it does not begin with 'GGUF'",
        b"\n<!DOCTYPE html>\n<html>": "is not a GGUF file but a web page: the download link "
                                     "leads to the model's page rather than to the file",
        b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n":
            "is a Git LFS pointer, not the model: its repository was cloned without git-lfs "
            "(`git lfs pull` fetches the file)",
        full.read_bytes()[:60]: "is a truncated or damaged GGUF file (60 bytes; an "
                                "interrupted copy or download?)",
    }
    for data, sentence in said.items():
        path = tmp_path / "said.gguf"
        path.write_bytes(data)
        with pytest.raises(GGUFError) as e:
            read_header(path)
        assert str(e.value) == sentence


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="cannot be read"):
        read_header(tmp_path / "missing.gguf")


def test_cache_rereads_only_changed_files(tmp_path: Path) -> None:
    path = ggufgen.write_model(tmp_path / "m.gguf", context=100)
    cache = InfoCache()
    first = cache.header(path)
    assert cache.header(path) is first  # same stat key: no new read
    ggufgen.write_model(path, context=200)
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1_000_000))
    assert cache.header(path).fields["llama.context_length"] == 200
    cache.retain([])
    assert len(cache) == 0


def test_cache_remembers_bad_files_and_persists(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"junk" * 100)
    good = ggufgen.write_model(tmp_path / "good.gguf")
    store = tmp_path / "cache" / "info.json"
    cache = InfoCache(store)
    with pytest.raises(GGUFError):
        cache.header(bad)
    head = cache.header(good)
    cache.save()
    again = InfoCache(store)
    assert len(again) == 2 and again.header(good) == head
    with pytest.raises(GGUFError, match="not a GGUF file"):
        again.header(bad)
    store.write_text("{broken")
    assert len(InfoCache(store)) == 0


def test_tensor_table_per_layer(tmp_path: Path) -> None:
    """Bytes per layer, input and output, as llama.cpp assigns tensors to layers."""
    gemma = combine([read_header(rig.GEMMA)], None).tensors
    assert gemma is not None and len(gemma.layers) == 18
    assert gemma.tied and gemma.vocab == 262144  # no output.weight: the head is the embedding
    assert gemma.input == 170 * 1024**2  # token_embd, Q8_0
    # llama-server on the CPU logs "CPU_Mapped model buffer size = 235.16 MiB" for all of them.
    total = sum(gemma.layers) + gemma.input + gemma.output
    assert abs(total / 1024**2 - 235.16) < 0.01
    llama = combine([read_header(ggufgen.write_llama(
        tmp_path / "l.gguf", embd=64, ff=128, heads=4, heads_kv=2, head_dim=16, blocks=3,
        vocab=100))], None).tensors
    assert llama is not None and not llama.tied and llama.vocab == 100
    block = 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128) + 2 * 64 * 4  # F16 weights, F32 norms
    assert llama.layers == (block,) * 3
    assert (llama.input, llama.output) == (100 * 64 * 2, 100 * 64 * 2 + 64 * 4)
    shards = [read_header(p) for p in ggufgen.write_split(tmp_path / "s", "m", 2, blocks=2)]
    split = combine(shards, None).tensors
    assert split is not None and split.layers == (8 * 64 * 4,) * 4  # blk.0-1 and blk.2-3


def test_cached_tensor_table_survives_a_restart(tmp_path: Path) -> None:
    store = tmp_path / "info.json"
    cache = InfoCache(store)
    head = cache.header(rig.GEMMA)
    cache.save()
    assert InfoCache(store).header(rig.GEMMA) == head
    assert store.stat().st_size < 4000  # the table boiled down, not 236 tensors (~15 KB)


def test_a_header_too_slow_to_read_is_read_again_next_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy or emulated machine can take longer than the CPU budget over a real header
    (seen under qemu): that refusal holds for this scan only, never in the cache."""
    from llamad.catalog import ggufheader
    path = ggufgen.write_model(tmp_path / "m.gguf")
    cache = InfoCache(tmp_path / "cache.json")
    monkeypatch.setattr(ggufheader, "CPU_SECONDS", -1.0)  # every read is over budget
    with pytest.raises(GGUFError, match="of CPU to read its header"):
        cache.header(path)
    assert not cache.known(path, path.stat())
    monkeypatch.setattr(ggufheader, "CPU_SECONDS", 30.0)
    assert cache.header(path).parameters > 0 and cache.known(path, path.stat())


def test_per_layer_kv_heads_of_a_hybrid_model_survive_a_restart(tmp_path: Path) -> None:
    path = ggufgen.write_lfm2(tmp_path / "lfm2.gguf", embd=64, ff=128, heads=2,
                              kv_heads=[0, 2, 0, 1], head_dim=32)
    store = tmp_path / "info.json"
    cache = InfoCache(store)
    head = cache.header(path)
    assert head.kv_heads == (0, 2, 0, 1)
    cache.save()
    again = InfoCache(store).header(path)
    assert again == head and type(again.kv_heads) is tuple
    info = combine([again], None)
    assert (info.kv_heads, info.head_count_kv, info.shortconv_l_cache) == ((0, 2, 0, 1), None, 3)


def test_gemma4_layer_arrays_survive_a_restart(tmp_path: Path) -> None:
    """Both per-layer arrays are kept, each once: the KV heads and the sliding-window layers
    (bools)."""
    path = ggufgen.write_gemma4(tmp_path / "gemma4.gguf", embd=64, ff=128, heads=2,
                                swa=[True, True, False, True, False], kv_heads=(2, 1),
                                head_dims=(32, 64), window=128, shared_kv=2)
    store = tmp_path / "info.json"
    cache = InfoCache(store)
    head = cache.header(path)
    assert (head.kv_heads, head.swa_pattern) == ((2, 2, 1, 2, 1), (1, 1, 0, 1, 0))
    cache.save()
    again = InfoCache(store).header(path)
    assert again == head and type(again.swa_pattern) is tuple
    info = combine([again], None)
    assert (info.swa_pattern, info.shared_kv_layers, info.key_length_swa) == (
        (1, 1, 0, 1, 0), 2, 32)


def test_per_layer_heads_and_widths_and_nextn_layers(tmp_path: Path) -> None:
    """Nemotron's deci gives heads, KV heads and feed-forward widths per layer: the model's
    head count is the first layer's (llama.cpp's n_head()), its width the widest layer's.
    GLM-4.5's header says how many of its last blocks are NextN layers. Both survive a
    restart of the cache."""
    deci = ggufgen.write_deci(tmp_path / "deci.gguf", embd=64, heads=(2, 4, 0, 2),
                              kv_heads=(1, 2, 0, 1), ff=(128, 192, 0, 128), head_dim=32)
    glm = ggufgen.write_glm4moe(tmp_path / "glm.gguf", embd=64, heads=2, heads_kv=1,
                                head_dim=32, experts=4, used=2, ff_exp=64, trunk=2, nextn=1)
    store = tmp_path / "info.json"
    cache = InfoCache(store)
    heads = cache.header(deci), cache.header(glm)
    cache.save()
    again = InfoCache(store)
    assert (again.header(deci), again.header(glm)) == heads
    assert (heads[0].heads, heads[0].ff_lengths) == ((2, 4, 0, 2), (128, 192, 0, 128))
    info = combine([again.header(deci)], None)
    assert (info.head_count, info.heads, info.kv_heads, info.feed_forward_length) == (
        2, (2, 4, 0, 2), (1, 2, 0, 1), 192)
    info = combine([again.header(glm)], None)
    assert (info.block_count, info.nextn_predict_layers, info.head_count) == (3, 1, 2)


def test_other_arrays_where_kv_heads_go_are_stepped_over(tmp_path: Path) -> None:
    """Only whole numbers, one per layer at most (MAX_LAYERS), are kept; anything else in
    that place reads as no per-layer count (the model's head count is used)."""
    def arr(item: int, fmt: str, values: list) -> bytes:  # type: ignore[type-arg]
        return struct.pack(f"<IQ{len(values)}{fmt}", item, len(values), *values)
    u32 = struct.pack("<I", 4)
    for name, value in (("floats", arr(6, "f", [1.0, 2.0])),
                        ("too many", arr(4, "I", [1] * (MAX_LAYERS + 1))),
                        ("signed", arr(5, "i", [0, 3])), ("negative", arr(5, "i", [0, -3]))):
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(ggufgen.raw_gguf([
            (b"general.architecture", 8, struct.pack("<Q", 4) + b"lfm2"),
            (b"lfm2.block_count", 4, struct.pack("<I", 2)),
            (b"lfm2.attention.head_count", 4, u32),
            (b"lfm2.attention.head_count_kv", 9, value)]))
        head = read_header(path)
        assert head.kv_heads == ((0, 3) if name == "signed" else ()), name
        assert "lfm2.attention.head_count_kv" not in head.fields
    # One array is kept at most: one under another architecture's name first is the one.
    path = tmp_path / "decoy.gguf"
    path.write_bytes(ggufgen.raw_gguf([
        (b"general.architecture", 8, struct.pack("<Q", 4) + b"lfm2"),
        (b"x.attention.head_count_kv", 9, arr(4, "I", [7] * 4)),
        (b"lfm2.attention.head_count_kv", 9, arr(4, "I", [0, 2]))]))
    assert read_header(path).kv_heads == ()
    # One of each kind: a decoy sliding-window pattern leaves the KV heads' array kept.
    path.write_bytes(ggufgen.raw_gguf([
        (b"general.architecture", 8, struct.pack("<Q", 6) + b"gemma4"),
        (b"x.attention.sliding_window_pattern", 9, arr(7, "B", [1] * 4)),
        (b"gemma4.attention.sliding_window_pattern", 9, arr(7, "B", [1, 0])),
        (b"gemma4.attention.head_count_kv", 9, arr(4, "I", [2, 1]))]))
    head = read_header(path)
    assert (head.swa_pattern, head.kv_heads) == ((), (2, 1))
