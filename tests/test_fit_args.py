"""Arguments that change what llama-server loads beyond the model's own header and tensors,
priced as the scheduler prices them (Measure.need, Measure.fitter) and held to the real
llama-server's peak RSS and logged buffers: --override-kv, LoRA adapters, --n-cpu-ffn, and
numbers as llama-server reads them."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import rig
from helpers import llamaserver
from helpers.nvml import FakeDevice, FakeNvml

from llamad.catalog.catalog import Model
from llamad.catalog.gguf_info import GGUFInfo, TensorBytes, combine, read_header
from llamad.catalog.presets import ModelSettings
from llamad.config import Config
from llamad.memory.estimate import estimate
from llamad.memory.gpu import GpuMonitor
from llamad.memory.measure import Measure
from llamad.memory.serverargs import parse_args

MIB, GIB = 1024**2, 1024**3
CTX = "gemma3.context_length"  # Gemma 3 270M's header says 32768


def gemma() -> GGUFInfo:
    return combine([read_header(rig.GEMMA)], None)


def model(meta: GGUFInfo, *args: str) -> Model:
    path = Path("/m/gemma.gguf")
    s = ModelSettings(args=("--model", str(path), *args), load_on_startup=False,
                      stop_timeout=None, pin=False, ttl=None, memory_max=None,
                      memory_high=None, devices=None, split=False, preset_text="")
    return Model("gemma", (), "llama-server@gemma.service", path, (path,), None,
                 "models_dir", meta, s, 0)


def measure(tmp_path: Path, gpus_gib: tuple[float, ...] = ()) -> Measure:
    devices = [FakeDevice("NVIDIA GeForce", int(g * GIB), 0) for g in gpus_gib]
    monitor = GpuMonitor(FakeNvml(devices), proc=tmp_path / "proc")
    return Measure(Config.default(), monitor, state_dir=tmp_path / "state")


def test_a_context_length_override_is_the_context_llama_server_runs(tmp_path: Path) -> None:
    """Without -c llama-server takes the trained context as --override-kv gives it: 131072
    here, a peak of 738 MiB where the header's 32768 was planned for, 496 MiB. Fitting
    starts from it too: llamad, adding no -c where the trained context fits, left
    llama-server to run four times the context it had planned."""
    meas = measure(tmp_path)
    args = ("--override-kv", f"{CTX}=int:131072")
    m = model(gemma(), *args)
    real = llamaserver.measured(list(args))
    est = estimate(gemma(), args, gpu=False)
    print(f"\nestimate {meas.need(m).ram / MIB:.1f} MiB (KV {est.kv.ram / MIB:.1f}),"
          f" llama-server KV {real.kv / MIB:.1f}, peak RSS {real.peak_rss / MIB:.1f} MiB")
    assert abs(est.kv.ram - real.kv) < MIB / 100
    assert real.peak_rss <= meas.need(m).ram <= 1.5 * real.peak_rss
    fitter = meas.fitter(m)
    assert fitter is not None and fitter.shape.trained == 131072
    # The first override of a key counts (llama-model-loader keeps the first), and only as
    # an int, the key's type.
    first = ("--override-kv", f"{CTX}=int:65536", "--override-kv", f"{CTX}=int:131072")
    assert estimate(gemma(), first, gpu=False).ctx == 65536
    floats = ("--override-kv", f"{CTX}=float:65536")
    assert estimate(gemma(), floats, gpu=False).ctx == 32768
    # Comma-separated beside other keys.
    both = ("--override-kv", f"tokenizer.ggml.add_bos_token=bool:true,{CTX}=int:65536")
    assert estimate(gemma(), both, gpu=False).ctx == 65536


def test_a_sliding_window_override_sizes_the_window_layers(tmp_path: Path) -> None:
    """Gemma 3's 512-token window widened to 4096: llama-server's KV cache at -c 8192 is
    144 MiB, which the header's window put at 61.5 (a peak of 455 MiB against 400)."""
    args = ("-c", "8192", "--override-kv", "gemma3.attention.sliding_window=int:4096")
    real = llamaserver.measured(list(args))
    est = estimate(gemma(), args, gpu=False)
    assert abs(est.kv.ram - real.kv) < MIB / 100, (est.kv.ram / MIB, real.kv / MIB)
    assert real.peak_rss <= measure(tmp_path).need(model(gemma(), *args)).ram


def write_lora(path: Path, rank: int, dtype: type[np.floating] = np.float32) -> Path:
    """A LoRA adapter for Gemma 3 270M (convert_lora_to_gguf's layout): every attention and
    feed-forward matrix of each block as a pair NAME.lora_a (rank x in) and NAME.lora_b
    (out x rank)."""
    reader = gguf.GGUFReader(str(rig.GEMMA))
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_gate", "ffn_down")
    for t in reader.tensors:
        if t.name.startswith("blk.") and t.name.split(".")[2] in kinds:
            n_in, n_out = int(t.shape[0]), int(t.shape[1])
            w.add_tensor(f"{t.name}.lora_a", np.full((rank, n_in), 0.001, dtype=dtype))
            w.add_tensor(f"{t.name}.lora_b", np.zeros((n_out, rank), dtype=dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_lora_adapters_are_counted(tmp_path: Path) -> None:
    """llama-server reads each adapter's tensors into buffers of their own: a 58 MiB adapter
    took Gemma at -c 4096 from 360 to 420 MiB peak RSS, over the 384 planned; a second
    one (--lora-scaled) 8 MiB more. Every spelling adds up: comma-separated, repeated."""
    big, small = write_lora(tmp_path / "big.gguf", 64), write_lora(
        tmp_path / "small.gguf", 16, np.float16)
    meas = measure(tmp_path)
    base = meas.need(model(gemma(), "-c", "4096")).ram
    sizes = big.stat().st_size + small.stat().st_size
    for args in (("-c", "4096", "--lora", f"{big},{small}"),
                 ("-c", "4096", "--lora", str(big), "--lora-scaled", f"{small}:0.5")):
        need = meas.need(model(gemma(), *args)).ram
        real = llamaserver.measured(list(args))
        print(f"\n{' '.join(args[2:])}: need {need / MIB:.1f} MiB,"
              f" peak RSS {real.peak_rss / MIB:.1f} MiB")
        assert real.peak_rss <= need <= 1.5 * real.peak_rss
        assert need == base + sizes
    # What llamad cannot see counts nothing (llama-server's start then fails on it).
    gone = meas.need(model(gemma(), "-c", "4096", "--lora", str(tmp_path / "gone.gguf")))
    assert gone.ram == base


def test_lora_adapters_follow_their_layers_to_the_gpu(tmp_path: Path) -> None:
    """An adapter's tensors go where their base tensors are: all of them on the GPU at
    -ngl 99, the share of the repeating layers there at fewer (-ngl 9 of Gemma's 18 and
    its output layer: the last 8)."""
    lora = write_lora(tmp_path / "a.gguf", 16)
    meas = measure(tmp_path, (80,))
    size = lora.stat().st_size
    for ngl, share in (("99", 18), ("9", 8), ("0", 0)):
        without = meas.need(model(gemma(), "-c", "4096", "-ngl", ngl))
        with_lora = meas.need(model(gemma(), "-c", "4096", "-ngl", ngl, "--lora", str(lora)))
        assert with_lora.vram - without.vram == size * share // 18, ngl
        assert with_lora.ram + with_lora.vram - without.ram - without.vram == size, ngl


DENSE = GGUFInfo(
    architecture="llama", parameters=None, context_length=8192, block_count=32,
    head_count=32, head_count_kv=8, embedding_length=4096, key_length=None,
    value_length=None, size=4_920_000_000, quantization="Q4_K_M", modalities=("text",),
    feed_forward_length=14336,
    tensors=TensorBytes((140_000_000,) * 32, 290_000_000, 430_000_000, False, 128256, (),
                        (("attn_q.weight", 32 * 20_000_000, 32),
                         ("ffn_down.weight", 32 * 40_000_000, 32),
                         ("ffn_up.weight", 32 * 40_000_000, 32),
                         ("ffn_gate.weight", 32 * 40_000_000, 32))))


def test_n_cpu_ffn_keeps_dense_feed_forward_weights_on_the_host(tmp_path: Path) -> None:
    """--n-cpu-ffn N keeps the ffn_up/down/gate weights of the first N layers in RAM
    (common.h's LLM_FFN_DENSE_REGEX as a CPU tensor override): counted on the GPU, a
    model that llama-server fits on the GPU was given fewer layers by llamad. It places
    tensors itself, as -ot does, so fitting moves no layer (common/fit.cpp aborts on a
    user's tensor overrides). On the CPU it changes nothing (Gemma at -c 4096: the same
    buffers and 360 MiB peak either way)."""
    meas = measure(tmp_path, (80,))
    plain = meas.need(model(DENSE, "-c", "8192"))
    kept = meas.need(model(DENSE, "-c", "8192", "-ncffn", "8"))
    assert plain.vram - kept.vram == 8 * 120_000_000
    assert kept.ram >= plain.ram  # the file is mapped whole either way
    # Given twice, llama-server adds both sets of overrides: the larger counts.
    twice = meas.need(model(DENSE, "-c", "8192", "-ncffn", "8", "--n-cpu-ffn", "4"))
    assert twice == kept
    fitter = meas.fitter(model(DENSE, "-ncffn", "8"))
    assert fitter is not None and fitter.shape.layers == 0
    cpu = ["-c", "4096"]
    assert estimate(gemma(), [*cpu, "-ncffn", "4"], gpu=False) == estimate(gemma(), cpu,
                                                                          gpu=False)
    real = llamaserver.measured([*cpu, "-ncffn", "4"])
    assert real.kv == llamaserver.measured(cpu).kv


def test_numbers_are_read_as_llama_server_reads_them() -> None:
    """std::stoi takes a number's leading digits: `-c 4096.5` runs at 4096 (49.5 MiB of
    KV cache), where a reader refusing it fell back to the trained context, 32768."""
    args = ["-c", "4096.5"]
    assert parse_args(args).ctx_size == 4096
    real = llamaserver.measured(args)
    assert abs(estimate(gemma(), args, gpu=False).kv.ram - real.kv) < MIB / 100
    assert parse_args(["-c", "x"]).ctx_size == 0


def test_many_slots_keep_the_last_activations_beside_the_logits(subtests) -> None:  # type: ignore[no-untyped-def]
    """With a row of logits per slot larger than the feed-forward's working set, the
    compute buffer holds both the logits and the micro-batch's last activations (and,
    without flash attention, a layer's scores): Gemma at -np 32 -ub 1024 reserved 45.6 MiB
    where the logits alone, the larger of the two, were counted: 37.6."""
    for args in (["-c", "4096", "-np", "16"], ["-c", "8192", "-np", "32", "-ub", "1024"],
                 ["-c", "4096", "-np", "64", "-ub", "128"], ["-c", "4096", "-np", "64",
                                                            "-fa", "off"]):
        with subtests.test(" ".join(args)):
            est = estimate(gemma(), args, gpu=False)
            real = llamaserver.measured(args)
            graph = est.compute.ram - real.output  # the logits' own buffer: a row per slot
            assert real.output == int(args[args.index("-np") + 1]) * 262144 * 4
            assert real.compute <= graph <= real.compute * 1.1, (graph / MIB,
                                                                 real.compute / MIB)
