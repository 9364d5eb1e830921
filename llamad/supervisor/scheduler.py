"""Pure scheduling decisions: serve, wait, load (evicting whom, on which GPUs), drain or reject.

Nothing here does I/O or awaits. The supervisor owns model state, hands a snapshot to `decide()`
and carries out the decision; a table of cases can test every rule without systemd.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from llamad.memory.fit import Choice, Fitter, Room
from llamad.memory.types import Memory, Resources
from llamad.sizes import GIB
from llamad.supervisor.events import State


class Policy(enum.Enum):
    LRU = "lru"
    LARGEST = "largest"
    CHEAPEST_RELOAD = "cheapest-reload"


@dataclass(frozen=True)
class ModelView:
    """One model as the supervisor sees it at the moment of the decision."""

    id: str
    state: State = State.UNLOADED
    in_flight: int = 0
    queued: int = 0
    last_used: float = 0.0  # monotonic seconds
    pinned: bool = False
    need: Memory = Memory()  # estimated, or learned from an earlier load
    used: Memory = Memory()  # measured now; zero where nothing is measured
    load_seconds: float | None = None  # learned; None = never measured
    gpus: tuple[int, ...] = ()  # GPUs it occupies while loaded
    devices: tuple[int, ...] = ()  # preset pins it to these GPUs; () = any
    split: bool = False  # preset asks to spread it over several GPUs
    reason: str = ""  # why it failed, for FAILED
    # How a load may fit it to the memory there is (memory/fit.py); None: `need` as it is.
    fit: Fitter | None = field(default=None, compare=False)
    shares: tuple[float, ...] = ()  # -ts: its VRAM over its GPUs in these proportions
    # The part of `need` a load cannot do without: less the file pages the kernel may drop
    # and read again (Measure.floor); None: all of it.
    floor: Memory | None = None

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.queued > 0


@dataclass(frozen=True)
class Serve:
    """The decision: the model is ready; forward the request."""

    model: str


@dataclass(frozen=True)
class Wait:
    """The decision: the model is starting, loading or stopping; wait for its next change."""

    model: str
    reason: str


@dataclass(frozen=True)
class Load:
    """The decision: start the model, stopping `evict` to make room."""

    model: str
    evict: tuple[str, ...] = ()
    gpus: tuple[int, ...] = ()  # CUDA_VISIBLE_DEVICES for the unit; () = CPU only
    # The evicted make room by count only: memory fits while they still run, so the
    # start need not wait for them to exit.
    overlap: bool = False
    fit: Choice | None = None  # what fitting adds to its arguments, and why


@dataclass(frozen=True)
class Wake:
    """A request for a sleeping model: llama-server reloads its weights in place (no new
    unit, no cold load). With `evict`, those are stopped first to make room for what it
    freed while asleep, and the request decides again once they are gone."""

    model: str
    evict: tuple[str, ...] = ()


@dataclass(frozen=True)
class Drain:
    """The load fits only once these busy or stopping models are gone: wait, then decide again."""

    model: str
    wait_for: tuple[str, ...]


@dataclass(frozen=True)
class Reject:
    """The decision: answer the request with an error now."""

    status: int
    message: str
    code: str = "cannot_fit"  # the error code clients and metrics see


Decision = Serve | Wait | Load | Wake | Drain | Reject

# Models whose process runs (or is on its way): they count against models-max.
_LOADED = (State.STARTING, State.LOADING, State.READY, State.SLEEPING)
_SERVING = (State.READY, State.SLEEPING)  # idle ones may be evicted or stopped by TTL
_WAITING = {State.STARTING: "starting", State.LOADING: "loading",
            State.STOPPING: "stopping; it loads again once stopped"}


def decide(target: str, models: Mapping[str, ModelView], res: Resources, policy: Policy,
           explicit: bool = False) -> Decision:
    """What to do for a request (or an explicit load, which retries a failed model) for `target`."""
    model = models[target]
    if model.state is State.READY:
        return Serve(target)
    if model.state in _WAITING:
        return Wait(target, _WAITING[model.state])
    if model.state is State.FAILED and not explicit:
        return Reject(503, f"model {target} failed: {model.reason or 'unknown reason'}; "
                           "an explicit load (POST /models/load) retries it", "model_failed")
    if model.state is State.SLEEPING:
        return _plan_wake(model, models, res, policy)
    return _plan_load(model, models, res, policy)


def _plan_wake(model: ModelView, models: Mapping[str, ModelView], res: Resources,
               policy: Policy) -> Decision:
    """Waking takes back what sleeping freed: its need less what it holds asleep (which
    measured free memory already counts as taken), on the GPUs it already has."""
    need = _need(model, res)
    held = model.used if model.used.ram or model.used.vram else need
    gpus = model.gpus or model.devices
    awake = replace(model, state=State.UNLOADED, used=Memory(),
                    need=Memory(max(0, need.ram - held.ram), max(0, need.vram - held.vram)),
                    devices=gpus, split=model.split or len(gpus) > 1)
    plan = _plan_load(awake, {**models, model.id: awake}, res, policy)
    if isinstance(plan, Load):
        return Wake(model.id, plan.evict)
    return plan


def victims(models: Iterable[ModelView], policy: Policy) -> tuple[str, ...]:
    """Models that may be stopped now (ready, idle, unpinned), the first to go first."""
    idle = [m for m in models if m.state in _SERVING and not m.busy and not m.pinned]
    if policy is Policy.LARGEST:
        idle.sort(key=lambda m: (-(_total(m.used) or _total(m.need)), m.last_used, m.id))
    elif policy is Policy.CHEAPEST_RELOAD:
        # An unknown load time counts as expensive: it might be a slow model.
        idle.sort(key=lambda m: (_or_inf(m.load_seconds), m.last_used, m.id))
    else:
        idle.sort(key=lambda m: (m.last_used, m.id))
    return tuple(m.id for m in idle)


def expired(models: Iterable[ModelView], now: float,
            ttls: Mapping[str, float | None]) -> tuple[str, ...]:
    """Ready, idle, unpinned models whose idle TTL has run out, oldest first.

    A TTL of None or below zero keeps the model; 0 stops it as soon as it is idle (keep_alive 0).
    """
    out = []
    for m in models:
        ttl = ttls.get(m.id)
        if ttl is None or ttl < 0 or m.state not in _SERVING or m.busy or m.pinned:
            continue
        if now - m.last_used >= ttl:
            out.append(m)
    return tuple(m.id for m in sorted(out, key=lambda m: (m.last_used, m.id)))


def effective_ttl(keep_alive: float | None, model_ttl: float | None,
                  idle_ttl: float) -> float | None:
    """Idle seconds before unloading (None = never): a request's keep_alive, else the
    model's preset ttl, else the global idle-ttl (0 = never); negative keeps forever."""
    ttl = keep_alive if keep_alive is not None else model_ttl
    if ttl is None:
        ttl = idle_ttl or None
    if ttl is not None and (ttl < 0 or math.isinf(ttl)):
        return None
    return ttl


def ttl_left(model: ModelView, now: float, ttl: float | None) -> float | None:
    """Seconds until the idle TTL stops this model; None when no TTL applies now."""
    if ttl is None or ttl < 0 or model.state not in _SERVING or model.busy or model.pinned:
        return None
    return max(0.0, model.last_used + ttl - now)


def _plan_load(target: ModelView, models: Mapping[str, ModelView], res: Resources,
               policy: Policy) -> Decision:
    others = [m for m in models.values() if m.id != target.id]
    idle = victims(others, policy)
    later = _leaving(others, idle)
    # Fitting sizes the model to the room it has once every idle model is gone; then the
    # fewest of them that make room for that size are stopped.
    sized, choice = _sized(target, others, res, idle)
    chosen = _fewest(sized, others, res, idle)
    if chosen is not None:
        gpus = _place(sized, others, res, frozenset(chosen))
        assert gpus is not None  # _fewest only returns sets that place
        overlap = bool(chosen) and _place(sized, others, res, frozenset()) == gpus
        if choice is not None:
            choice = choice.explained(_room_words(sized, others, res, chosen, gpus))
        return Load(target.id, chosen, gpus, overlap, choice)
    sized, _ = _sized(target, others, res, idle + later)
    chosen = _fewest(sized, others, res, idle + later)
    if chosen is not None:
        return Drain(target.id, tuple(n for n in chosen if n in later))
    relaxed = _relaxed(target, res)
    if relaxed is not None:
        plan = _plan_load(relaxed[0], models, relaxed[1], policy)
        if not isinstance(plan, Reject):
            return plan
    why = _why_not(sized, others, res, frozenset(idle + later))
    if target.fit is not None and target.fit.shape.fit_ctx:
        shape = target.fit.shape
        # -c 0 (or a fit-min-ctx past it) leaves nothing to fit down: fit-min-ctx is no limit.
        least = "the whole trained context" if shape.least == shape.trained * shape.streams \
            else "the least fit-min-ctx allows"
        why += f" (at context {shape.least}, {least})"
    alone = _alone(sized, others, res, idle, later, why)
    return alone if alone is not None else Reject(503, why)


def _alone(target: ModelView, others: list[ModelView], res: Resources, idle: tuple[str, ...],
           later: tuple[str, ...], why: str) -> Load | Drain | None:
    """The estimate is an upper bound: where it fits nowhere, even once every unpinned model
    is gone, the model is still tried alone, as llama-server alone would be, and llama-server's
    own verdict decides (a load that fails marks the model failed). Not past what the
    operator set: a pinned model stays, and models-max and memory-budget-mb still hold.
    `target` comes with the need of its smallest plan (_sized)."""
    gone = frozenset(idle + later)
    if any(m.state in (*_LOADED, State.STOPPING) and m.id not in gone for m in others):
        return None
    if res.ram_budget is not None and _need(target, res).ram > res.ram_budget:
        return None
    if later:
        return Drain(target.id, later)
    least = target.fit.least() if target.fit is not None else Choice((), target.need)
    what = f"{least.what}, " if least.what else ""
    short = why.removeprefix(f"cannot load {target.id}: ")
    reason = f"{what}tried alone, as llama-server would be: by llamad's estimate it {short}"
    gpus = _place_anyway(target, others, res, gone) if _need(target, res).vram else ()
    if gpus is None:
        return None
    return Load(target.id, idle, gpus, False,
                Choice(least.args, least.need, least.what, reason, least.ctx))


def _place_anyway(target: ModelView, others: list[ModelView], res: Resources,
                  gone: frozenset[str]) -> tuple[int, ...] | None:
    """GPUs for a model tried alone: its own (None where they are not there), or the one
    with the most room."""
    room = _gpu_room(others, res, gone)
    if target.devices:
        room = {i: room[i] for i in target.devices if i in room}
    if not room or len(room) < max(len(target.shares), len(target.devices)):
        return None
    if target.shares:
        return tuple(sorted(room)[:len(target.shares)])
    if target.split or len(target.devices) > 1:
        return tuple(sorted(room))
    return (max(room, key=lambda i: (room[i], -i)),)


def _relaxed(target: ModelView, res: Resources) -> tuple[ModelView, Resources] | None:
    """The target planned with its floor: llama-server loads a memory-mapped model larger
    than the RAM free, its file's pages dropped and read again as needed. Taken only where
    the whole need cannot fit even once every idle and busy model is gone; memory-budget-mb,
    the operator's cap, still counts the pages."""
    floor = target.floor
    if floor is None or floor.ram >= target.need.ram:
        return None
    fit = target.fit.relaxed(cpu=not res.gpus) if target.fit is not None else None
    pages = target.need.ram - floor.ram
    budget = None if res.ram_budget is None else res.ram_budget - pages
    return (replace(target, need=floor, floor=None, fit=fit),
            replace(res, ram_budget=budget))


def _sized(target: ModelView, others: list[ModelView], res: Resources,
           gone: tuple[str, ...]) -> tuple[ModelView, Choice | None]:
    """The target with the need fitting chooses for the room it has once `gone` are
    stopped; where nothing fits, with the need of the smallest plan (for the figures)."""
    if target.fit is None:
        return target, None
    choice = target.fit.choose(_room(target, others, res, frozenset(gone)))
    least = choice or target.fit.least()
    return dataclasses.replace(target, need=least.need), choice


def _room(target: ModelView, others: list[ModelView], res: Resources,
          gone: frozenset[str]) -> Room:
    ram = _ram_room(others, res, gone)
    if not res.gpus:
        return Room(ram)
    room = _gpu_room(others, res, gone)
    if target.devices:
        room = {i: room.get(i, 0) for i in target.devices}
    if target.shares:
        return Room(ram, _shared_room(target, room), True)
    if target.split or len(target.devices) > 1:
        return Room(ram, sum(r for r in room.values() if r > 0), True)
    return Room(ram, max(room.values(), default=0), True)


def _room_words(target: ModelView, others: list[ModelView], res: Resources,
                evict: tuple[str, ...], gpus: tuple[int, ...]) -> str:
    """Where a fitted model found its room, e.g. "9.1 GiB free on GPU 0 after evicting
    nothing"."""
    gone = frozenset(evict)
    after = f"after evicting {', '.join(evict) or 'nothing'}"
    if gpus:
        room = _gpu_room(others, res, gone)
        free = sum(max(0, room.get(i, 0)) for i in gpus)
        return f"{_gib(free)} free on GPU {','.join(map(str, gpus))} {after}"
    ram = _ram_room(others, res, gone)
    bound = " within memory-budget-mb" if res.ram_budget is not None and \
        ram == res.ram_budget - sum(_held(m, res).ram for m in others if m.id not in gone) \
        else ""
    return f"{_gib(ram)} of RAM free{bound} {after}"


def _leaving(others: list[ModelView], idle: tuple[str, ...]) -> tuple[str, ...]:
    """Models that will be gone once they drain (busy, still loading) or finish stopping."""
    out = [m for m in others if m.id not in idle and (
        m.state is State.STOPPING or (m.state in _LOADED and not m.pinned))]
    # Stopping ones first: they free their memory soonest.
    out.sort(key=lambda m: (m.state is not State.STOPPING, m.last_used, m.id))
    return tuple(m.id for m in out)


def _fewest(target: ModelView, others: list[ModelView], res: Resources,
            order: tuple[str, ...]) -> tuple[str, ...] | None:
    """The shortest prefix of `order` whose eviction lets the target load, minus any it can keep."""
    for n in range(len(order) + 1):
        if _fits(target, others, res, frozenset(order[:n])):
            break
    else:
        return None
    chosen = list(order[:n])
    # Walk back from the most valuable victim: keep any the load does not really need gone.
    for name in reversed(order[:n]):
        rest = frozenset(chosen) - {name}
        if _fits(target, others, res, rest):
            chosen.remove(name)
    return tuple(chosen)


def _fits(target: ModelView, others: list[ModelView], res: Resources,
          gone: frozenset[str]) -> bool:
    counted = [m for m in others if m.state in _LOADED and m.id not in gone]
    if res.models_max and len(counted) + 1 > res.models_max:
        return False
    return _place(target, others, res, gone) is not None


def _place(target: ModelView, others: list[ModelView], res: Resources,
           gone: frozenset[str]) -> tuple[int, ...] | None:
    """The GPUs the target goes on if `gone` were stopped, or None if it does not fit."""
    need = _need(target, res)
    if need.ram > _ram_room(others, res, gone):
        return None
    if need.vram == 0:
        return ()
    room = _gpu_room(others, res, gone)
    if target.devices:
        room = {i: room.get(i, 0) for i in target.devices}
    if target.shares:
        gpus = tuple(sorted(room)[:len(target.shares)])
        return gpus if _shared_room(target, room) >= need.vram else None
    if target.split or len(target.devices) > 1:
        # llama.cpp splits layers in proportion to each device's free memory.
        usable = {i: r for i, r in room.items() if r > 0}
        return tuple(sorted(usable)) if sum(usable.values()) >= need.vram else None
    best = max(room, key=lambda i: (room[i], -i), default=None)
    return (best,) if best is not None and room[best] >= need.vram else None


def _shared_room(target: ModelView, room: dict[int, int]) -> int:
    """-ts: the most VRAM the model may need when the GPUs, in index order, take its shares
    in turn (CUDA_VISIBLE_DEVICES lists them so, and -ts counts positions in it)."""
    gpus = sorted(room)[:len(target.shares)]
    total = sum(target.shares)
    if len(gpus) < len(target.shares) or total <= 0:
        return 0
    return int(min(room[i] * total / share
                   for i, share in zip(gpus, target.shares, strict=True) if share > 0))


def _ram_room(others: list[ModelView], res: Resources, gone: frozenset[str]) -> int:
    room = res.ram_free - res.reserve
    for m in others:
        room += _freed(m, res).ram if m.id in gone else -_pending(m, res).ram
    if res.ram_budget is not None:
        models = sum(_held(m, res).ram for m in others if m.id not in gone)
        room = min(room, res.ram_budget - models)
    return room


def _gpu_room(others: list[ModelView], res: Resources, gone: frozenset[str]) -> dict[int, int]:
    room = {g.index: g.free - res.reserve for g in res.gpus}
    for m in others:
        delta = _freed(m, res).vram if m.id in gone else -_pending(m, res).vram
        for i in m.gpus:
            if i in room:
                # Per-GPU use of a split model is not measured: assume an even share.
                room[i] += delta // len(m.gpus)
    return room


def _need(m: ModelView, res: Resources) -> Memory:
    """The need as this machine sees it: without GPUs every byte lands in RAM."""
    return m.need if res.gpus else Memory(m.need.ram + m.need.vram, 0)


def _held(m: ModelView, res: Resources) -> Memory:
    """What a model holds, or will hold once loaded (its need, if more than measured)."""
    need = _need(m, res)
    if m.state in (State.STARTING, State.LOADING):
        return Memory(max(need.ram, m.used.ram), max(need.vram, m.used.vram))
    if m.state in (State.READY, State.STOPPING):
        return Memory(m.used.ram or need.ram, m.used.vram or need.vram)
    if m.state is State.SLEEPING:  # what it holds asleep, as measured (freed is free)
        return m.used if m.used.ram or m.used.vram else need
    return Memory()


def _pending(m: ModelView, res: Resources) -> Memory:
    """What a loading model will still take that measured free memory does not show yet."""
    if m.state not in (State.STARTING, State.LOADING):
        return Memory()
    held = _held(m, res)
    return Memory(held.ram - m.used.ram, held.vram - m.used.vram)


def _freed(m: ModelView, res: Resources) -> Memory:
    """What measured free memory gains when the model stops (a ready one unmeasured: its need)."""
    if m.state in (State.STARTING, State.LOADING):
        return m.used
    return _held(m, res)


def _why_not(target: ModelView, others: list[ModelView], res: Resources,
             gone: frozenset[str]) -> str:
    need = _need(target, res)
    counted = [m for m in others if m.state in _LOADED and m.id not in gone]
    if res.models_max and len(counted) + 1 > res.models_max:
        return (f"cannot load {target.id}: models-max {res.models_max} reached "
                "and every loaded model is pinned")
    ram = _ram_room(others, res, gone)
    if need.ram > ram:
        return (f"cannot load {target.id}: needs {_gib(need.ram)} of RAM, "
                f"{_gib(ram)} free after stopping every unpinned model")
    room = _gpu_room(others, res, gone)
    if target.devices:
        room = {i: room.get(i, 0) for i in target.devices}
    split = target.split or len(target.devices) > 1
    have = sum(max(0, r) for r in room.values()) if split else max(room.values(), default=0)
    where = "on its GPUs together" if split else "on the best GPU"
    return (f"cannot load {target.id}: needs {_gib(need.vram)} of VRAM, {_gib(have)} free "
            f"{where} after stopping every unpinned model")


def _gib(n: int) -> str:
    return f"{max(n, 0) / GIB:.1f} GiB"


def _total(m: Memory) -> int:
    return m.ram + m.vram


def _or_inf(x: float | None) -> float:
    return math.inf if x is None else x
