"""llama.cpp RPC workers of a model (rpc.py, rpcguard.py, memory.estimate_rpc).

Workers here are real TCP listeners on loopback (what llamad checks of a worker is that it
accepts a connection); systemd is faked at the Units boundary (helpers/fakesystemd.py) and
driven with the property changes it sends. tests/integration/test_rpc_workers.py runs the real
ggml-rpc-server and llama-server on the box.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from helpers.ggufgen import write_model
from helpers.ports import free_port
from helpers.supervised import MakeRig, Rig
from rig import GEMMA

from llamad.catalog import gguf_info
from llamad.catalog import rpcargs as rpc
from llamad.catalog.catalog import scan
from llamad.catalog.gguf_info import TensorBytes
from llamad.catalog.presets import parse_args, parse_presets
from llamad.config import Config
from llamad.errors import ConfigError, Unavailable
from llamad.memory import estimate as memory
from llamad.memory.types import Memory
from llamad.supervisor.events import Cause, State
from llamad.supervisor.guards import rpcguard
from llamad.systemd import units

MIB, GIB = 1024**2, 1024**3


def test_workers_are_ip_addresses_and_ports(subtests: Any) -> None:
    good = {
        "10.0.0.7:50052": ("10.0.0.7:50052",),
        "127.0.0.3:1,10.0.0.7:50052": ("127.0.0.3:1", "10.0.0.7:50052"),
        "10.0.0.7:50052,10.0.0.7:50052": ("10.0.0.7:50052",),
    }
    for value, want in good.items():
        with subtests.test(value=value):
            assert tuple(map(str, rpc.parse(value))) == want
    bad = {"gpu-box:50052": "must be an IP address", "10.0.0.7": "not HOST:PORT",
           "10.0.0.7:0": "from 1 to 65535", "10.0.0.7:65536": "from 1 to 65535",
           "10.0.0.7:x": "from 1 to 65535", "": "not HOST:PORT", "10.0.0.1:1,": "not HOST:PORT",
           # llama-server takes the value as it is: it splits at commas, keeps spaces
           # ("Cannot resolve host ' 10.0.0.2'") and connects over IPv4 alone, splitting
           # at the first colon ("Failed to parse endpoint: [::1]:50052"); both abort it.
           "10.0.0.1:1, 10.0.0.2:2": "space", " 10.0.0.1:1": "space",
           "[::1]:50052": "IPv4", "[fd00:0::7]:9": "IPv4", "fd00::7:9": "IPv4",
           "10.0.0.7:\uff15\uff10\uff10\uff15\uff12": "from 1 to 65535",  # full-width digits
           "10.0.0.7:\u00b2": "from 1 to 65535"}
    for value, why in bad.items():
        with subtests.test(value=value), pytest.raises(ValueError, match=why):
            rpc.parse(value)
    argv = ("-m", "x.gguf", "--rpc", "10.0.0.1:1,10.0.0.2:2", "--rpc", "10.0.0.1:1", "-c", "9",
            "--alias", "--rpc=10.0.0.3:1", "--rpc=10.0.0.4:1")  # values, and no = form
    assert [str(w) for w in rpc.workers(argv)] == ["10.0.0.1:1", "10.0.0.2:2"]
    assert rpc.addresses(rpc.workers(argv)) == ("10.0.0.1", "10.0.0.2")
    assert rpc.workers(("-m", "x.gguf")) == ()


def test_a_bad_rpc_value_names_file_key_value_and_what_is_allowed(tmp_path: Path) -> None:
    for text, key in (("[m]\nrpc = gpu-box:50052\n", "rpc"),
                      ("[m]\nLLAMA_ARG_RPC = gpu-box:50052\n", "LLAMA_ARG_RPC")):
        with pytest.raises(ConfigError) as err:
            parse_presets(text, tmp_path / "presets.ini").check()
        message = err.value.message
        assert str(tmp_path / "presets.ini") in message and "[m]" in message
        assert f"{key} = 'gpu-box:50052'" in message and "must be an IP address" in message
        assert "allowed: comma-separated HOST:PORT" in message
    said = re.escape("llamad.conf args: --rpc = '10.0.0.1' is invalid")
    with pytest.raises(ConfigError, match=said):
        parse_args(("--rpc", "10.0.0.1"), "llamad.conf args")
    section = parse_presets("[m]\nrpc = 10.0.0.1:50052\n").sections["m"]
    assert section.options["--rpc"] == ("--rpc", "10.0.0.1:50052")


def _props(spec: units.UnitSpec) -> dict[str, Any]:
    return {name: value for name, _, value in units.transient_properties(spec)}


def test_a_model_unit_reaches_exactly_its_workers() -> None:
    plain = _props(units.UnitSpec("u", "m", ("/bin/true",)))
    assert plain["PrivateNetwork"] is True and "IPAddressAllow" not in plain

    spec = units.UnitSpec("u", "m", ("/bin/true",), remote=("127.0.0.3", "fd00::7"))
    props = _props(spec)
    # It needs the host's network to reach them: no private one, and exactly their addresses.
    assert "PrivateNetwork" not in props
    assert props["IPAddressDeny"] == [(2, [0] * 4, 0), (10, [0] * 16, 0)]
    assert props["IPAddressAllow"] == [
        (2, [127, 0, 0, 3], 32), (10, [0xfd] + [0] * 14 + [7], 128)]
    assert props["RestrictAddressFamilies"] == (True, ["AF_UNIX", "AF_INET", "AF_INET6"])

    tcp = _props(units.UnitSpec("u", "m", ("/bin/true",), tcp=True, remote=("10.1.2.3",)))
    assert tcp["IPAddressAllow"] == [(2, [127, 0, 0, 0], 8), (10, [0] * 15 + [1], 128),
                                     (2, [10, 1, 2, 3], 32)]


@pytest.fixture
def rpc_config(tmp_path: Path) -> Config:
    models = tmp_path / "models"
    for name in ("tiny", "other", "local"):
        os.utime(write_model(models / f"{name}.gguf"), (0, 0))
    (tmp_path / "presets.ini").write_text("")
    return Config.default(models_dirs=(models,), llama_cache=False,
                          models_preset=tmp_path / "presets.ini",
                          state_dir=tmp_path / "state", memory_reserve_mb=0, queue_timeout=5)


def with_workers(config: Config, **workers: str) -> Config:
    assert config.models_preset is not None
    config.models_preset.write_text("".join(f"[{m}]\nrpc = {w}\n" for m, w in workers.items()))
    return config


Make = Callable[..., Rig]


@pytest.fixture
def make(rpc_config: Config, make_rig: MakeRig) -> Make:
    """A rig whose models have these workers (model=workers), closed after the test."""
    return lambda **workers: make_rig(with_workers(rpc_config, **workers))


def test_the_unit_of_an_rpc_model(make: Make) -> None:
    r = make(tiny="127.0.0.3:50052")
    sup = r.sup
    spec, _ = sup.spec(sup.slots["tiny"])
    assert spec.argv[spec.argv.index("--rpc") + 1] == "127.0.0.3:50052"
    assert spec.remote == ("127.0.0.3",)
    assert sup.spec(sup.slots["local"])[0].remote == ()


# -- memory: only the local share counts -------------------------------------------------


def test_local_share_of_gemma_over_one_worker(rpc_config: Config) -> None:
    """Gemma 3 270M at -c 2048 -np 1 over one worker, on this box (docs/benchmarks.md):
    llama-server's RSS 231 MiB after loading (the 170 MiB token embedding stays mapped),
    463 MiB at its peak, of which 241 MiB are the file's pages (the kernel may drop them)
    and 170 MiB the embedding's copy on its way to the worker as the tied output; the
    worker holds 255 MiB."""
    info = gguf_info.combine([gguf_info.read_header(GEMMA)], None)
    args = ("-c", "2048", "-np", "1", "--rpc", "127.0.0.3:50052")
    est = memory.estimate_rpc(info, args)
    t = info.tensors
    assert t is not None and t.tied and t.input == 170 * MIB
    # The host keeps the token embedding; the worker gets the layers and the tied head.
    assert est.weights == Memory(t.input, sum(t.layers) + t.output + t.input)
    assert est.mapped == t.input  # the host's own tensors; the rest passes through
    assert 231 * MIB < est.total.ram < 463 * MIB - 241 * MIB + 231 * MIB
    assert 255 * MIB < est.total.vram < 300 * MIB
    alone = memory.estimate(info, args, gpu=False)
    assert alone.total.ram > est.total.ram - 170 * MIB  # small models gain little


class BigInfo(NamedTuple):
    """A 70B-class model's header, as far as the estimate reads it."""

    architecture: str = "llama"
    block_count: int = 80
    context_length: int = 8192
    head_count: int = 64
    head_count_kv: int = 8
    embedding_length: int = 8192
    key_length: int = 128
    value_length: int = 128
    size: int = 80 * 850 * MIB + 2 * 1050 * MIB
    feed_forward_length: int = 28672
    tensors: TensorBytes = TensorBytes((850 * MIB,) * 80, 1050 * MIB, 1050 * MIB, False, 128256)


def test_a_model_larger_than_the_host_needs_only_its_local_share() -> None:
    info = BigInfo()
    est = memory.estimate_rpc(info, ("-c", "8192", "--rpc", "10.0.0.1:1,10.0.0.2:1"))
    # The host keeps the token embedding and, while loading, one layer on its way; over two
    # workers the graph runs as a pipeline, and the host keeps four copies of its inputs
    # (memory/pipeline.py).
    assert est.total.ram < 1050 * MIB + 850 * MIB + 600 * MIB
    assert est.total.vram > info.size - 1050 * MIB
    assert memory.estimate(info, ("-c", "8192"), gpu=False).total.ram > info.size


def test_the_scheduler_counts_the_local_share(make: Make) -> None:
    r = make(tiny="127.0.0.3:50052")
    sup = r.sup
    model = sup.slots["tiny"].model
    assert model.info is not None
    local = memory.estimate_rpc(model.info, model.settings.args).total.ram
    # A learned peak counts the file's pages that passed through: not used for it.
    sup.measure.learn(model, ram=10 * GIB, vram=None, load_seconds=1.0)
    assert sup.measure.need(model) == Memory(local, 0)
    assert sup.measure.estimate(model) == Memory(local, 0)
    shown = rpcguard.describe(model.info, model.settings.args)
    assert shown is not None and shown["workers"] == ["127.0.0.3:50052"]
    assert shown["local"] == local and shown["remote"] > 0
    assert rpcguard.describe(model.info, sup.slots["local"].model.settings.args) is None


# -- workers that go away, come back, or serve another model -----------------------------


class Worker:
    """A TCP listener standing in for ggml-rpc-server (llamad only checks it accepts)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: asyncio.AbstractServer | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    w = Worker()
    await w.start()
    yield w
    if w.server is not None and w.server.is_serving():
        await w.stop()


async def serving(r: Rig, name: str, pid: int) -> asyncio.Task[Any]:
    """A request for `name`, which starts its unit; driven to READY by systemd's signals."""
    sup = r.sup
    slot = sup.slots[name]
    request = asyncio.ensure_future(sup.acquire(slot))
    await r.watch.until(f"{name} to start", lambda: slot.state is State.STARTING)
    r.units.active(sup, slot.unit, pid)
    sup.move(slot, State.READY, Cause.HEALTHY)
    await request
    sup.release(slot)
    return request


async def test_a_worker_that_is_down_refuses_the_load_at_once(make: Make,
                                                              worker: Worker) -> None:
    await worker.stop()
    r = make(tiny=worker.address)
    sup = r.sup
    with pytest.raises(Unavailable) as err:
        await sup.acquire(sup.slots["tiny"])
    assert err.value.status == 503 and err.value.code == "rpc_worker_unreachable"
    assert f"rpc worker {worker.address} does not answer (Connection refused)" in \
        err.value.message
    assert r.units.started == [] and sup.slots["tiny"].state is State.UNLOADED
    await worker.start()
    await serving(r, "tiny", 101)
    assert r.units.started == ["llama-server@tiny.service"]


async def test_a_worker_that_goes_away_fails_the_model_until_it_is_back(
        make: Make, worker: Worker) -> None:
    r = make(tiny=worker.address)
    sup = r.sup
    slot = sup.slots["tiny"]
    await serving(r, "tiny", 101)
    await worker.stop()
    # llama-server aborts at its next request and systemd schedules a restart.
    sup.on_unit_change(slot.unit, {"Result": "core-dump", "ExecMainCode": 3,
                                   "ExecMainStatus": 6})
    sup.on_unit_change(slot.unit, {"ActiveState": "activating", "SubState": "auto-restart"})
    await r.watch.until("the model to fail", lambda: slot.state is State.FAILED)
    assert slot.reason == (f"rpc worker {worker.address} went away (Connection refused); "
                           "a request loads it again once the worker answers")
    assert r.units.stopped == [slot.unit]  # no restart loop
    with pytest.raises(Unavailable, match="does not answer") as err:
        await sup.acquire(slot)  # still down: said at once, nothing started
    assert err.value.code == "rpc_worker_unreachable" and slot.state is State.FAILED
    await worker.start()
    await serving(r, "tiny", 102)  # the next request after it is back loads it again
    assert r.units.started == [slot.unit, slot.unit]
    assert slot.reason == "" and not sup.rpc.lost


async def test_a_crash_with_the_worker_still_there_is_left_to_systemd(
        make: Make, worker: Worker) -> None:
    r = make(tiny=worker.address)
    sup = r.sup
    slot = sup.slots["tiny"]
    await serving(r, "tiny", 101)
    sup.on_unit_change(slot.unit, {"ActiveState": "activating", "SubState": "auto-restart"})
    checks = list(sup.rpc.background.tasks)
    assert checks  # the guard looks at the workers after a crash...
    await asyncio.wait_for(asyncio.gather(*checks), 5)
    # ... finds them there, and leaves the restart to systemd.
    assert slot.state is State.STARTING and r.units.stopped == []


async def test_an_explicit_load_with_the_worker_down_fails_with_the_worker_named(
        make: Make, worker: Worker) -> None:
    await worker.stop()
    r = make(tiny=worker.address)
    sup = r.sup
    slot = sup.slots["tiny"]
    await sup.load(slot)  # POST /models/load and load-on-startup do not queue a request
    await r.watch.until("the model to fail", lambda: slot.state is State.FAILED)
    assert f"rpc worker {worker.address} does not answer" in slot.reason


async def test_one_worker_serves_one_model_at_a_time(make: Make,
                                                     worker: Worker) -> None:
    r = make(tiny=worker.address, other=f"{worker.address},127.0.0.9:1")
    sup = r.sup
    await serving(r, "tiny", 101)
    with pytest.raises(Unavailable) as err:
        await sup.acquire(sup.slots["other"])
    assert err.value.code == "rpc_worker_busy"
    assert err.value.message == (
        f"model other cannot load now: its rpc worker {worker.address} serves model tiny "
        "(a ggml-rpc-server serves one llama-server at a time); unload tiny or wait for "
        "its TTL")
    await serving(r, "local", 103)  # models without workers are not concerned


async def test_the_model_list_shows_the_workers(make: Make, worker: Worker) -> None:
    from llamad.api import listing
    r = make(tiny=worker.address)
    sup = r.sup
    entry = listing.entry(sup, sup.slots["tiny"])
    assert entry["llamad"]["rpc"]["workers"] == [worker.address]
    assert entry["llamad"]["need"]["ram"] == entry["llamad"]["rpc"]["local"]
    assert listing.entry(sup, sup.slots["local"])["llamad"]["rpc"] is None
    assert scan(sup.config).models["tiny"].settings.args[-2:] == ("--rpc", worker.address)
