"""Waiting for what the code under test does, never a bare sleep: whatever can change pokes a
Watch, and `Watch.until` re-checks its condition only then, within a timeout. Where nothing
can poke (another process, a socket), `eventually` polls the condition, within a timeout."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from llamad.supervisor.supervisor import Supervisor


class Watch:
    """Wakes on every poke: a call into a fake, a model's state change, a catalog change."""

    def __init__(self) -> None:
        self._poked = asyncio.Event()

    def poke(self, *_: Any) -> None:
        self._poked.set()

    def follow(self, sup: Supervisor) -> None:
        sup.events.subscribe(self.poke)

    async def until(self, what: str, cond: Callable[[], object], timeout: float = 5) -> None:
        """Wait until cond() holds, re-checking it only when something happened."""
        async def wait() -> None:
            while not cond():
                self._poked.clear()
                await self._poked.wait()
        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def eventually(what: str, cond: Callable[[], object | Awaitable[object]],
                     timeout: float = 5, every: float = 0.01) -> None:
    """Wait until cond() (or what it returns, awaited) holds, checking every `every`
    seconds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        held = cond()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)
