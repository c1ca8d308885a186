"""Helpers for the engine tests: a recording ``BrokerEvents`` and bounded waits.

Why: Redis delivers events through its pub/sub listener task, the memory
broker delivers them before ``publish`` returns. Tests therefore never sleep
to let a delivery happen; they wait, bounded, for a condition on what
``RecordingEvents`` saw (``wait_for``) or, for time-based behaviour such as
TTLs, poll an engine call until it holds (``eventually``).

Extend ``RecordingEvents`` when ``BrokerEvents`` grows a method: record the
call and set ``_changed``. Timeouts scale with ``SQUALL_TEST_TIME_FACTOR``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Collection

from server.broker import ClientInfo, Publication

TIME_FACTOR = float(os.environ.get("SQUALL_TEST_TIME_FACTOR", "1"))


class RecordingEvents:
    """A ``BrokerEvents`` that records every call, in order."""

    def __init__(self) -> None:
        self.pubs: list[tuple[str, Publication]] = []
        self.joins: list[tuple[str, ClientInfo]] = []
        self.leaves: list[tuple[str, ClientInfo]] = []
        self.controls: list[bytes] = []
        self.gaps: list[set[str]] = []
        self._changed = asyncio.Event()

    def on_publication(self, channel: str, pub: Publication) -> None:
        self.pubs.append((channel, pub))
        self._changed.set()

    def on_join(self, channel: str, info: ClientInfo) -> None:
        self.joins.append((channel, info))
        self._changed.set()

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        self.leaves.append((channel, info))
        self._changed.set()

    def on_control(self, data: bytes) -> None:
        self.controls.append(data)
        self._changed.set()

    def on_gap(self, channels: Collection[str]) -> None:
        self.gaps.append(set(channels))
        self._changed.set()

    def pubs_in(self, channel: str) -> list[Publication]:
        return [pub for ch, pub in self.pubs if ch == channel]

    async def wait_for(self, condition: Callable[[], object], *, within: float = 2.0) -> None:
        """Return once ``condition()`` holds; fail with TimeoutError after ``within`` s."""
        async with asyncio.timeout(within * TIME_FACTOR):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def wait_until(
        self, condition: Callable[[RecordingEvents], object], *, within: float = 2.0
    ) -> None:
        """``wait_for`` with the recorder as argument (handy in loops over recorders)."""
        await self.wait_for(lambda: condition(self), within=within)

    async def wait_pubs(
        self, channel: str, count: int, *, within: float = 2.0
    ) -> list[Publication]:
        """Wait until ``channel`` got at least ``count`` publications; return them."""
        await self.wait_for(lambda: len(self.pubs_in(channel)) >= count, within=within)
        return self.pubs_in(channel)


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 3.0, step: float = 0.02
) -> None:
    """Poll ``check`` until it returns True (for conditions nothing signals, like TTLs)."""
    async with asyncio.timeout(within * TIME_FACTOR):
        while not await check():
            await asyncio.sleep(step)


async def until(condition: Callable[[], bool], *, within: float = 3.0, step: float = 0.01) -> None:
    """Poll a cheap synchronous ``condition`` (e.g. ``is_connected()``) until it holds."""
    async with asyncio.timeout(within * TIME_FACTOR):
        while not condition():
            await asyncio.sleep(step)


def info(user: str, client: str, conn: bytes | None = None) -> ClientInfo:
    return ClientInfo(user=user, client=client, conn_info=conn)
