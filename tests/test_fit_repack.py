"""x86 weight repacking: llama.cpp's CPU backend copies the matrices of some types (Q4_0,
Q4_K, IQ4_NL, MXFP4) into a buffer of its own where the CPU holds them, anonymous memory
beside the mapped file (llamad/memory/repack.py). Measured against the real llama-server
on generated models; the CPU's features come from /proc/cpuinfo."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import llamaserver
from helpers.quantgen import Q, write_quantized

from llamad.catalog.gguf_info import GGUFInfo, InfoCache, combine, read_header
from llamad.catalog.tensortable import TensorBytes
from llamad.memory import repack
from llamad.memory.estimate import estimate, estimate_rpc, needs

MIB = 1024**2
# Elements of the matrices of write()'s 4 layers (embedding 1024, feed-forward 2816).
LAYER = 4 * (1024 * 1024 * 2 + 256 * 1024 * 2 + 3 * 2816 * 1024)


def write(path: Path, qtype: Q, *, wide: bool = False, vocab: int = 32000, tied: bool = False,
          embd_type: Q | None = None, output_type: Q | None = None) -> Path:
    """A small llama of 4 layers: embedding 1024, feed-forward 2816, 8 heads (2 for KV);
    `wide`: 2048, 5632 and 16 (4)."""
    embd, ff, heads = (2048, 5632, 16) if wide else (1024, 2816, 8)
    return write_quantized(path, qtype, embd=embd, ff=ff, heads=heads, heads_kv=heads // 4,
                           head_dim=128, blocks=4, vocab=vocab, tied=tied, embd_type=embd_type,
                           output_type=output_type)


def q4_0(elements: int) -> int:
    return elements // 32 * 18


def info(path: Path) -> GGUFInfo:
    return combine([read_header(path)], None)


def test_cpu_flags_decide_whether_llama_cpp_repacks() -> None:
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n"
    assert repack.on("x86_64", avx2)
    assert not repack.on("x86_64", "processor\t: 0\nflags\t\t: fpu sse2 avx fma\n")
    assert not repack.on("x86_64", "flags\t\t: avx2_something\n")
    assert not repack.on("aarch64", "Features\t: fp asimd avx2\n")
    assert not repack.on("x86_64", "")
    assert repack.here() == repack.on(platform.machine(), Path("/proc/cpuinfo").read_text())


def test_the_header_sums_the_matrices_llama_cpp_repacks(tmp_path: Path) -> None:
    """Every layer's Q4_0 matrix; the head where its rows are a multiple of 8; a tied head
    is the token embedding, copied for the output layer (the input layer only reads rows
    of it, never copied)."""
    layers = q4_0(LAYER)
    head = q4_0(32000 * 1024)
    cases: list[tuple[str, dict[str, Any], int]] = [
        ("own head", {"vocab": 32000}, head),
        ("tied head", {"vocab": 32000, "tied": True}, head),
        ("head of 1028 rows", {"vocab": 1028}, 0),
        ("a Q6_K head", {"vocab": 32000, "output_type": Q.Q6_K}, 0),
        ("tied to a Q8_0 embedding", {"vocab": 32000, "tied": True, "embd_type": Q.Q8_0}, 0),
    ]
    for name, kw, want in cases:
        t = info(write(tmp_path / f"{name}.gguf", Q.Q4_0, **kw)).tensors
        assert t is not None
        assert (t.repack, t.repack_head) == (layers, want), name
    q8 = info(write(tmp_path / "q8.gguf", Q.Q8_0)).tensors
    assert q8 is not None and (q8.repack, q8.repack_head) == (0, 0)


def test_shards_and_the_header_cache_keep_the_sums(tmp_path: Path) -> None:
    # A first shard with the token embedding (tied, by itself), a last with output.weight.
    first = TensorBytes((10,), 100, 0, True, 8, repack=10, repack_head=100)
    last = TensorBytes((0, 20), 0, 30, False, 0, repack=20, repack_head=30)
    both = first.plus(last)
    assert (both.tied, both.repack, both.repack_head) == (False, 30, 30)
    assert last.plus(first).repack_head == 30
    tied = first.plus(TensorBytes((0, 20), 0, 4, True, 0, repack=20))
    assert (tied.tied, tied.repack_head) == (True, 100)
    path = write(tmp_path / "m.gguf", Q.Q4_0, tied=True)
    cache = InfoCache(tmp_path / "cache.json")
    wrote = cache.header(path).tensors
    cache.save()
    again = InfoCache(tmp_path / "cache.json").header(path).tensors
    assert again == wrote and wrote.repack_head == q4_0(32000 * 1024)


# Four layers of 100 MiB, 80 MiB of each copied, and a head of 50 with 40 copied.
TABLE = TensorBytes((100 * MIB,) * 4, 50 * MIB, 50 * MIB, False, 32000, repack=320 * MIB,
                    repack_head=40 * MIB)


@dataclass(frozen=True)
class Meta:
    """A model's header facts as the estimate reads them (GGUFInfo's), with TABLE."""

    architecture: str | None = "llama"
    block_count: int | None = 4
    context_length: int | None = 4096
    head_count: int | None = 8
    head_count_kv: int | None = 2
    embedding_length: int | None = 1024
    key_length: int | None = 128
    value_length: int | None = 128
    size: int = 500 * MIB
    tensors: TensorBytes = TABLE


def test_the_estimate_counts_the_copy_where_llama_server_makes_one() -> None:
    """Mapped, on a CPU that repacks, every matrix the host holds is copied, as anonymous
    memory: the floor keeps it. Read into memory, on a CPU without AVX2, with -nr, or with a
    CUDA device (the host's layers in its host buffer type, unless --no-host), none is."""
    m = Meta()
    copies = [
        ([], True, False, 360), (["-lm", "mmap"], True, False, 360),
        (["-lm", "mmap+mlock"], True, False, 360), (["-nr"], True, False, 0),
        (["-nr", "--repack"], True, False, 360), (["-lm", "none"], True, False, 0),
        (["-lm", "mlock"], True, False, 0), (["-lm", "dio"], True, False, 0),
        ([], False, False, 0), (["-ngl", "0"], True, True, 0), (["-ngl", "2"], True, True, 0),
        # --no-host: the host's 2 layers of 4 (-ngl 3: two and the head on the GPU).
        (["-ngl", "3", "--no-host"], True, True, 160),
        (["-ngl", "0", "--no-host"], True, True, 360), (["-ngl", "99", "--no-host"], True, True, 0),
    ]
    for args, cpu, gpu, want in copies:
        est = estimate(m, args, gpu=gpu, cpu_repacks=cpu)
        without = estimate(m, args, gpu=gpu, cpu_repacks=False)
        assert est.repacked == want * MIB, (args, cpu, gpu)
        assert est.total.ram - without.total.ram == want * MIB, (args, cpu, gpu)
        assert est.mapped == without.mapped and est.total.vram == without.total.vram
        need, floor = needs(m, args, None, gpu=gpu, cpu_repacks=cpu)
        need0, floor0 = needs(m, args, None, gpu=gpu, cpu_repacks=False)
        assert (need.ram - need0.ram, floor.ram - floor0.ram) == (want * MIB,) * 2, args


def test_over_rpc_the_host_copies_what_it_keeps() -> None:
    """RPC devices have no host buffer type: the layers and head the host keeps are copied;
    those sent to the workers are not."""
    m = Meta()
    cases = [(["-ngl", "99"], 0), (["-ngl", "3"], 160), (["-ngl", "0"], 360),
             (["-ngl", "3", "-nr"], 0)]
    for args, want in cases:
        est = estimate_rpc(m, ["--rpc", "127.0.0.1:50052", *args])
        assert est.repacked == (want * MIB if repack.here() else 0), args


@dataclass(frozen=True)
class Loaded:
    """A llama-server once ready: its CPU_REPACK buffer (log), peak and anonymous RSS."""

    repacked: int
    peak: int
    anon: int


def loaded(path: Path, args: list[str]) -> Loaded:
    with llamaserver.started("-t", "2", "-lv", "4", *args, model=path) as server:
        server.wait_ready()
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
    kib = {k: int(v) * 1024 for k, v in re.findall(r"(VmHWM|RssAnon):\s+(\d+) kB", status)}
    found = re.findall(r"CPU_REPACK model buffer size = +([\d.]+) MiB", server.log)
    return Loaded(int(float(found[0]) * MIB) if found else 0, kib["VmHWM"], kib["RssAnon"])


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_K, Q.IQ4_NL, Q.MXFP4, Q.Q8_0],
                         ids=lambda q: q.name)
def test_need_and_floor_against_llama_server(tmp_path: Path, qtype: Q) -> None:
    """The copy as llama-server logs it, to 0.01 MiB, and the need and its floor over its
    peak and anonymous memory. Before the copy was counted, this 186 MiB Q4_0 file, which
    peaks at 428 MiB with 248 anonymous, was planned at 340 with a floor of 153."""
    path = write(tmp_path / "m.gguf", qtype, wide=True)
    m = info(path)
    runs = [[], ["-nr"], ["-lm", "none"]] if qtype == Q.Q4_0 else [[]]
    for extra in runs:
        args = ["-c", "4096", "-np", "1", *extra]
        real = loaded(path, args)
        est = estimate(m, args, gpu=False)
        need, floor = needs(m, args, None, gpu=False)
        print(f"\n{qtype.name} {extra}: peak {real.peak / MIB:.1f} MiB, need"
              f" {need.ram / MIB:.1f}; anonymous {real.anon / MIB:.1f}, floor"
              f" {floor.ram / MIB:.1f}; copied {real.repacked / MIB:.2f},"
              f" counted {est.repacked / MIB:.2f}")
        # Read into memory, the matrices go to that buffer instead of another: no more.
        extra_copy = 0 if "none" in extra else real.repacked
        assert abs(est.repacked - extra_copy) < MIB / 100
        # Over by the same 25-32 MiB with the copy as without it: what llamad keeps for the
        # process (PROCESS_RAM) and compute buffer pages llama-server has not touched yet.
        assert real.anon <= floor.ram <= real.anon + 40 * MIB
        if "none" not in extra:  # read, the file is page cache the cgroup holds, not RSS
            assert real.peak <= need.ram <= real.peak + 40 * MIB
