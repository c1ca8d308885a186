"""Flush pacing (``client.flush_share``): after a long flush the next one waits.

A broadcast to many connections costs one ``send`` per connection, so its flush
can take milliseconds; the hub then holds the next flush back in proportion
(``t * (1 / share - 1)``) and everything queued meanwhile leaves together, one
frame per connection. The slow flush is played by a stand-in whose ``flush``
blocks for a set time: a real one that long needs thousands of sockets.
"""

from __future__ import annotations

import asyncio
import time

from tests.helpers.server import RunningSquall


class Writer:
    """Stands in for a dirty connection: its flush takes ``seconds`` (blocking, as a
    long run of ``send`` calls does) and records when it ended."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.flushed_at: list[float] = []

    def flush(self, frames: object) -> None:
        if self.seconds:
            time.sleep(self.seconds)
        self.flushed_at.append(time.monotonic())


async def flushed(sq: RunningSquall, writer: Writer, within: float = 2.0) -> float:
    """Queue ``writer`` on the hub; return when its flush ended."""
    sq.hub.schedule_flush(writer)  # type: ignore[arg-type]
    deadline = time.monotonic() + within
    while not writer.flushed_at:
        assert time.monotonic() < deadline, "never flushed"
        await asyncio.sleep(0.001)
    return writer.flushed_at[0]


async def test_a_long_flush_holds_the_next_one_back_by_the_share(squall):
    """share 0.5: a 60 ms flush keeps the next one back about 60 ms; share 0.75: 20 ms."""
    for share, at_least in ((0.5, 0.055), (0.75, 0.018)):
        sq = await squall(**{"client.flush_share": share})
        slow_end = await flushed(sq, Writer(0.06))
        gap = await flushed(sq, Writer()) - slow_end
        assert gap >= at_least, (share, gap)


async def test_short_flushes_and_share_one_are_not_held_back(squall):
    """A flush under FLUSH_PAUSE_MIN of pause, or any flush with share 1, lets the next
    one run on the next loop tick."""
    for share, first in ((0.75, 0.0), (1.0, 0.06)):
        sq = await squall(**{"client.flush_share": share})
        await flushed(sq, Writer(first))
        after = Writer()
        sq.hub.schedule_flush(after)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert after.flushed_at, share


async def test_pushes_queued_during_the_pause_reach_a_client_in_one_frame(squall):
    """Three publications made while the hub is held back arrive together, in order,
    in one newline-batched WebSocket frame."""
    sq = await squall(**{"client.flush_share": 0.5})
    c = await sq.raw(connect=True)
    assert "subscribe" in await c.command("subscribe", {"channel": "lobby"})
    await flushed(sq, Writer(0.4))  # holds the next flush back about 0.4 s
    for n in range(3):
        assert "result" in await sq.api("publish", {"channel": "lobby", "data": {"n": n}})
    frames = c.frames
    got = [(await c.next_push())["push"]["pub"]["data"]["n"] for _ in range(3)]
    assert got == [0, 1, 2]
    assert c.frames == frames + 1
