"""Table-driven tests of the pure scheduler: each row is a snapshot and the decision it gives."""

from __future__ import annotations

from dataclasses import dataclass

from llamad.memory.types import GpuFree, Memory, Resources
from llamad.supervisor.events import State
from llamad.supervisor.scheduler import (
    Decision,
    Drain,
    Load,
    ModelView,
    Policy,
    Reject,
    Serve,
    Wait,
    decide,
    expired,
    ttl_left,
    victims,
)

G = 1024**3


def gpu(index: int, free_gib: float, total_gib: float = 80) -> GpuFree:
    return GpuFree(index, int(free_gib * G), int(total_gib * G))


def vram(gib: float) -> Memory:
    return Memory(ram=0, vram=int(gib * G))


def ram(gib: float) -> Memory:
    return Memory(ram=int(gib * G), vram=0)


def ready(name: str, used: Memory, last_used: float = 0.0, on: tuple[int, ...] = (0,),
          **kw: object) -> ModelView:
    gpus = on if used.vram else ()
    return ModelView(name, State.READY, last_used=last_used, need=used, used=used, gpus=gpus,
                     **kw)  # type: ignore[arg-type]


def new(need: Memory, **kw: object) -> ModelView:
    return ModelView("t", State.UNLOADED, need=need, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Case:
    name: str
    target: ModelView
    others: tuple[ModelView, ...]
    res: Resources
    want: Decision
    policy: Policy = Policy.LRU
    explicit: bool = False


ONE_GPU = (gpu(0, 10),)

CASES = [
    Case("ready target is served", ready("t", vram(1)), (), Resources(0, ONE_GPU), Serve("t")),
    Case("starting target waits", ModelView("t", State.STARTING), (), Resources(0, ONE_GPU),
         Wait("t", "starting")),
    Case("loading target waits", ModelView("t", State.LOADING), (), Resources(0, ONE_GPU),
         Wait("t", "loading")),
    Case("stopping target waits, then loads again", ModelView("t", State.STOPPING), (),
         Resources(0, ONE_GPU), Wait("t", "stopping; it loads again once stopped")),
    Case("explicit load retries a failed model",
         ModelView("t", State.FAILED, need=vram(4), reason="out of memory"), (),
         Resources(0, ONE_GPU), Load("t", (), (0,)), explicit=True),
    Case("explicit load of a ready model just serves", ready("t", vram(1)), (),
         Resources(0, ONE_GPU), Serve("t"), explicit=True),
    Case("fits in free VRAM", new(vram(4)), (), Resources(0, ONE_GPU), Load("t", (), (0,))),
    Case("evict one", new(vram(5)), (ready("a", vram(4)),), Resources(0, (gpu(0, 2),)),
         Load("t", ("a",), (0,))),
    Case("evict several, oldest first", new(vram(6)),
         (ready("a", vram(3), 1), ready("b", vram(3), 2), ready("c", vram(3), 3)),
         Resources(0, (gpu(0, 1),)), Load("t", ("a", "b"), (0,))),
    Case("keep a victim the load does not need gone", new(vram(8)),
         (ready("a", vram(1), 1), ready("b", vram(8), 2)), Resources(0, (gpu(0, 0),)),
         Load("t", ("b",), (0,))),
    Case("pinned model skipped", new(vram(8)),
         (ready("a", vram(8), 1, pinned=True), ready("b", vram(8), 2)),
         Resources(0, (gpu(0, 0),)), Load("t", ("b",), (0,))),
    Case("busy model skipped", new(vram(8)),
         (ready("a", vram(8), 1, in_flight=2), ready("b", vram(8), 2, queued=1),
          ready("c", vram(8), 3)),
         Resources(0, (gpu(0, 0),)), Load("t", ("c",), (0,))),
    Case("only a busy model frees enough: drain it", new(vram(8)),
         (ready("a", vram(8), 1, in_flight=1), ready("b", vram(1), 2)),
         Resources(0, (gpu(0, 1),)), Drain("t", ("a",))),
    Case("a stopping model frees enough: wait for it", new(vram(8)),
         (ModelView("a", State.STOPPING, need=vram(8), used=vram(8), gpus=(0,), pinned=True),),
         Resources(0, (gpu(0, 1),)), Drain("t", ("a",))),
    Case("a loading model holds its whole need", new(vram(4)),
         (ModelView("a", State.LOADING, queued=1, need=vram(8), used=vram(1), gpus=(0,)),),
         Resources(0, (gpu(0, 10),)), Drain("t", ("a",))),
    Case("unmeasured ready model frees its need", new(vram(5)),
         (ModelView("a", State.READY, need=vram(6), gpus=(0,)),),
         Resources(0, (gpu(0, 1),)), Load("t", ("a",), (0,))),
    Case("reserve kept free", new(vram(4.5)), (ready("a", vram(2)),),
         Resources(16 * G, (gpu(0, 5),), reserve=1 * G), Load("t", ("a",), (0,))),
    Case("count limit evicts the oldest", new(vram(1)),
         (ready("a", vram(1), 5), ready("b", vram(1), 1)),
         Resources(0, ONE_GPU, models_max=2), Load("t", ("b",), (0,), overlap=True)),
    Case("count limit counts starting models", new(vram(1)),
         (ModelView("a", State.STARTING, queued=1), ready("b", vram(1), 1)),
         Resources(0, ONE_GPU, models_max=2), Load("t", ("b",), (0,), overlap=True)),
    Case("count limit with only busy models: drain", new(vram(1)),
         (ready("a", vram(1), 1, in_flight=1),), Resources(0, ONE_GPU, models_max=1),
         Drain("t", ("a",))),
    Case("policy lru", new(vram(1)),
         (ready("a", vram(2), 1, load_seconds=30.0), ready("b", vram(6), 2, load_seconds=50.0),
          ready("c", vram(3), 3, load_seconds=5.0)),
         Resources(0, ONE_GPU, models_max=3), Load("t", ("a",), (0,), overlap=True)),
    Case("policy largest", new(vram(1)),
         (ready("a", vram(2), 1, load_seconds=30.0), ready("b", vram(6), 2, load_seconds=50.0),
          ready("c", vram(3), 3, load_seconds=5.0)),
         Resources(0, ONE_GPU, models_max=3), Load("t", ("b",), (0,), overlap=True),
         Policy.LARGEST),
    Case("policy cheapest-reload", new(vram(1)),
         (ready("a", vram(2), 1, load_seconds=30.0), ready("b", vram(6), 2, load_seconds=50.0),
          ready("c", vram(3), 3, load_seconds=5.0)),
         Resources(0, ONE_GPU, models_max=3), Load("t", ("c",), (0,), overlap=True),
         Policy.CHEAPEST_RELOAD),
    Case("GPU with the most room", new(vram(5)), (), Resources(0, (gpu(0, 3), gpu(1, 6))),
         Load("t", (), (1,))),
    Case("no eviction when another GPU has room", new(vram(3)), (ready("a", vram(6)),),
         Resources(0, (gpu(0, 2), gpu(1, 4))), Load("t", (), (1,))),
    Case("evict on the GPU where it then fits", new(vram(7)),
         (ready("a", vram(6), 1, on=(0,)),), Resources(0, (gpu(0, 2), gpu(1, 4))),
         Load("t", ("a",), (0,))),
    Case("model pinned to a device stays there", new(vram(4), devices=(0,)),
         (ready("a", vram(4), on=(0,)),), Resources(0, (gpu(0, 2), gpu(1, 20))),
         Load("t", ("a",), (0,))),
    Case("split spreads over GPUs", new(vram(6), split=True), (),
         Resources(0, (gpu(0, 4), gpu(1, 4))), Load("t", (), (0, 1))),
    Case("several devices split among themselves", new(vram(6), devices=(1, 2)), (),
         Resources(0, (gpu(0, 40), gpu(1, 3), gpu(2, 3))), Load("t", (), (1, 2))),
    Case("evicting a split model frees its share on each GPU", new(vram(5), devices=(1,)),
         (ready("a", vram(8), on=(0, 1)),), Resources(0, (gpu(0, 0), gpu(1, 1))),
         Load("t", ("a",), (1,))),
    Case("CPU only: fits in RAM", new(Memory(ram=1 * G, vram=2 * G)), (),
         Resources(4 * G), Load("t", (), ())),
    Case("CPU only: evicts by RAM", new(ram(3)), (ready("a", ram(3)),),
         Resources(1 * G), Load("t", ("a",), ())),
    Case("RAM need checked on GPU machines too", new(Memory(ram=3 * G, vram=1 * G)),
         (ready("a", Memory(ram=3 * G, vram=1 * G)),),
         Resources(1 * G, ONE_GPU), Load("t", ("a",), (0,))),
    Case("RAM budget caps what models use", new(ram(4)), (ready("a", ram(6)),),
         Resources(100 * G, ram_budget=8 * G), Load("t", ("a",), ())),
    Case("a failed model holds nothing", new(vram(4)),
         (ModelView("a", State.FAILED, need=vram(8), gpus=(0,)),),
         Resources(0, (gpu(0, 5),), models_max=1), Load("t", (), (0,))),
]


def test_decide(subtests) -> None:  # type: ignore[no-untyped-def]
    for case in CASES:
        with subtests.test(case.name):
            models = {m.id: m for m in (case.target, *case.others)}
            got = decide("t", models, case.res, case.policy, explicit=case.explicit)
            assert got == case.want


@dataclass(frozen=True)
class RejectCase:
    name: str
    target: ModelView
    others: tuple[ModelView, ...]
    res: Resources
    says: tuple[str, ...]


REJECTS = [
    RejectCase("failed model without an explicit load",
               ModelView("t", State.FAILED, reason="out of memory"), (), Resources(0, ONE_GPU),
               ("failed: out of memory", "POST /models/load")),
    RejectCase("cannot fit even after evicting every unpinned model", new(vram(8)),
               (ready("a", vram(4), pinned=True), ready("b", vram(2), in_flight=1)),
               Resources(0, (gpu(0, 1),)),
               ("needs 8.0 GiB of VRAM", "3.0 GiB free on the best GPU")),
    RejectCase("split cannot fit beside a pinned model", new(vram(9), split=True),
               (ready("a", ram(1), pinned=True),), Resources(8 * G, (gpu(0, 4), gpu(1, 4))),
               ("needs 9.0 GiB of VRAM", "8.0 GiB free on its GPUs together")),
    RejectCase("reserve counts against the fit", new(vram(4.5)),
               (ready("a", ram(1), pinned=True),), Resources(16 * G, (gpu(0, 5),), reserve=1 * G),
               ("needs 4.5 GiB", "4.0 GiB free")),
    RejectCase("alone, but past memory-budget-mb", new(ram(6)), (),
               Resources(64 * G, ram_budget=4 * G), ("needs 6.0 GiB of RAM", "4.0 GiB free")),
    RejectCase("pinned to a GPU that is not there", new(vram(1), devices=(3,)), (),
               Resources(0, ONE_GPU), ("needs 1.0 GiB of VRAM", "0.0 GiB free")),
    RejectCase("CPU only: not enough RAM", new(Memory(ram=3 * G, vram=3 * G)),
               (ready("a", ram(2), pinned=True),), Resources(5 * G),
               ("needs 6.0 GiB of RAM", "5.0 GiB free")),
    RejectCase("count limit with every model pinned", new(vram(1)),
               (ready("a", vram(1), pinned=True),), Resources(0, ONE_GPU, models_max=1),
               ("models-max 1 reached", "pinned")),
]


def test_reject_says_why_and_stops_nothing(subtests) -> None:  # type: ignore[no-untyped-def]
    for case in REJECTS:
        with subtests.test(case.name):
            models = {m.id: m for m in (case.target, *case.others)}
            got = decide("t", models, case.res, Policy.LRU)
            assert isinstance(got, Reject), got
            assert got.status == 503
            failed = case.target.state is State.FAILED
            assert got.code == ("model_failed" if failed else "cannot_fit")
            for phrase in case.says:
                assert phrase in got.message


ALONE = [
    Case("nothing else loaded: RAM short", new(ram(6)), (), Resources(4 * G), Load("t")),
    Case("nothing else loaded: VRAM short, the GPU with the most room", new(vram(12)), (),
         Resources(64 * G, (gpu(0, 4), gpu(1, 10))), Load("t", (), (1,))),
    Case("split, short on its GPUs together", new(vram(9), split=True), (),
         Resources(0, (gpu(0, 4), gpu(1, 4))), Load("t", (), (0, 1))),
    Case("the reserve alone makes it short", new(vram(4.5)), (),
         Resources(16 * G, (gpu(0, 5),), reserve=1 * G), Load("t", (), (0,))),
    Case("every idle model is stopped first", new(ram(6)),
         (ready("a", ram(1), 1), ready("b", ram(1), 2)), Resources(3 * G),
         Load("t", ("a", "b"))),
    Case("a busy model drains first", new(ram(6)),
         (ready("a", ram(1), 1), ready("b", ram(1), 2, in_flight=1)), Resources(3 * G),
         Drain("t", ("b",))),
]


def test_alone_it_is_tried_whatever_the_estimate(subtests) -> None:  # type: ignore[no-untyped-def]
    """Where the estimate (an upper bound) fits nowhere, even once every unpinned model is
    gone, llamad still tries the model alone, as llama-server alone would be tried: its own
    verdict decides. The reason says so."""
    for case in ALONE:
        with subtests.test(case.name):
            models = {m.id: m for m in (case.target, *case.others)}
            got = decide("t", models, case.res, case.policy)
            if isinstance(got, Load):
                assert got.fit is not None and "tried alone" in got.fit.reason, got
                assert f"it needs {case.target.need.ram + case.target.need.vram:,}" not in \
                    got.fit.reason
                got = Load(got.model, got.evict, got.gpus, got.overlap)
            assert got == case.want


def test_victims_order_per_policy(subtests) -> None:  # type: ignore[no-untyped-def]
    models = [
        ready("old-small", vram(1), 1, load_seconds=9.0),
        ready("mid-big", vram(9), 2),  # load time never measured
        ready("new-mid", vram(4), 3, load_seconds=2.0),
        ModelView("unmeasured", State.READY, last_used=4, need=vram(5), gpus=(0,)),
        ready("busy", vram(20), 0, in_flight=1, load_seconds=0.1),
        ready("pinned", vram(20), 0, pinned=True, load_seconds=0.1),
        ModelView("loading", State.LOADING, need=vram(30), load_seconds=0.1),
    ]
    table = [
        (Policy.LRU, ("old-small", "mid-big", "new-mid", "unmeasured")),
        # Not measured yet: its estimated need stands in for its use.
        (Policy.LARGEST, ("mid-big", "unmeasured", "new-mid", "old-small")),
        (Policy.CHEAPEST_RELOAD, ("new-mid", "old-small", "mid-big", "unmeasured")),
    ]
    for policy, want in table:
        with subtests.test(policy.value):
            assert victims(models, policy) == want


def test_idle_ttl_expiry(subtests) -> None:  # type: ignore[no-untyped-def]
    now = 1000.0
    table = [
        ("no TTL keeps it", ready("m", vram(1), 0), None, False),
        ("negative TTL keeps it", ready("m", vram(1), 0), -1.0, False),
        ("TTL 0 stops it once idle", ready("m", vram(1), now), 0.0, True),
        ("TTL not yet run out", ready("m", vram(1), now - 100), 300.0, False),
        ("TTL run out", ready("m", vram(1), now - 400), 300.0, True),
        ("busy model is never stopped", ready("m", vram(1), 0, in_flight=1), 1.0, False),
        ("queued requests keep it", ready("m", vram(1), 0, queued=1), 1.0, False),
        ("pinned model is never stopped", ready("m", vram(1), 0, pinned=True), 1.0, False),
        ("loading model is not stopped", ModelView("m", State.LOADING), 1.0, False),
    ]
    for name, model, ttl, stops in table:
        with subtests.test(name):
            assert expired([model], now, {"m": ttl}) == (("m",) if stops else ())


def test_expired_oldest_first_and_ttl_left() -> None:
    models = [ready("b", vram(1), 50), ready("a", vram(1), 10), ready("c", vram(1), 95)]
    ttls: dict[str, float | None] = {"a": 30.0, "b": 30.0, "c": 30.0}
    assert expired(models, 100.0, ttls) == ("a", "b")
    assert ttl_left(models[2], 100.0, 30.0) == 25.0
    assert ttl_left(models[0], 100.0, None) is None


def test_state_values_match_the_api() -> None:
    assert [s.value for s in State] == [
        "unloaded", "starting", "loading", "ready", "sleeping", "stopping", "failed"]
    assert Policy("cheapest-reload") is Policy.CHEAPEST_RELOAD
