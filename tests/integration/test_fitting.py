"""Fitting a model to the memory there is, on real systemd with the real Gemma model.

Gemma 3 270M is trained for a 32768-token context. With no -c and a memory-budget-mb
between llamad's plan at that context and at 4096 tokens, llamad starts it with the
largest context that fits the budget: llama-server itself reports it, /v1/models shows
it, and the model's journal says why; a restarted llamad adopts the unit with that choice.
The same model with an explicit `c = 32768` does not fit that budget: 503 with the figures,
nothing started.
"""

from __future__ import annotations

import aiohttp
import rig
from helpers.daemon import Factory, chat, models, wait_http, wait_state

from llamad.catalog.gguf_info import combine, read_header
from llamad.memory.estimate import estimate, prompt_cache_mib

MIB = 1024**2
ARGS = ["-t", "1"]  # as the fixture's, without its -c 4096 -np 4


def plan(*args: str) -> int:
    """llamad's own RAM plan for Gemma with these arguments (no GPU in the box)."""
    info = combine([read_header(rig.GEMMA)], None)
    return estimate(info, [*ARGS, *args], gpu=False).total.ram


async def test_context_fitted_to_the_budget_and_explicit_one_refused(
        llamad_factory: Factory) -> None:
    fitted, explicit = "fit-ctx-a", "fit-ctx-explicit"
    full, least = plan(), plan("--ctx-size", "4096")
    budget = (full + least) // 2 // MIB
    print(f"\nGemma plans: {full / MIB:.1f} MiB at 32768, {least / MIB:.1f} MiB at 4096; "
          f"memory-budget-mb = {budget}")
    assert least < budget * MIB < full
    d = llamad_factory([fitted, explicit], preset=f"[{explicit}]\nc = 32768\n",
                       args=" ".join(ARGS), **{"memory-budget-mb": budget})
    async with aiohttp.ClientSession() as s:
        code, body = await chat(s, d.url, explicit)
        assert code == 503, body
        message = body["error"]["message"]
        assert f"cannot load {explicit}: needs {full / 2**30:.1f} GiB of RAM" in message, message
        assert "free after stopping every unpinned model" in message
        assert d.model_units() == {}

        code, body = await chat(s, d.url, fitted)
        assert code == 200, body
        async with s.get(d.url + "/props", params={"model": fitted}) as r:
            assert r.status == 200
            n_ctx = (await r.json())["default_generation_settings"]["n_ctx"]
    print(f"llama-server runs with n_ctx {n_ctx}")
    assert 4096 <= n_ctx <= 32767
    entry = models(d.url)[fitted]
    assert entry["context_length"] == entry["meta"]["n_ctx"] == n_ctx
    assert "--ctx-size" in entry["status"]["args"]
    fit = entry["llamad"]["fit"]
    assert fit["ctx"] == n_ctx and fit["args"] == ["--ctx-size", str(n_ctx)]
    assert fit["reason"].startswith(f"context {n_ctx} of 32768: ")
    assert "of RAM free within memory-budget-mb after evicting nothing" in fit["reason"]
    assert entry["llamad"]["need"]["ram"] <= budget * MIB
    # The model's own journal says what was chosen and why, and so does llamad's.
    unit = f"llama-server@{fitted}.service"
    rig.wait_for("the note in the model's journal",
                 lambda: f"llamad: {fit['reason']}" in d.box.journal("-u", unit))
    assert f"model {fitted}: {fit['reason']}" in d.log()

    # A restarted llamad adopts the unit with the choice made for it (the argv digest
    # covers the fitted context, which the unit's environment keeps).
    invocation = d.show(unit, "InvocationID")
    d.restart()
    wait_http(d.url)
    wait_state(d.url, fitted, "ready", timeout=30)
    assert d.show(unit, "InvocationID") == invocation and d.starts(fitted) == 1
    assert f"adopting {unit}" in d.log()
    again = models(d.url)[fitted]
    assert again["llamad"]["fit"] == fit and again["meta"]["n_ctx"] == n_ctx


async def test_tried_alone_where_the_estimate_fits_nowhere(llamad_factory: Factory) -> None:
    """With memory-reserve-mb above the machine's memory, no plan fits by llamad's figures.
    Alone, Gemma is still started, as llama-server alone would be, and serves; the reason
    says so. Beside a pinned model, which stays, the same model gets 503 with the figures."""
    alone, pinned = "fit-alone-a", "fit-alone-pinned"
    d = llamad_factory([alone, pinned], preset=f"[{pinned}]\npin = yes\n",
                       args=" ".join(ARGS), **{"memory-reserve-mb": 1 << 20})
    async with aiohttp.ClientSession() as s:
        code, body = await chat(s, d.url, alone)
        assert code == 200, body
        reason = models(d.url)[alone]["llamad"]["fit"]["reason"]
        assert "tried alone, as llama-server would be: by llamad's estimate it needs" in reason
        assert f"model {alone}: {reason}" in d.log()
        async with s.post(d.url + "/models/unload", json={"model": alone}) as r:
            assert r.status == 200, await r.text()
        wait_state(d.url, alone, "unloaded", timeout=60)
        # The pinned model too is tried alone; then nothing else may be.
        code, body = await chat(s, d.url, pinned)
        assert code == 200, body
        code, body = await chat(s, d.url, alone)
        assert code == 503, body
        assert f"cannot load {alone}: needs" in body["error"]["message"], body
        assert f"llama-server@{alone}.service" not in d.model_units()


async def test_distinct_prompts_fill_the_prompt_cache_no_further_than_its_bound(
        llamad_factory: Factory) -> None:
    """llama-server keeps the KV state of each prompt a slot moves on from in a cache in
    host RAM, 8 GiB by default, unplanned. llamad bounds it by the model's KV cache size
    (72 MiB for Gemma at -c 4096 -np 4): once it is full, more distinct prompts add nothing.
    Each ~250-token prompt added about 7 MiB before."""
    name = "fit-prompt-cache"
    unit = f"llama-server@{name}.service"
    d = llamad_factory([name])
    info = combine([read_header(rig.GEMMA)], None)
    bound = prompt_cache_mib(info, ["-c", "4096", "-np", "4"])
    assert bound == 72
    sizes = []
    async with aiohttp.ClientSession() as s:
        for i in range(30):
            text = f"Story {i}: " + " ".join(f"w{i}x{j}" for j in range(60))
            async with s.post(d.url + "/completion", json={
                    "model": name, "prompt": text, "n_predict": 1}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["tokens_evaluated"] > 200
            sizes.append(d.memory_of("VmRSS", unit))
    grown = (sizes[-1] - sizes[19]) / MIB  # the cache filled in about 15
    print(f"\nllama-server's RSS after each prompt (MiB): {[s // MIB for s in sizes]}")
    assert grown < 20, f"{grown:.1f} MiB more over the last 10 distinct prompts"
    argv = d.show(unit, "ExecStart")
    assert f"--cache-ram {bound} " in argv, argv
