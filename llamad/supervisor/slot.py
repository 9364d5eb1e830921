"""One model's runtime state, and what its owner (the Supervisor) needs from outside."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from llamad.catalog.catalog import Model
from llamad.config import Config
from llamad.memory.fit import Choice, Fitter
from llamad.memory.gpu import GpuInfo
from llamad.memory.learned import Learned
from llamad.memory.types import Memory, Resources
from llamad.supervisor import backend as be
from llamad.supervisor.concurrency import Gate
from llamad.supervisor.events import State
from llamad.systemd.units import UnitSpec, UnitStatus


class Units(Protocol):
    """What the supervisor needs of units.UnitManager (a fake can stand in for tests)."""

    async def start(self, spec: UnitSpec, wanted: Callable[[], bool] | None = None) -> None: ...
    async def stop(self, name: str) -> None: ...
    async def kill(self, name: str, signal: int) -> None: ...
    async def reset_failed(self, name: str) -> None: ...
    async def status(self, name: str) -> UnitStatus: ...
    async def list_ours(self) -> list[UnitStatus]: ...
    async def start_ttl_timer(self, unit: str, seconds: float) -> None: ...
    async def take_ttl_timers(self) -> dict[str, float]: ...


class Measure(Protocol):
    """What the supervisor needs of measure.Measure."""

    generation: int  # bumped whenever need() may change

    def resources(self, config: Config) -> Resources: ...
    def need(self, model: Model) -> Memory: ...
    def estimate(self, model: Model) -> Memory: ...
    # Fitting models to memory (memory/fit.py)
    def fitter(self, model: Model) -> Fitter | None: ...
    def fitted(self, model: Model, args: tuple[str, ...] | None) -> None: ...
    def run_args(self, model: Model) -> tuple[str, ...]: ...
    def learned_for(self, model: Model) -> Learned | None: ...
    def derived_limit(self, model: Model) -> int | None: ...
    def vram_by_unit(self) -> dict[str, int]: ...
    def gpu_list(self) -> tuple[GpuInfo, ...]: ...
    def should_learn(self, model: Model, ram: int, load_seconds: float | None) -> bool: ...
    def learn(self, model: Model, ram: int, vram: int | None,
              load_seconds: float | None) -> None: ...
    # GPU placement and checks (gpuload.py)
    def gpu_uuids(self, indices: tuple[int, ...]) -> tuple[str, ...]: ...
    def at_least(self, model: Model, vram: int) -> None: ...
    def vram_units(self) -> set[str]: ...
    def on_gpu(self, unit: str) -> bool: ...
    def attributes_processes(self) -> bool: ...


class SlotView(Protocol):
    """One model as the readers see it (listings, /status, the feeds, the dashboard,
    metrics): what they may read of a Slot, none of it writable. The Supervisor's own
    layers alone hold Slots; readers go through `Supervisor.models`."""

    @property
    def model(self) -> Model: ...
    @property
    def state(self) -> State: ...
    @property
    def epoch(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def last_used(self) -> float: ...
    @property
    def backend(self) -> be.Backend | None: ...
    @property
    def address(self) -> str: ...
    @property
    def invocation_id(self) -> str: ...
    @property
    def main_pid(self) -> int: ...
    @property
    def n_restarts(self) -> int: ...
    @property
    def reason(self) -> str: ...
    @property
    def served(self) -> int: ...
    @property
    def load_started(self) -> float: ...
    @property
    def load_seconds(self) -> float | None: ...
    @property
    def keep_alive(self) -> float | None: ...
    @property
    def gpus(self) -> tuple[int, ...]: ...
    @property
    def last_exit(self) -> Mapping[str, Any]: ...
    @property
    def used(self) -> Memory: ...
    @property
    def peak(self) -> Memory: ...
    @property
    def sampled_pid(self) -> int: ...
    @property
    def pin(self) -> bool | None: ...
    @property
    def fit(self) -> Choice | None: ...
    @property
    def unit(self) -> str: ...
    @property
    def pinned(self) -> bool: ...


@dataclass(slots=True)  # thousands of them: no per-instance dict (1.6 KB each)
class Slot:
    """Mutable runtime state of one model; owned by the Supervisor alone."""

    model: Model
    state: State = State.UNLOADED
    # Bumped by every state change: a task that awaited re-checks it before it acts.
    epoch: int = 0
    in_flight: int = 0
    queued: int = 0
    last_used: float = 0.0
    backend: be.Backend | None = None
    address: str = ""  # where its backend listens while it runs ("" while unloaded)
    invocation_id: str = ""
    main_pid: int = 0
    n_restarts: int = 0
    reason: str = ""
    served: int = 0
    load_started: float = 0.0
    load_seconds: float | None = None
    keep_alive: float | None = None  # per-request override of the TTL, seconds
    gpus: tuple[int, ...] = ()
    last_exit: dict[str, Any] = field(default_factory=dict)
    stopping_by_us: bool = False
    start_pending: bool = False  # a start task has not yet handed the unit to systemd
    stop_sent: bool = False  # StopUnit was called for the current stop
    identity: tuple[object, ...] | None = None  # what the running unit was made from
    reload: bool = False  # start it again once stopped (its file or arguments changed)
    checking: bool = False  # a failure is being confirmed with systemd
    # Adopted from an earlier llamad, or re-checked after a refused connection: the
    # next "ready" ends no load that we timed.
    load_time_unknown: bool = False
    used: Memory = field(default_factory=Memory)  # measured by sample(); zero until then
    peak: Memory = field(default_factory=Memory)  # highest sample of process `sampled_pid`
    sampled_pid: int = 0
    alive_at: float = 0.0  # monotonic: last /health answer or finished request while ready
    probing: bool = False  # a liveness probe is in flight
    replacing: str = ""  # the InvocationID of a wedged process being replaced
    pin: bool | None = None  # set at runtime (POST /models/pin); None: the preset's `pin`
    gate: Gate = field(default_factory=Gate)  # its concurrency limit's line (admission.py)
    fit: Choice | None = None  # what fitting added to the arguments of the unit it runs in

    @property
    def unit(self) -> str:
        return self.model.unit

    @property
    def pinned(self) -> bool:
        """Never evicted nor stopped by TTL."""
        return self.model.settings.pin if self.pin is None else self.pin
