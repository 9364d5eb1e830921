"""Fitting models to the memory there is (memory/fit.py), decided by the scheduler: table
tests on GPU and CPU shapes, with the real estimate (memory/estimate.py) of model shapes
as their GGUF headers describe them, NVML faked at its boundary.

Every chosen plan is checked against the room it was chosen for, and for being the
largest (context, layers on the GPU) or smallest (experts in RAM) that fits there: the
next step up (or down) is priced and must not fit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from helpers.nvml import FakeDevice, FakeNvml

from llamad.catalog.catalog import Model
from llamad.catalog.gguf_info import GGUFInfo, Projector, TensorBytes
from llamad.catalog.presets import ModelSettings
from llamad.config import Config
from llamad.memory import fit
from llamad.memory.gpu import GpuMonitor
from llamad.memory.measure import Measure
from llamad.memory.types import GpuFree, Memory, Resources
from llamad.supervisor.events import State
from llamad.supervisor.scheduler import Load, ModelView, Policy, Reject, decide

MIB, GIB = 1024**2, 1024**3
RESERVE = 1 * GIB  # memory-reserve-mb's default
RAM = 64 * GIB


def layered(size: int, blocks: int, vocab: int, embd: int, experts: int = 0) -> TensorBytes:
    """A tensor table: the input and output layers as a Q4_K/Q6_K file holds them, the rest
    spread evenly over the blocks (`experts` bytes of each in ffn_*_exps)."""
    inp, out = int(vocab * embd * 0.5625), int(vocab * embd * 0.8203)
    per = (size - inp - out) // blocks
    kinds = [("attn_q.weight", (per - experts) * blocks // 2, blocks),
             ("ffn_down.weight" if not experts else "attn_output.weight",
              (per - experts) * blocks // 2, blocks)]
    if experts:
        kinds += [(f"ffn_{k}_exps.weight", experts * blocks // 3, blocks)
                  for k in ("up", "gate", "down")]
    return TensorBytes((per,) * blocks, inp, out, False, vocab,
                       (experts,) * blocks if experts else (), tuple(kinds))


def info(**kw: object) -> GGUFInfo:
    base: dict[str, Any] = dict(
        architecture="llama", parameters=None, context_length=131072, block_count=32,
        head_count=32, head_count_kv=8, embedding_length=4096, key_length=None,
        value_length=None, size=4_920_000_000, quantization="Q4_K_M",
        modalities=("text",), feed_forward_length=14336)
    base.update(kw)
    return GGUFInfo(**base)


LLAMA_8B = info(tensors=layered(4_920_000_000, 32, 128256, 4096))  # Llama 3.1 8B, 128k
LLAMA_1B = info(block_count=16, embedding_length=2048, feed_forward_length=8192,
                size=808_000_000, tensors=layered(808_000_000, 16, 128256, 2048))
# Qwen3-30B-A3B at Q6_K: 48 layers of 128 experts (8 used), 25 GB.
QWEN3_MOE = info(architecture="qwen3moe", context_length=40960, block_count=48,
                 head_count=32, head_count_kv=4, embedding_length=2048, key_length=128,
                 value_length=128, size=25_100_000_000, feed_forward_length=6144,
                 expert_count=128, expert_used_count=8, expert_feed_forward_length=768,
                 tensors=layered(25_100_000_000, 48, 151936, 2048, experts=483_000_000))
# Gemma 3 4B with its SigLIP projector (896 px in 14 px patches).
GEMMA_4B = info(architecture="gemma3", block_count=34, head_count=8, head_count_kv=4,
                embedding_length=2560, key_length=256, value_length=256, sliding_window=1024,
                feed_forward_length=10240, size=2_490_000_000,
                tensors=layered(2_490_000_000, 34, 262144, 2560),
                projector=Projector(851_000_000, 4096, 1152, 4304, 16))


def model(name: str, meta: GGUFInfo, args: str = "", draft: GGUFInfo | None = None,
          **settings: object) -> Model:
    path = Path(f"/m/{name}.gguf")
    s = ModelSettings(args=("--model", str(path), *args.split()), load_on_startup=False,
                      stop_timeout=None, pin=False, ttl=None, memory_max=None,
                      memory_high=None, devices=None, split=False, preset_text="")
    s = dataclasses.replace(s, **settings)  # type: ignore[arg-type]
    return Model(name, (), f"llama-server@{name}.service", path, (path,), None, "models_dir",
                 meta, s, 0, draft=draft)


def measure(tmp_path: Path, gpus_gib: tuple[float, ...] = (), used_gib: float = 0,
            **config: object) -> Measure:
    """Over fake GPUs of these sizes (GiB), the first with `used_gib` in use."""
    devices = [FakeDevice("NVIDIA GeForce", int(g * GIB), int(used_gib * GIB) if i == 0 else 0)
               for i, g in enumerate(gpus_gib)]
    monitor = GpuMonitor(FakeNvml(devices), proc=tmp_path / "proc")
    return Measure(Config.default(**config), monitor, state_dir=tmp_path / "state")


def resources(meas: Measure, ram: int = RAM, budget: int | None = None) -> Resources:
    gpus = tuple(GpuFree(g.index, g.free, g.total) for g in meas.gpu_list())
    return Resources(ram_free=ram, gpus=gpus, reserve=RESERVE, ram_budget=budget)


def target(meas: Measure, m: Model) -> ModelView:
    return ModelView(m.id, need=meas.need(m), fit=meas.fitter(m), floor=meas.floor(m))


def plan(meas: Measure, m: Model, *others: ModelView, ram: int = RAM,
         budget: int | None = None) -> Load | Reject:
    views = {v.id: v for v in (*others, target(meas, m))}
    decision = decide(m.id, views, resources(meas, ram, budget), Policy.LRU)
    assert isinstance(decision, Load | Reject), decision
    return decision


# A pinned model that stays: with it, what does not fit is refused (alone, it is tried).
PINNED = ModelView("pinned", State.READY, pinned=True, need=Memory(MIB), used=Memory(MIB))


def ctx_of(load: Load) -> int:
    assert load.fit is not None and load.fit.ctx is not None
    return load.fit.ctx


def price(meas: Measure, m: Model, *extra: str) -> Memory:
    fitter = meas.fitter(m)
    assert fitter is not None
    return fitter.price(extra)


def test_8b_with_128k_context_on_gpus_of_12_16_24_and_80_gb(tmp_path: Path, subtests) -> None:  # type: ignore[no-untyped-def]
    """Llama 3.1 8B without -c: the trained context needs 21.5 GiB of VRAM, more than a
    12 or 16 GB card has; there it gets the largest context that fits, on 24 and 80 GB
    the trained one. Every layer stays on the GPU."""
    m = model("llama", LLAMA_8B)
    for gib in (12, 16, 24, 80):
        with subtests.test(f"{gib} GB"):
            meas = measure(tmp_path / str(gib), (gib,))
            load = plan(meas, m)
            assert isinstance(load, Load) and load.gpus == (0,) and load.fit is not None
            room = gib * GIB - RESERVE
            assert load.fit.need == price(meas, m, *load.fit.args)
            assert load.fit.need.vram <= room
            assert "--n-gpu-layers" not in load.fit.args
            ctx = ctx_of(load)
            if gib >= 24:
                assert ctx == 131072 and load.fit.args == ()
                assert load.fit.reason.startswith("trained context 131072: ")
            else:
                assert 4096 <= ctx < 131072 and ctx % 256 == 0
                assert price(meas, m, "--ctx-size", str(ctx + 256)).vram > room
                assert load.fit.args == ("--ctx-size", str(ctx))
                assert load.fit.reason.startswith(f"context {ctx} of 131072: ")
            assert "free on GPU 0 after evicting nothing" in load.fit.reason
    trained = price(measure(tmp_path / "x", (80,)), m)
    assert 21 * GIB < trained.vram < 22 * GIB  # the figure: 21.5 GiB


def test_8b_on_the_cpu_shrinks_the_context_to_the_ram(tmp_path: Path) -> None:
    meas = measure(tmp_path)
    m = model("llama", LLAMA_8B)
    load = plan(meas, m, ram=12 * GIB)
    assert isinstance(load, Load) and load.gpus == ()
    ctx = ctx_of(load)
    assert 4096 <= ctx < 131072
    assert load.fit is not None and load.fit.need.ram <= 11 * GIB
    assert price(meas, m, "--ctx-size", str(ctx + 256)).ram > 11 * GIB
    assert load.fit.reason.endswith("of RAM free after evicting nothing")
    # memory-budget-mb bounds it too, and says so.
    budget = plan(meas, m, budget=8 * GIB)
    assert isinstance(budget, Load) and ctx_of(budget) < ctx
    assert budget.fit is not None and "of RAM free within memory-budget-mb" in budget.fit.reason


def test_ctx_max_caps_the_context(tmp_path: Path) -> None:
    meas = measure(tmp_path, (80,), ctx_max=16000)
    load = plan(meas, model("llama", LLAMA_8B))
    assert isinstance(load, Load) and ctx_of(load) == 15872  # a multiple of 256
    assert load.fit is not None and load.fit.reason.startswith("context 15872 (ctx-max) of 131072")
    # A preset's ctx-max wins over the global one.
    preset = plan(meas, model("llama", LLAMA_8B, ctx_max=32768))
    assert isinstance(preset, Load) and ctx_of(preset) == 32768
    # Its 0 lifts the cap for that model: the trained context, as with no ctx-max at all.
    lifted = plan(meas, model("llama", LLAMA_8B, ctx_max=0))
    assert isinstance(lifted, Load) and ctx_of(lifted) == 131072


def test_explicit_context_and_layers_are_kept(tmp_path: Path) -> None:
    """-c is never changed: at the trained context the 8B model fits a 12 GB card only
    with fewer layers there; with -ngl given too, it does not fit at all: 503 beside a
    pinned model; alone it is tried, on the GPU, and llama-server's verdict decides."""
    meas = measure(tmp_path, (12,))
    m = model("llama", LLAMA_8B, "--ctx-size 131072")
    load = plan(meas, m)
    assert isinstance(load, Load) and load.fit is not None
    ngl = int(load.fit.args[load.fit.args.index("--n-gpu-layers") + 1])
    assert load.fit.args == ("--n-gpu-layers", str(ngl)) and 0 < ngl < 33
    assert load.fit.need.vram <= 11 * GIB
    assert price(meas, m, "--n-gpu-layers", str(ngl + 1)).vram > 11 * GIB
    assert load.fit.reason.startswith(f"{ngl} of 33 layers on the GPU: ")
    given = model("llama", LLAMA_8B, "--ctx-size 131072 --n-gpu-layers 99")
    fixed = plan(meas, given, PINNED)
    assert isinstance(fixed, Reject) and fixed.status == 503
    assert "cannot load llama: needs 21." in fixed.message and "of VRAM, 11.0 GiB free" \
        in fixed.message
    tried = plan(meas, given)
    assert isinstance(tried, Load) and tried.gpus == (0,) and tried.fit is not None
    assert tried.fit.args == () and "tried alone" in tried.fit.reason
    assert measure(tmp_path, (12,)).fitter(
        model("llama", LLAMA_8B, "--ctx-size 8192 --n-gpu-layers 99")) is None


def test_30b_moe_on_24_gb_keeps_experts_in_ram(tmp_path: Path) -> None:
    """25 GB of weights on a 24 GB card: at the smallest context, the experts of the
    fewest first layers stay in RAM (--n-cpu-moe), every layer's attention on the GPU."""
    meas = measure(tmp_path, (24,))
    m = model("qwen3moe", QWEN3_MOE)
    load = plan(meas, m)
    assert isinstance(load, Load) and load.fit is not None and load.gpus == (0,)
    args = load.fit.args
    n = int(args[args.index("--n-cpu-moe") + 1])
    assert args == ("--ctx-size", "4096", "--n-cpu-moe", str(n)) and 0 < n < 48
    room = 23 * GIB
    assert load.fit.need.vram <= room
    assert price(meas, m, "--ctx-size", "4096", "--n-cpu-moe", str(n - 1)).vram > room
    assert f"context 4096 of 40960, the experts of {n} of 48 layers in RAM" in load.fit.reason
    # The experts it keeps in RAM are counted: that much less VRAM than all on the GPU.
    whole = price(meas, m, "--ctx-size", "4096")
    assert whole.vram - load.fit.need.vram >= n * 483_000_000 - MIB


def test_dense_model_too_big_for_the_gpu_gets_fewer_layers(tmp_path: Path) -> None:
    meas = measure(tmp_path, (4,))
    m = model("llama", LLAMA_8B)
    load = plan(meas, m)
    assert isinstance(load, Load) and load.fit is not None
    args = load.fit.args
    ngl = int(args[args.index("--n-gpu-layers") + 1])
    assert args[:2] == ("--ctx-size", "4096") and 0 < ngl < 32
    assert price(meas, m, "--ctx-size", "4096", "--n-gpu-layers", str(ngl + 1)).vram > 3 * GIB
    # With 1 GiB of RAM free the weights left on the host stay on disk, paged in as
    # needed (llama-server maps them), and it still loads.
    paged = plan(meas, m, ram=2 * GIB)
    assert isinstance(paged, Load) and paged.fit is not None
    assert paged.fit.need.ram <= GIB < price(meas, m, *paged.fit.args).ram
    # Without RAM even for the rest: nothing fits, and the refusal (beside a pinned model)
    # gives the smallest plan's figures.
    none = plan(meas, m, PINNED, ram=RESERVE + 256 * MIB)
    assert isinstance(none, Reject) and "needs" in none.message and "of RAM" in none.message
    assert none.message.endswith("(at context 4096, the least fit-min-ctx allows)")


def test_projector_is_counted(tmp_path: Path) -> None:
    """A vision model's projector (weights and its encoder's compute graph) is on the GPU
    with the model: it takes VRAM the context would otherwise get. Its graph keeps each
    head's scores over all 4096 patches only without flash attention: turned off, or by
    default (auto) where CUDA has no kernel for the head size (SigLIP's 72 it has)."""
    meas = measure(tmp_path, (7,))
    with_proj = model("gemma4b", GEMMA_4B, "--mmproj /m/mmproj.gguf")
    text_only = model("gemma4b", GEMMA_4B)
    a, b = price(meas, with_proj), price(meas, text_only)
    ffn_stage, scores = 4096 * (4304 + 3 * 1152) * 4, 4096 * 4096 * 16 * 4
    assert 851_000_000 + ffn_stage <= a.vram - b.vram < 851_000_000 + ffn_stage + 2 * MIB
    assert a.ram - b.ram >= 851_000_000  # the file, read once
    load_a, load_b = plan(meas, with_proj), plan(meas, text_only)
    assert isinstance(load_a, Load) and isinstance(load_b, Load)
    assert ctx_of(load_a) < ctx_of(load_b)
    host = price(meas, model("g", GEMMA_4B, "--mmproj /m/p.gguf --no-mmproj-offload"))
    assert host.vram == b.vram and host.ram - b.ram >= 2 * 851_000_000
    off = price(meas, with_proj, "-fa", "off")
    assert off.vram - price(meas, text_only, "-fa", "off").vram >= 851_000_000 + scores
    heads_88 = dataclasses.replace(GEMMA_4B, projector=Projector(851_000_000, 4096, 1408,
                                                                  5632, 16))
    c = price(meas, model("gemma4b", heads_88, "--mmproj /m/mmproj.gguf"))
    assert c.vram - b.vram >= 851_000_000 + scores


def test_draft_model_is_counted(tmp_path: Path) -> None:
    """-md loads a second model, with its own weights and a KV cache of the same context:
    the context chosen for the pair is smaller than for the model alone."""
    meas = measure(tmp_path, (12,))
    alone = model("llama", LLAMA_8B)
    paired = model("llama", LLAMA_8B, "--model-draft /m/llama-1b.gguf", draft=LLAMA_1B)
    a, b = price(meas, paired, "--ctx-size", "8192"), price(meas, alone, "--ctx-size", "8192")
    assert a.vram - b.vram >= 808_000_000 - 300 * MIB  # its layers; the input stays on the host
    load_a, load_b = plan(meas, paired), plan(meas, alone)
    assert isinstance(load_a, Load) and isinstance(load_b, Load)
    assert 4096 <= ctx_of(load_a) < ctx_of(load_b)
    # Its own -ngld: a draft kept off the GPU takes only RAM.
    off = price(meas, model("l", LLAMA_8B, "-md /m/d.gguf -ngld 0", draft=LLAMA_1B),
                "--ctx-size", "8192")
    assert off.vram == b.vram and off.ram > b.ram


def test_two_models_compete_and_one_is_pinned(tmp_path: Path) -> None:
    """On a 24 GB card with a pinned model holding 10 GiB and an idle one 6 GiB, the 8B
    model's trained context does not fit: the idle one is evicted and the context fitted
    to what is left beside the pinned one, which is never touched."""
    meas = measure(tmp_path, (24,), used_gib=16)  # NVML sees what they hold
    pinned = ModelView("pinned", State.READY, pinned=True, need=Memory(GIB, 10 * GIB),
                       used=Memory(GIB, 10 * GIB), gpus=(0,))
    idle = ModelView("idle", State.READY, last_used=1.0, need=Memory(GIB, 6 * GIB),
                     used=Memory(GIB, 6 * GIB), gpus=(0,))
    m = model("llama", LLAMA_8B)
    load = plan(meas, m, pinned, idle)
    assert isinstance(load, Load) and load.evict == ("idle",)
    room = 24 * GIB - 10 * GIB - RESERVE
    ctx = ctx_of(load)
    assert 4096 <= ctx < 131072 and load.fit is not None and load.fit.need.vram <= room
    assert price(meas, m, "--ctx-size", str(ctx + 256)).vram > room
    assert load.fit.reason.endswith("free on GPU 0 after evicting idle")
    # A context that fits beside both needs no eviction (ctx-max keeps it small).
    small = plan(measure(tmp_path / "s", (24,), 16, ctx_max=8192), m, pinned, idle)
    assert isinstance(small, Load) and small.evict == () and ctx_of(small) == 8192
    # Unpinned, the busy-free one goes first, then the other: the trained context fits.
    free = dataclasses.replace(pinned, pinned=False, last_used=2.0)
    both = plan(meas, m, free, idle)
    assert isinstance(both, Load) and set(both.evict) == {"idle", "pinned"}
    assert ctx_of(both) == 131072


@pytest.mark.parametrize("flags", ["--fit on", "--fit-ctx 8192"])
def test_llama_servers_own_fitting_is_left_alone(tmp_path: Path, flags: str) -> None:
    assert measure(tmp_path, (12,)).fitter(model("llama", LLAMA_8B, flags)) is None


def test_memory_need_overrides_the_estimate(tmp_path: Path) -> None:
    meas = measure(tmp_path, (12,))
    m = model("llama", LLAMA_8B, memory_need=(3 * GIB, None))
    assert meas.fitter(m) is None  # llamad plans with the figure given and fits nothing
    assert meas.need(m).ram == 3 * GIB
    assert meas.need(m).vram == meas.need(model("llama", LLAMA_8B)).vram
    both = model("llama", LLAMA_8B, memory_need=(2 * GIB, 5 * GIB))
    assert meas.need(both) == Memory(2 * GIB, 5 * GIB)


def test_non_unified_slots_fit_per_slot_contexts(tmp_path: Path) -> None:
    """-np 4 without a unified cache: as llama.cpp's fit, each slot may have the trained
    context (4 x 131072 in all) and the context stays a multiple of 4 x 256."""
    meas = measure(tmp_path, (24,))
    load = plan(meas, model("llama", LLAMA_8B, "--parallel 4"))
    assert isinstance(load, Load) and load.fit is not None
    ctx = ctx_of(load)
    assert ctx % 1024 == 0 and 4 * 4096 <= ctx < 4 * 131072
    assert f"context {ctx} (4 slots) of 524288" in load.fit.reason


def test_ctx_size_0_is_the_whole_trained_context(tmp_path: Path) -> None:
    """-c 0 asks for the trained context (of each slot, -np 4 without a unified cache),
    and llama.cpp's fitting never reduces it: neither does llamad's, nor ctx-max. Where it
    does not fit beside a pinned model: 503 with the figures; alone it is tried."""
    meas = measure(tmp_path, ctx_max=16384)
    for args, whole in (("--ctx-size 0", 131072), ("--ctx-size 0 --parallel 4", 4 * 131072)):
        m = model("llama", LLAMA_8B, args)
        roomy = plan(meas, m, ram=200 * GIB)
        assert isinstance(roomy, Load) and ctx_of(roomy) == whole, (args, roomy)
        short = price(meas, m, "--ctx-size", str(whole)).ram // 2
        refused = plan(meas, m, PINNED, ram=short)
        assert isinstance(refused, Reject) and "of RAM" in refused.message, (args, refused)
        assert refused.message.endswith(f"(at context {whole}, the whole trained context)")
        tried = plan(meas, m, ram=short)
        assert isinstance(tried, Load) and ctx_of(tried) == whole, (args, tried)
        assert tried.fit is not None and "tried alone" in tried.fit.reason
    # Without -c the context is fitted (and capped) as before.
    fitted = plan(meas, model("llama", LLAMA_8B), ram=200 * GIB)
    assert isinstance(fitted, Load) and ctx_of(fitted) == 16384


def test_room_decides_the_context_shown_in_the_choice() -> None:
    """The pure part alone: a made-up price (1 MiB per token of context on the GPU)."""
    shape = fit.Shape(trained=65536, most=65536, least=4096)
    fitter = fit.Fitter(shape, lambda extra: Memory(
        0, int(extra[1]) * MIB if extra else 65536 * MIB))
    assert fitter.choose(fit.Room(GIB, 100 * GIB, True)).args == ()  # type: ignore[union-attr]
    got = fitter.choose(fit.Room(GIB, 10_000 * MIB, True))
    assert got is not None and got.ctx == 9984 and got.args == ("--ctx-size", "9984")
    assert fitter.choose(fit.Room(GIB, 4095 * MIB, True)) is None


def test_model_larger_than_free_ram_loads_on_the_gpu(tmp_path: Path) -> None:
    """llama-server maps the file and copies the GPU's tensors out of the mapping, then
    unmaps them: the 4.9 GB of Llama 3.1 8B on a 24 GB card load beside 3 GiB of free RAM
    (the page cache gives them back). llamad loads it too, with the trained context, and
    plans the RAM it cannot do without; memory-budget-mb, the operator's cap, still counts
    the file."""
    meas = measure(tmp_path, (24,))
    m = model("llama", LLAMA_8B)
    assert price(meas, m).ram > 4 * GIB  # the file's pages are part of the need
    load = plan(meas, m, ram=4 * GIB)
    assert isinstance(load, Load) and load.gpus == (0,) and load.fit is not None
    assert ctx_of(load) == 131072 and load.fit.args == ()
    assert load.fit.need.ram <= 3 * GIB and load.fit.need.vram == price(meas, m).vram
    assert load.fit.reason == "trained context 131072: 23.0 GiB free on GPU 0 after " \
        "evicting nothing"
    budget = plan(meas, m, ram=RAM, budget=4 * GIB)
    assert isinstance(budget, Reject) and "needs 5." in budget.message, budget
    # Locked (-lm mmap+mlock), only the host's tensors' pages stay: the token embedding
    # (the first of the file). With the head on the host (-ngl 0) the lock spans the file.
    locked = model("llama", LLAMA_8B, "--load-mode mmap+mlock")
    load = plan(meas, locked, ram=4 * GIB)
    assert isinstance(load, Load) and load.gpus == (0,) and ctx_of(load) == 131072
    assert load.fit is not None and load.fit.need.ram <= 3 * GIB
    held = model("llama", LLAMA_8B, "--load-mode mmap+mlock --n-gpu-layers 0 -c 8192")
    refused = plan(meas, held, PINNED, ram=4 * GIB)
    assert isinstance(refused, Reject) and "of RAM" in refused.message, refused
    # With -ngl given (nothing to fit) the same.
    fixed = model("llama", LLAMA_8B, "--n-gpu-layers 99 --ctx-size 8192")
    assert meas.fitter(fixed) is None
    load = plan(meas, fixed, ram=4 * GIB)
    assert isinstance(load, Load) and load.gpus == (0,) and load.fit is None


def test_model_larger_than_free_ram_loads_on_the_cpu(tmp_path: Path) -> None:
    """On the CPU a mapped model larger than the RAM free still loads (llama-server serves
    it, reading pages again as it needs them): with the least context, leaving the weights
    every page there is. Read into anonymous memory (-lm none) or locked (-lm mmap+mlock)
    it needs the RAM: 503 beside a pinned model; alone it is tried, with the least plan."""
    meas = measure(tmp_path)
    m = model("llama", LLAMA_8B)
    assert price(meas, m, "--ctx-size", "4096").ram > 4 * GIB
    load = plan(meas, m, ram=4 * GIB)
    assert isinstance(load, Load) and load.gpus == () and load.fit is not None
    assert load.fit.args == ("--ctx-size", "4096") and load.fit.need.ram <= 3 * GIB
    for mode in ("none", "mmap+mlock", "mlock"):
        held = model("llama", LLAMA_8B, f"--load-mode {mode}")
        refused = plan(meas, held, PINNED, ram=4 * GIB)
        assert isinstance(refused, Reject) and "of RAM" in refused.message, (mode, refused)
        tried = plan(meas, held, ram=4 * GIB)
        assert isinstance(tried, Load) and tried.fit is not None, (mode, tried)
        assert tried.fit.args == ("--ctx-size", "4096") and "tried alone" in tried.fit.reason
    explicit = plan(meas, model("llama", LLAMA_8B, "--ctx-size 8192"), ram=4 * GIB)
    assert isinstance(explicit, Load) and explicit.fit is None
