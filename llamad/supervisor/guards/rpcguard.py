"""What llamad does about the RPC workers of a model (catalog/rpcargs.py) that go away or are busy.

llama-server aborts when a worker it uses goes away ("Remote RPC server crashed or returned
malformed response" at the next request; "Failed to connect to ..." at a load), and
systemd would restart it into the same wall until the start limit. `RpcGuard`, a listener
of the supervisor's state changes, checks the workers after such a crash (and at every
load) and fails the model at once with the worker named; a request for it while its worker
is down gets that reason in a 503, without starting anything; once the worker answers
again, the next request loads the model again (`admit`, called before each request waits).

One ggml-rpc-server serves one llama-server at a time (it accepts the next client only when
the first leaves), so a model whose worker another loaded model holds is refused with a
503 naming that model, rather than left hanging in its load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from llamad.background import Background
from llamad.catalog import rpcargs as rpc
from llamad.errors import Unavailable
from llamad.memory import estimate as memory
from llamad.supervisor.events import Cause, Change, State
from llamad.supervisor.hooks import Hook, Port

if TYPE_CHECKING:
    from llamad.supervisor.slot import Slot

log = logging.getLogger("llamad.rpc")

FRESH = 5.0  # seconds a successful check of a model's workers stands for its load
AGAIN = "a request loads it again once the worker answers"
PROBE_TIMEOUT = 2.0  # seconds for a worker to accept a TCP connection


class RpcGuard(Hook):
    """Owned by the Supervisor, fed by its events."""

    def __init__(self, sup: Port) -> None:
        self.sup = sup
        self.lost: dict[str, str] = {}  # model id: why it failed for a worker
        self._checked: dict[str, float] = {}  # model id: when its workers last answered
        self.background = Background()
        sup.events.subscribe(self._on_change)

    @staticmethod
    def workers(slot: Slot) -> tuple[rpc.Worker, ...]:
        return rpc.workers(slot.model.settings.args)

    # -- before a request waits for its model --------------------------------

    async def admit(self, slot: Slot) -> None:
        """Raise Unavailable (503) when the model would have to load and cannot: a worker
        is held by another loaded model, or does not answer. A model failed for a worker
        that answers again is cleared here, so this request loads it."""
        if slot.state not in (State.UNLOADED, State.FAILED):
            return  # every request to a loaded model passes here: no argv walk for it
        found = self.workers(slot)
        if not found:
            return
        if slot.state is State.FAILED and slot.model.id not in self.lost:
            return  # failed for another reason: the scheduler says why
        self._check_free(slot, found)
        problem = await probe(found)
        if problem is not None:
            raise Unavailable(f"model {slot.model.id} cannot load: {problem}; {AGAIN}",
                              code="rpc_worker_unreachable")
        self._checked[slot.model.id] = time.monotonic()
        if slot.state is State.FAILED and slot.model.id in self.lost:
            log.info("model %s: its rpc workers answer again; loading it", slot.model.id)
            self.sup.reset(slot, "its rpc workers answer again")

    def _check_free(self, slot: Slot, found: tuple[rpc.Worker, ...]) -> None:
        for other in self.sup.slots.values():
            if other is slot or other.state in (State.UNLOADED, State.FAILED):
                continue
            worker = rpc.shared(found, self.workers(other))
            if worker is not None:
                raise Unavailable(
                    f"model {slot.model.id} cannot load now: its rpc worker {worker} serves "
                    f"model {other.model.id} (a ggml-rpc-server serves one llama-server at a "
                    f"time); unload {other.model.id} or wait for its TTL",
                    code="rpc_worker_busy")

    # -- state changes -------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        if change.old is State.FAILED:
            self.lost.pop(change.model, None)
        slot = self.sup.slots.get(change.model)
        if slot is None or change.new is not State.STARTING or not self.workers(slot):
            return
        if change.cause is Cause.CRASH:
            # llama-server aborts when a worker goes away, and systemd would restart it
            # until the start limit: find out whether that is why.
            self.background.spawn(self._check(slot, "went away"),
                                  f"rpc-crash-{change.model}")
        elif time.monotonic() - self._checked.get(change.model, 0.0) > FRESH:
            # An explicit load or a preload: no request checked the workers just now, and
            # llama-server's own connect to a vanished host waits minutes.
            self.background.spawn(self._check(slot, "does not answer"),
                                  f"rpc-load-{change.model}")

    async def _check(self, slot: Slot, what: str) -> None:
        problem = await probe(self.workers(slot))
        if problem is None or slot.state not in (State.STARTING, State.LOADING):
            return
        reason = f"{problem.replace('does not answer', what, 1)}; {AGAIN}"
        self.lost[slot.model.id] = reason
        self.sup.give_up(slot, reason)

    async def close(self) -> None:
        await self.background.close()


def describe(info: memory.ModelInfo | None, args: Sequence[str]) -> dict[str, Any] | None:
    """GET /models' `rpc` object of a model with workers (None without): the workers, and
    its memory split as estimated; `need` and the scheduler count only the local share."""
    found = rpc.workers(args)
    if not found:
        return None
    est = memory.estimate_rpc(info, args) if info is not None else None
    return {"workers": [str(w) for w in found],
            "local": est.total.ram if est is not None else None,
            "remote": est.total.vram if est is not None else None}


async def probe(found: Iterable[rpc.Worker], timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when every worker accepts a TCP connection within `timeout`, else a sentence
    naming the first that does not, and why.

    Only the kernel's handshake is awaited: ggml-rpc-server accepts one client at a time
    (listen backlog 1), so a worker serving a model would leave a real hello unanswered."""
    found = tuple(found)
    results = await asyncio.gather(*(_connect(w, timeout) for w in found))
    for worker, problem in zip(found, results, strict=True):
        if problem:
            return f"rpc worker {worker} does not answer ({problem})"
    return None


async def _connect(worker: rpc.Worker, timeout: float) -> str | None:
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(worker.host, worker.port), timeout)
    except TimeoutError:
        return f"no connection within {timeout:g} s"
    except OSError as e:  # asyncio words it "Connect call failed"; say what the kernel said
        return os.strerror(e.errno) if e.errno else str(e)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None
