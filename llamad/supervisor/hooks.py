"""How a feature joins a model's lifecycle, and what it may ask of the supervisor.

A feature that must act when models load or stop (the GPU, RPC and KV guards in guards/)
is a `Hook`. The supervisor calls every hook at four points, in the order they were given:

- `admit(slot)`: a request is about to wait for its model; raise `Unavailable` to refuse it
  (503) before anything starts;
- `before_start(slot, evicted)`: the units evicted for this load have stopped (`evicted` names
  them); StartTransientUnit follows;
- `before_ready(slot, backend)`: the backend answers /health; the model serves after this;
- `before_stop(slot)`: the model's requests have drained; StopUnit follows;
- `request_ended(slot)`: a request to the model has ended (not awaited: it runs on every
  request, so it must only note or spawn what it needs).

Each call is awaited, and the step goes on only if the model has not moved on meanwhile (its
epoch). A hook that only needs to know what happened subscribes to `Port.events`: listeners
hear a state change synchronously, before any hook of the step that change begins.

Hooks never hold the Supervisor. They get a `Port`: read-only slots, the configuration, the
memory figures, the event hub, and the few verbs below. Every state change still goes through
the supervisor's `Core.move`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from llamad.config import Config
    from llamad.supervisor.backend import Backend
    from llamad.supervisor.events import Hub
    from llamad.supervisor.slot import Measure, Slot


class Hook:
    """A feature's part in every model's lifecycle; the defaults do nothing."""

    async def admit(self, slot: Slot) -> None:
        """Before a request waits for the model: raise Unavailable to refuse it."""

    async def before_start(self, slot: Slot, evicted: Sequence[str]) -> None:
        """The evicted units (names) have stopped; the model's unit starts next."""

    async def before_ready(self, slot: Slot, backend: Backend) -> None:
        """The backend answers /health; the model serves next."""

    async def before_stop(self, slot: Slot) -> None:
        """The model's requests have drained; its unit is stopped next."""

    def request_ended(self, slot: Slot) -> None:
        """A request to the model has ended; called on every request, never awaited."""

    async def close(self) -> None:
        """llamad exits: end what the hook runs in the background."""


class Port(Protocol):
    """What a hook may read and ask of the supervisor."""

    config: Config
    measure: Measure
    events: Hub

    @property
    def slots(self) -> Mapping[str, Slot]: ...

    def give_up(self, slot: Slot, reason: str) -> None:
        """Fail the model and stop its unit, cancelling systemd's restarts."""

    def reload_later(self, slot: Slot, why: str) -> None:
        """Stop the model; once stopped it loads again through the scheduler."""

    async def load(self, slot: Slot) -> None:
        """An explicit load, as POST /models/load."""

    def reset(self, slot: Slot, why: str) -> None:
        """Clear a failed model, so that the next request loads it."""

    def degrade(self, slot: Slot, why: str) -> None:
        """The model serves, but not as planned: say so where its state is shown."""

    def fits_now(self, slot: Slot) -> bool:
        """Whether the model would load now without stopping or waiting for another."""

    def yield_load(self, slot: Slot, why: str) -> None:
        """Stop a model that is loading for no request waiting for it (restore = yes)."""
