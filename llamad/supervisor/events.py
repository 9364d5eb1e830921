"""Model state changes as events: the one table of allowed moves, and who hears about them.

The Supervisor changes a model's state only through `Core.move` (core.py), which checks the
move against TRANSITIONS and then tells every listener (the API's server-sent events,
metrics, the dashboard). Listeners run on the event loop thread, synchronously, and must
not block; one that raises is logged and the others still hear the change.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("llamad.events")


class State(enum.Enum):
    UNLOADED = "unloaded"
    STARTING = "starting"  # unit start job queued, process not yet up
    LOADING = "loading"  # process up, /health answers 503
    READY = "ready"
    # llama-server (--sleep-idle-seconds) freed its weights and caches while idle; its
    # process runs on, and the next request reloads them in place (no new unit).
    SLEEPING = "sleeping"
    STOPPING = "stopping"
    FAILED = "failed"


class Cause(enum.Enum):
    """Why a model changed state: the label metrics and logs use."""

    LOAD = "load"  # a request or an explicit load started it
    ADOPTED = "adopted"  # a unit an earlier llamad started was taken over
    ACTIVE = "active"  # systemd says the process runs
    HEALTHY = "healthy"  # /health answered 200
    SUSPECT = "suspect"  # the backend refused a connection; checking its health
    WEDGED = "wedged"  # the backend stopped answering: killed, systemd starts it again
    CRASH = "crash"  # the process died and systemd restarts it
    FAILED = "failed"  # gave up: start limit, OOM, load timeout, systemd refused
    EVICT_COUNT = "lru"  # stopped to stay within models-max
    EVICT_MEMORY = "memory"  # stopped to make room in memory
    TTL = "ttl"  # idle TTL ran out
    KEEP_ALIVE = "keep_alive"  # a request's keep_alive 0
    UNLOAD = "unload"  # POST /models/unload
    REMOVED = "file_removed"  # its file left the catalog
    CHANGED = "changed"  # its file or arguments changed: drained and started again
    STOPPED = "stopped"  # the unit is gone
    RESET = "reset"  # a failed model cleared for another try
    RECONCILE = "reconcile"  # systemd's view differed from llamad's
    GPU_OOM = "gpu_oom"  # its load ran out of GPU memory: stopped, to load once more
    SLEEP = "sleep"  # llama-server says it sleeps (--sleep-idle-seconds)
    WAKE = "wake"  # a request woke a sleeping model, or llama-server says it is awake


S = State
# Every move a model may make; docs/design.md draws the same table.
TRANSITIONS: dict[State, frozenset[State]] = {
    S.UNLOADED: frozenset({S.STARTING, S.LOADING, S.FAILED}),
    S.STARTING: frozenset({S.LOADING, S.STOPPING, S.FAILED, S.UNLOADED}),
    S.LOADING: frozenset({S.READY, S.STARTING, S.STOPPING, S.FAILED, S.UNLOADED}),
    S.READY: frozenset({S.LOADING, S.STARTING, S.SLEEPING, S.STOPPING, S.FAILED, S.UNLOADED}),
    S.SLEEPING: frozenset({S.READY, S.LOADING, S.STARTING, S.STOPPING, S.FAILED, S.UNLOADED}),
    S.STOPPING: frozenset({S.UNLOADED, S.FAILED}),
    S.FAILED: frozenset({S.UNLOADED, S.STARTING, S.STOPPING}),
}


@dataclass(frozen=True)
class Change:
    """A model's state change, as the event stream tells it."""

    model: str
    old: State
    new: State
    cause: Cause
    detail: str = ""  # a sentence for people: the failure reason, the eviction's beneficiary
    at: float = 0.0  # wall-clock seconds


Listener = Callable[[Change], None]


class Hub:
    """Listeners of model state changes."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def emit(self, change: Change) -> None:
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:  # one broken listener must not stop the others
                log.exception("a listener of model state changes failed")
