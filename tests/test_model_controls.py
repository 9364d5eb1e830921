"""Per-model controls (issue #24) without systemd: the concurrency gate, preset keys and
their errors, flag tables from --help, draft sidecars, sleeping models in the scheduler and
the supervisor (systemd faked at the Units boundary, llama-server at its HTTP routes)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import rig
from helpers import ggufgen
from helpers.supervised import Rig, catalog, serving, with_config

from llamad.catalog import flagtable
from llamad.catalog.catalog import scan
from llamad.catalog.llama_flags import FLAGS
from llamad.catalog.presets import ModelSettings, load_presets, model_settings, parse_presets
from llamad.config import Config
from llamad.errors import ConfigError, TooManyRequests, Unavailable
from llamad.memory.types import GpuFree, Memory, Resources
from llamad.supervisor import unitspec
from llamad.supervisor.concurrency import Gate
from llamad.supervisor.events import Cause, Change, State
from llamad.supervisor.scheduler import (
    Drain,
    ModelView,
    Policy,
    Serve,
    Wake,
    decide,
    expired,
    victims,
)
from llamad.systemd import unitpaths

M = Path("/m/x.gguf")
G = 1024**3
SERVER = rig.LLAMA_SERVER

@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[Rig]:
    """A supervisor on a fake systemd, fake llama-servers (helpers/supervised.py)."""
    async with serving(tmp_path) as r:
        yield r


# -- the gate ----------------------------------------------------------------------------


async def test_the_gate_lets_n_in_and_the_rest_in_arrival_order() -> None:
    gate, order = Gate(), []

    async def request(name: str) -> None:
        await gate.enter(1, 5)
        order.append(name)

    await gate.enter(1, 5)  # the first is in
    waiting = [asyncio.ensure_future(request(n)) for n in "abc"]
    await asyncio.sleep(0)
    assert gate.waiting == 3 and gate.inside == 1
    for _ in "abc":
        gate.leave(1)
        await asyncio.sleep(0)
    await asyncio.gather(*waiting)
    assert order == ["a", "b", "c"] and gate.inside == 1


async def test_a_waiter_that_leaves_is_dropped_and_a_place_granted_to_it_passes_on() -> None:
    gate = Gate()
    await gate.enter(1, 5)
    gone = asyncio.ensure_future(gate.enter(1, 5))
    nxt = asyncio.ensure_future(gate.enter(1, 5))
    await asyncio.sleep(0)
    gone.cancel()  # its client left
    await asyncio.gather(gone, return_exceptions=True)
    assert gate.waiting == 1
    gate.leave(1)
    await nxt  # the next in line, not the one that left
    # Granted at the very moment it gives up: the place goes on, not lost.
    late = asyncio.ensure_future(gate.enter(1, 5))
    last = asyncio.ensure_future(gate.enter(1, 5))
    await asyncio.sleep(0)
    gate.leave(1)  # grants `late`...
    late.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(late, return_exceptions=True)
    await asyncio.wait_for(last, 1)
    assert gate.inside == 1 and gate.waiting == 0


async def test_the_gate_times_out_and_follows_a_changed_limit() -> None:
    gate = Gate()
    await gate.enter(1, 5)
    with pytest.raises(TimeoutError):
        await gate.enter(1, 0.01)
    assert gate.waiting == 0 and gate.inside == 1
    waiting = [asyncio.ensure_future(gate.enter(1, 5)) for _ in range(2)]
    await asyncio.sleep(0)
    gate.pass_on(3)  # the preset now allows three
    await asyncio.gather(*waiting)
    assert gate.inside == 3
    await gate.enter(0, 0)  # no limit: never waits
    assert gate.inside == 4


async def test_the_supervisor_queues_past_the_limit_and_answers_429(
        fake: Rig, tmp_path: Path) -> None:
    (tmp_path / "presets.ini").write_text("[tiny-a]\nconcurrency-limit = 1\n")
    r = with_config(fake, queue_size=2, models_preset=tmp_path / "presets.ini")
    slot = await r.ready("tiny-a")
    assert r.sup.concurrency(slot) == 1
    first = await r.sup.acquire(slot)
    second = asyncio.ensure_future(r.sup.acquire(slot))
    await r.watch.until("one queued", lambda: slot.queued == 1)
    third = asyncio.ensure_future(r.sup.acquire(slot))
    await r.watch.until("two queued", lambda: slot.queued == 2)
    with pytest.raises(TooManyRequests) as err:
        await r.sup.acquire(slot)
    assert err.value.status == 429 and int(err.value.headers["Retry-After"]) > 0
    assert slot.in_flight == 1 and not second.done()
    r.sup.release(slot)
    assert await second is first and not third.done() and slot.in_flight == 1
    r.sup.release(slot)
    await third
    r.sup.release(slot)
    assert (slot.in_flight, slot.queued, slot.gate.inside) == (0, 0, 0)
    await r.sup.close()


async def test_without_a_limit_nothing_waits(fake: Rig) -> None:
    slot = await fake.ready("tiny-a")
    assert fake.sup.concurrency(slot) == 0
    await asyncio.gather(*(fake.sup.acquire(slot) for _ in range(5)))
    assert slot.in_flight == 5


# -- preset keys ---------------------------------------------------------------------------


def settings(text: str, model: str = "x", path: Path | None = None) -> ModelSettings:
    return model_settings(model, M, None, parse_presets(text, path).check(), {})


def test_env_concurrency_and_server_keys(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/llama-server").symlink_to(SERVER)
    s = settings("[*]\nenv = A=1, B=all\nconcurrency-limit = 4\n"
                 "[x]\nenv = B=mine, HIP_VISIBLE_DEVICES=0,1, C= spaced value \n"
                 "concurrency-limit = 1\nllama-server = bin/llama-server\n",
                 path=tmp_path / "p.ini")
    assert s.env == ("A=1", "B=mine", "HIP_VISIBLE_DEVICES=0,1", "C=spaced value")
    assert s.concurrency_limit == 1 and s.server == tmp_path / "bin/llama-server"
    y = settings("[*]\nenv = A=1\nconcurrency-limit = 4\n", "y")
    assert (y.env, y.concurrency_limit, y.server) == (("A=1",), 4, None)
    assert settings("").concurrency_limit is None  # llamad.conf's default then


def test_a_quoted_env_value_keeps_its_commas_and_equals_signs() -> None:
    s = settings('[x]\nenv = OPTS="-a, B=c", D=1, E=""\n')
    assert s.env == ("OPTS=-a, B=c", "D=1", "E=")


ENV_ERRORS = [
    ('env = A="x, B=1', "opening quote"),
    ("env = CUDA_VISIBLE_DEVICES=0", "use devices = 0,1"),
    ("env = LLAMAD_MODEL=other", "mark the units"),
    ("env = LLAMA_ARG_CTX_SIZE=1", "give it as a preset key"),
    ("env = 1BAD=x", "not NAME=value"),
    ("env = just-text", "not NAME=value"),
    ("env = A=\x1bx", "control characters"),
    ("concurrency-limit = -1", "whole number >= 0"),
    ("concurrency-limit = some", "whole number >= 0"),
    ("llama-server = ", "empty"),
]


def test_bad_values_name_file_line_key_and_why(tmp_path: Path) -> None:
    path = tmp_path / "presets.ini"
    for line, why in ENV_ERRORS:
        presets = parse_presets(f"[x]\nc = 1\n{line}\n", path)
        error = presets.errors["x"].message
        assert error.startswith(f"{path}:3 [x]") and why in error, error


def test_a_secret_in_env_is_masked_wherever_llamad_shows_it() -> None:
    s = settings("[x]\nenv = HF_TOKEN=hf_abcdef, OPENAI_API_KEY=sk-123456, PLAIN=shown\n")
    assert "hf_abcdef" not in s.preset_text and "sk-123456" not in s.preset_text
    assert "HF_TOKEN=<redacted>" in s.preset_text and "PLAIN=shown" in s.preset_text
    assert s.env[0] == "HF_TOKEN=hf_abcdef"  # the unit gets the real value


def test_a_bad_section_keeps_its_last_good_body_and_touches_only_its_model(
        tmp_path: Path) -> None:
    path = tmp_path / "presets.ini"
    path.write_text("[x]\nc = 1024\n[y]\nc = 2048\n")
    good = load_presets(path)
    assert not good.errors
    path.write_text("[x]\nc = 4096\nfrobnicate = 1\n[y]\nc = 8192\n!!\n[z]\nc = 1\n")
    edited = load_presets(path, good)
    assert set(edited.errors) == {"x", "y"}
    assert f"{path}:3 [x]: unknown key 'frobnicate'" in edited.errors["x"].message
    assert f"{path}:6 [y]: cannot parse '!!'" in edited.errors["y"].message
    assert edited.sections["x"] is good.sections["x"]  # the last good settings stay
    assert edited.sections["z"].options["--ctx-size"] == ("--ctx-size", "1")
    assert edited.error_for("x") is edited.errors["x"] and edited.error_for("z") is None
    # Never good: its good keys, so its model is listed (and refused with the error).
    fresh = load_presets(path)
    assert fresh.sections["x"].options["--ctx-size"] == ("--ctx-size", "4096")
    # [*] touches every model; an unreadable file keeps the previous sections.
    path.write_text("[*]\nbogus = 1\n[x]\nc = 1\n")
    star = load_presets(path, good)
    assert star.error_for("anything") is star.errors["*"] and star.defaults is good.defaults
    path.write_bytes(b"\xff\xfe")
    gone = load_presets(path, good)
    assert gone.errors[""].message.startswith(f"{path}: the preset file cannot be read")
    assert gone.sections is good.sections
    with pytest.raises(ConfigError, match="frobnicate"):
        parse_presets("[x]\nfrobnicate = 1\n").check()


def test_a_model_touched_by_an_error_is_refused_with_it(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for name in ("a", "b"):
        os.utime(ggufgen.write_model(models / f"{name}.gguf"), (0, 0))
    (tmp_path / "presets.ini").write_text("[a]\nfrobnicate = 1\n")
    cfg = Config.default(models_dirs=(models,), llama_cache=False,
                         models_preset=tmp_path / "presets.ini")
    snap = scan(cfg)
    assert snap.models["a"].error is not None and "frobnicate" in snap.models["a"].error
    assert snap.models["b"].error is None
    assert snap.error is not None and "presets.ini:2 [a]" in snap.error


# -- flag tables from --help ----------------------------------------------------------------


def test_the_pinned_binarys_help_gives_back_the_generated_table() -> None:
    assert SERVER.exists(), "run tools/setup-dev to build llama-server"
    text = subprocess.run([str(SERVER), "--help"], capture_output=True, text=True,
                          timeout=60).stdout
    # The same entries (--help groups them in another order): spellings, negations,
    # kinds and environment names all read right.
    assert sorted(flagtable.parse_help(text)) == sorted(FLAGS)
    assert flagtable.for_binary(SERVER) is flagtable.DEFAULT


def test_a_fork_is_read_from_its_own_help(tmp_path: Path) -> None:
    fork = tmp_path / "fork"
    fork.write_text("#!/bin/sh\ncat <<'EOF'\n"
                    "-c,    --ctx-size N                     size of the context\n"
                    "                                        (env: LLAMA_ARG_CTX_SIZE)\n"
                    "--fork-value N                          only here\n"
                    "--fork-bool, --no-fork-bool             only here\n"
                    "--fork-flag                             only here\n"
                    "EOF\n")
    fork.chmod(0o755)
    table = flagtable.for_binary(fork)
    assert table is not flagtable.DEFAULT and "ngl" not in table.by_key
    assert table.by_key["fork-value"][0].kind == "value"
    assert table.by_key["no-fork-bool"] == (table.by_key["fork-bool"][0], True)
    assert table.by_key["fork-flag"][0].kind == "flag"
    assert table.by_key["LLAMA_ARG_CTX_SIZE"][0].canonical == "--ctx-size"
    p = parse_presets(f"[x]\nllama-server = {fork}\nfork-value = 3\nngl = 1\n"
                      f"[y]\nfork-value = 3\n")
    assert "unknown key 'ngl'" in p.errors["x"].message and f"(flags of {fork})" in \
        p.errors["x"].message
    assert "unknown key 'fork-value'" in p.errors["y"].message
    assert p.sections["x"].options["--fork-value"] == ("--fork-value", "3")
    (tmp_path / "plain").write_text("not a program")
    assert "not an executable file" in parse_presets(
        f"[x]\nllama-server = {tmp_path / 'plain'}\n").errors["x"].message


def test_what_help_said_is_remembered_across_starts_while_the_binary_is_unchanged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    fork = tmp_path / "fork"
    fork.write_text(f"#!/bin/sh\necho run >> {runs}\n"
                    "echo '--fork-value N                          only here'\n")
    fork.chmod(0o755)
    store = tmp_path / "state" / "llama-server-flags.json"
    store.parent.mkdir()
    monkeypatch.setattr(flagtable, "_tables", {})
    flagtable.remember_in(store)
    try:
        assert "fork-value" in flagtable.for_binary(fork).by_key
        assert flagtable.for_binary(SERVER) is flagtable.DEFAULT
        monkeypatch.setattr(flagtable, "_tables", {})  # the next start of llamad
        assert "fork-value" in flagtable.for_binary(fork).by_key
        assert flagtable.for_binary(SERVER) is flagtable.DEFAULT
        assert runs.read_text().count("run") == 1
        fork.write_text(fork.read_text().replace("fork-value", "other-value"))
        monkeypatch.setattr(flagtable, "_tables", {})
        assert "other-value" in flagtable.for_binary(fork).by_key  # changed: asked again
        assert runs.read_text().count("run") == 2
        store.write_text("{damaged")  # only costs running --help again
        monkeypatch.setattr(flagtable, "_tables", {})
        assert "other-value" in flagtable.for_binary(fork).by_key
        assert runs.read_text().count("run") == 3
    finally:
        flagtable.remember_in(None)


def test_check_config_warns_about_a_preset_binary_units_cannot_run(tmp_path: Path) -> None:
    hidden = tmp_path / "llama-server"  # under /tmp: PrivateTmp hides it from model units
    hidden.symlink_to(SERVER)
    found = unitpaths.server_problems(Config.default(), {"presets.ini [x]": hidden})
    assert len(found) == 1 and found[0].startswith(f"presets.ini [x]: llama-server: {hidden} "
                                                   "is under /tmp")
    assert unitpaths.server_problems(Config.default(), {"presets.ini [x]": Path("/bin/true")}) \
        == []  # where every user may run it


# -- draft sidecars -------------------------------------------------------------------------


def test_draft_sidecars_are_paired_as_llama_cpp_does(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for path in ("pair/model.gguf", "pair/mtp-model.gguf", "two/m.gguf",
                 "two/dflash-b.gguf", "two/dspark-a.gguf", "top.gguf", "mtp-top.gguf"):
        os.utime(ggufgen.write_model(models / path), (0, 0))
    snap = scan(Config.default(models_dirs=(models,), llama_cache=False, models_preset=None))
    assert set(snap.models) == {"pair", "two", "top"}
    pair = snap.models["pair"]
    assert pair.draft is not None  # its header, for the memory estimate (companions.py)
    args = pair.settings.args
    assert args[args.index("--model-draft") + 1] == str(models / "pair/mtp-model.gguf")
    two = snap.models["two"].settings.args
    assert two[two.index("--model-draft") + 1] == str(models / "two/dflash-b.gguf")  # sorted
    assert any("several model, projector or draft files" in p for p in snap.problems)
    assert "--model-draft" not in snap.models["top"].settings.args
    # A preset's own draft wins over the sidecar.
    (tmp_path / "p.ini").write_text("[pair]\nmodel-draft = /other.gguf\n")
    snap = scan(Config.default(models_dirs=(models,), llama_cache=False,
                               models_preset=tmp_path / "p.ini"))
    args = snap.models["pair"].settings.args
    assert args.count("--model-draft") == 1 and "/other.gguf" in args


def test_a_model_waits_for_its_draft_to_be_written(tmp_path: Path) -> None:
    models = tmp_path / "models"
    os.utime(ggufgen.write_model(models / "pair/model.gguf"), (0, 0))
    ggufgen.write_model(models / "pair/mtp-model.gguf")  # just now: still being written
    snap = scan(Config.default(models_dirs=(models,), llama_cache=False, models_preset=None))
    assert "pair" not in snap.models and "pair" in snap.settling


# -- the unit ------------------------------------------------------------------------------


def test_env_and_binary_reach_the_unit_and_its_digest(tmp_path: Path) -> None:
    models = tmp_path / "models"
    os.utime(ggufgen.write_model(models / "a.gguf"), (0, 0))
    (tmp_path / "p.ini").write_text("[a]\nenv = GGML_X=1\nllama-server = /opt/fork/server\n")
    cfg = Config.default(models_dirs=(models,), llama_cache=False, models_preset=None)
    plain = scan(cfg).models["a"]
    spec = unitspec.build(cfg, plain, "unix:/run/llamad/a/llama.sock", (), None)
    # Without env the digest is the argv's alone, as before: running units still match.
    assert spec.markers is not None
    assert spec.markers.args == hashlib.sha256("\0".join(spec.argv).encode()).hexdigest()[:16]
    cfg2 = Config.default(models_dirs=(models,), llama_cache=False,
                          models_preset=tmp_path / "p.ini")
    model = scan(cfg2).models["a"]
    spec2 = unitspec.build(cfg2, model, "unix:/run/llamad/a/llama.sock", (), None)
    assert spec2.argv[0] == "/opt/fork/server" and spec2.environment[0] == "GGML_X=1"
    assert spec2.markers is not None and spec2.markers.args != spec.markers.args
    same_argv = dataclasses.replace(spec2, argv=spec.argv)  # env alone changes the digest
    assert unitspec.args_digest(same_argv.argv, ("GGML_X=1",)) != spec.markers.args

# -- sleeping ----------------------------------------------------------------------------------


def view(name: str, state: State, need: float, used: float = 0, **kw: Any) -> ModelView:
    return ModelView(name, state, need=Memory(int(need * G), 0),
                     used=Memory(int(used * G), 0), **kw)


def test_waking_takes_back_only_what_sleeping_freed() -> None:
    res = Resources(int(1 * G), ())  # 1 GiB free
    asleep = view("s", State.SLEEPING, need=3, used=2.5)
    assert decide("s", {"s": asleep}, res, Policy.LRU) == Wake("s")
    deep = view("s", State.SLEEPING, need=3, used=0.5)  # needs 2.5 GiB back: evict b
    b = view("b", State.READY, need=2, used=2, last_used=1)
    assert decide("s", {"s": deep, "b": b}, res, Policy.LRU) == Wake("s", ("b",))
    busy = view("b", State.READY, need=2, used=2, in_flight=1)
    assert isinstance(decide("s", {"s": deep, "b": busy}, res, Policy.LRU), Drain)
    # What a sleeping model freed is room for another model: a 1.5 GiB load fits beside it.
    new = view("n", State.UNLOADED, need=1.5)
    freed = Resources(int(2 * G), ())
    assert decide("n", {"n": new, "s": deep}, freed, Policy.LRU).evict == ()  # type: ignore
    awake = view("a", State.READY, need=3, used=3)
    assert decide("n", {"n": new, "a": awake}, Resources(int(1 * G), ()),
                  Policy.LRU).evict == ("a",)  # type: ignore[union-attr]


def test_a_sleeping_model_is_evicted_and_stopped_by_ttl_like_a_ready_one() -> None:
    asleep = view("s", State.SLEEPING, need=3, used=0.5, last_used=1)
    assert victims([asleep], Policy.LRU) == ("s",)
    assert expired([asleep], 100, {"s": 10}) == ("s",)
    assert decide("s", {"s": view("s", State.READY, 1, 1)}, Resources(0, ()),
                  Policy.LRU) == Serve("s")
    gpu = Resources(0, (GpuFree(0, 1 * G, 80 * G), GpuFree(1, 70 * G, 80 * G)))
    on0 = ModelView("s", State.SLEEPING, need=Memory(0, 4 * G), used=Memory(0, 1 * G),
                    gpus=(0,))
    # It wakes on its own GPU: 3 GiB more than it holds, with 1 GiB free there. Beside a
    # pinned model it cannot; alone it is tried, as llama-server alone reloads when asked.
    pinned = ModelView("p", State.READY, pinned=True, need=Memory(0, G), used=Memory(0, G),
                       gpus=(1,))
    assert not isinstance(decide("s", {"s": on0, "p": pinned}, gpu, Policy.LRU), Wake)
    assert decide("s", {"s": on0}, gpu, Policy.LRU) == Wake("s")


async def test_a_model_that_sleeps_is_shown_so_and_a_request_wakes_it(fake: Rig,
                                                                        tmp_path: Path) -> None:
    (tmp_path / "presets.ini").write_text("[tiny-a]\nsleep-idle-seconds = 5\n")
    catalog(fake, models_preset=tmp_path / "presets.ini")
    heard: list[Change] = []
    fake.sup.events.subscribe(heard.append)
    slot = await fake.ready("tiny-a")
    await ask(fake)
    assert slot.state is State.READY  # awake, as /props says
    fake.servers.sleeping.add("tiny-a")
    await ask(fake)
    assert slot.state is State.SLEEPING  # type: ignore[comparison-overlap]  # changed by ask()
    backend = await fake.sup.acquire(slot)  # a request wakes it, in the same process
    assert slot.state is State.READY and backend is slot.backend
    assert [(c.new, c.cause) for c in heard][-2:] == [(State.SLEEPING, Cause.SLEEP),
                                                       (State.READY, Cause.WAKE)]
    assert fake.units.started == [slot.unit]  # no new start
    fake.sup.release(slot)
    # Woken by something else (llama-server says it is awake): ready again.
    await ask(fake)
    assert slot.state is State.SLEEPING
    fake.servers.sleeping.discard("tiny-a")
    await ask(fake)
    assert slot.state is State.READY
    # A model without --sleep-idle-seconds is never asked.
    other = await fake.ready("tiny-b")
    fake.servers.sleeping.add("tiny-b")
    await ask(fake)
    assert other.state is State.READY


async def ask(r: Rig) -> None:
    """What the daemon's tick does once a second, here awaited to its end."""
    r.sup.watch_sleep()
    await asyncio.gather(*(t for t in asyncio.all_tasks()
                           if t.get_name().startswith("asking whether it sleeps")))


async def test_a_preset_error_refuses_only_its_model(fake: Rig, tmp_path: Path) -> None:
    (tmp_path / "presets.ini").write_text("[tiny-a]\nfrobnicate = 1\n")
    catalog(fake, models_preset=tmp_path / "presets.ini")
    with pytest.raises(Unavailable) as err:
        await fake.sup.acquire(fake.slot("tiny-a"))
    assert err.value.code == "configuration_error" and "frobnicate" in err.value.message
    with pytest.raises(Unavailable):
        await fake.sup.load(fake.slot("tiny-a"))
    assert fake.units.started == []
    await fake.ready("tiny-b")


async def test_a_sleeping_model_evicted_is_wanted_back_as_a_ready_one(fake: Rig,
                                                                      tmp_path: Path) -> None:
    """restore = yes (guards/comeback.py) brings back an evicted model; one that slept
    when it was evicted is no different."""
    (tmp_path / "presets.ini").write_text("[tiny-a]\nrestore = true\n")
    catalog(fake, models_preset=tmp_path / "presets.ini")
    fake.sup.events.emit(Change("tiny-a", State.SLEEPING, State.STOPPING, Cause.EVICT_COUNT,
                                at=1.0))
    assert fake.sup.comeback.wanted == {"tiny-a": 1.0}
