"""A model's concurrency limit: at most N requests past the gate, the rest in arrival order.

A request passes the gate before it waits for its model to be ready, and leaves it when
its answer has ended, so no more than N are ever forwarded to llama-server at once. The
waiting ones queue first come, first served; one whose client leaves (its handler is
cancelled) or whose queue-timeout runs out leaves the line, and a place granted to it at
that very moment passes on to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class Gate:
    """One model's line. All calls on the event loop thread."""

    def __init__(self) -> None:
        self.inside = 0  # requests past the gate: waiting for the model, or in flight
        # Made on the first wait: an empty deque is 600 bytes, and most models never queue.
        self._line: deque[asyncio.Future[None]] | None = None

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._line or () if not f.done())

    async def enter(self, limit: int, timeout: float) -> None:
        """Pass the gate (limit 0: no limit); raises TimeoutError after `timeout` seconds
        in line, CancelledError if the request is cancelled meanwhile."""
        if not limit or (self.inside < limit and not self.waiting):
            self.inside += 1
            return
        loop = asyncio.get_running_loop()
        place: asyncio.Future[None] = loop.create_future()
        line = self._line = self._line if self._line is not None else deque()
        line.append(place)
        timer = loop.call_later(timeout, _expire, place)
        try:
            await place  # cancelling the request cancels its place in line
        except BaseException:
            granted = place.done() and not place.cancelled() and place.exception() is None
            if granted:  # granted just as it gave up: the place goes to the next
                self.leave(limit)
            else:
                with contextlib.suppress(ValueError):
                    line.remove(place)
            raise
        finally:
            timer.cancel()

    def leave(self, limit: int) -> None:
        """One request past the gate has ended; the first in line takes its place."""
        self.inside -= 1
        self.pass_on(limit)

    def pass_on(self, limit: int) -> None:
        """Let in as many as the (possibly changed) limit allows, in arrival order."""
        while self._line and (not limit or self.inside < limit):
            place = self._line.popleft()
            if not place.done():
                self.inside += 1
                place.set_result(None)


def _expire(place: asyncio.Future[None]) -> None:
    if not place.done():
        place.set_exception(TimeoutError())
