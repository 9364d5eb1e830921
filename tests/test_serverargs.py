"""llama-server's arguments read as llama-server reads them (memory/serverargs.py), checked
where a misreading changes the estimate against the real llama-server."""

from __future__ import annotations

from pathlib import Path

import pytest
import rig
from helpers import ggufgen, llamaserver

from llamad.catalog import gguf_info
from llamad.memory.estimate import estimate
from llamad.memory.serverargs import parse_args


@pytest.mark.parametrize(("value", "read"), [
    ("on", "on"), ("enabled", "on"), ("true", "on"), ("1", "on"),
    ("off", "off"), ("disabled", "off"), ("false", "off"), ("0", "off"),
    ("auto", "auto"), ("-1", "auto")])
def test_flash_attention_spellings(value: str, read: str) -> None:
    """Every value common/arg.cpp takes for -fa (is_truthy, is_falsey, is_autoy)."""
    assert parse_args(["-fa", value]).flash_attn == read
    assert parse_args(["--flash-attn", value]).flash_attn == read


def test_flash_attention_on_spelled_1_for_a_projector(tmp_path: Path) -> None:
    """`-fa 1` is `-fa on` to llama-server: read as anything else, Gemma 3 with a SigLIP
    projector (896 px) was counted without flash attention, every head's scores over 4096
    patches: 1638 MiB against a peak RSS of 430 (3.8x); read as on, 628 MiB."""
    path = ggufgen.write_gemma3_mmproj(tmp_path / "mmproj.gguf", text_embd=640, embd=1152,
                                       ff=4304, heads=16, blocks=2, image_size=896)
    info = gguf_info.combine([gguf_info.read_header(rig.GEMMA)], gguf_info.read_header(path))
    base = ["-c", "1024", "--mmproj", str(path)]
    on = estimate(info, [*base, "-fa", "on"], gpu=False)
    for value in ("1", "enabled"):
        args = [*base, "-fa", value]
        est = estimate(info, args, gpu=False)
        assert est.total == on.total, value
        real = llamaserver.measured(args)
        graph = est.compute.ram - estimate(gguf_info.combine(
            [gguf_info.read_header(rig.GEMMA)], None), args, gpu=False).compute.ram
        print(f"\n-fa {value}: estimate {est.total.ram / 2**20:.1f} MiB, projector graph"
              f" {graph / 2**20:.1f}; llama-server's {real.projector / 2**20:.1f},"
              f" peak RSS {real.peak_rss / 2**20:.1f}")
        assert real.projector <= graph <= 1.1 * real.projector
        assert real.peak_rss <= est.total.ram <= 1.5 * real.peak_rss


def test_whole_context_pins_the_pool_over_a_per_slot_limit() -> None:
    """`-c 0 --kv-unified-per-slot N`: llama-server keeps the trained context (-c 0 pins the
    pool; the per-slot limit then only caps each slot): 126 MiB of KV for Gemma 3 270M at
    32768 cells, where reading the pool as 2 x 2048 counted 42 MiB."""
    meta = gguf_info.combine([gguf_info.read_header(rig.GEMMA)], None)
    args = ["-c", "0", "-np", "2", "--kv-unified-per-slot", "2048"]
    est = estimate(meta, args, gpu=False)
    real = llamaserver.measured(args)
    print(f"\nKV: estimate {est.kv.ram / 2**20:.2f}, llama-server {real.kv / 2**20:.2f} MiB")
    assert est.kv.ram == real.kv
    assert parse_args(["--kv-unified-per-slot", "2048"]).kv_per_slot == 2048
