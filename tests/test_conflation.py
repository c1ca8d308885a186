"""Throttled (conflated) subscriptions: subscribe data ``{"max_rate": N}``.

The exact semantics (the latest publication of each interval, no backlog)
are checked on ``Throttle`` with a hand-driven clock; the WebSocket tests
check the same through the hub's fan-out with a real 200 Hz burst, next to
an unthrottled subscriber that must get everything.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from server.client import Throttle
from tests.helpers.server import token


class FakeLoop:
    """``time``/``call_at`` with a clock the test moves; due timers run in order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> FakeTimer:
        timer = FakeTimer(when, callback)
        self.timers.append(timer)
        return timer

    def advance(self, to: float) -> None:
        while True:
            due = [t for t in self.timers if not t.cancelled and t.when <= to]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            self.now = timer.when
            timer.callback()
        self.now = to


class FakeTimer:
    def __init__(self, when: float, callback: Any) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeMetrics:
    deliveries = 0


class FakeHub:
    metrics = FakeMetrics()


class FakeClient:
    """What ``Throttle`` uses of a ``Client``: its loop, its hub's metrics, ``enqueue``."""

    def __init__(self) -> None:
        self._loop = FakeLoop()
        self._hub = FakeHub()
        self.sent: list[tuple[float, bytes]] = []

    def enqueue(self, frame: bytes) -> None:
        self.sent.append((self._loop.now, frame))


def test_throttle_delivers_the_latest_publication_of_each_interval():
    """A 256 Hz burst at max_rate 4: the first at once, then the newest every 0.25 s."""
    client = FakeClient()
    throttle = Throttle(client, 4)  # type: ignore[arg-type]
    for k in range(256):
        client._loop.advance(k / 256)
        throttle.offer(b"%d" % k)
    client._loop.advance(5.0)
    assert client.sent == [
        (0.0, b"0"),
        (0.25, b"63"),
        (0.5, b"127"),
        (0.75, b"191"),
        (1.0, b"255"),
    ]


def test_throttle_sends_at_once_after_a_quiet_interval_and_cancel_drops_the_waiting_one():
    """No delay when the interval has passed; cancel() forgets what was waiting."""
    client = FakeClient()
    throttle = Throttle(client, 10)  # type: ignore[arg-type]
    throttle.offer(b"a")
    client._loop.advance(0.5)
    throttle.offer(b"b")  # quiet for longer than 0.1 s: immediate
    throttle.offer(b"c")
    throttle.cancel()
    client._loop.advance(5.0)
    assert client.sent == [(0.0, b"a"), (0.5, b"b")]


def dashboard_token() -> str:
    return token("ops", extra={"devices": ["*"]})


async def test_max_rate_subscriber_gets_conflated_updates_of_a_200hz_burst(squall):
    """max_rate 5 under a 200 Hz burst: at most ~6 pushes a second, ending on the last value."""
    sq = await squall(**{"telemetry.max_points_per_second": 0})
    slow = await sq.raw(connect=True, token=dashboard_token())
    reply = await slow.command("subscribe", {"channel": "telemetry:d1", "data": {"max_rate": 5}})
    assert "subscribe" in reply, reply
    full = await sq.raw(connect=True, token=dashboard_token())
    assert "subscribe" in await full.command("subscribe", {"channel": "telemetry:d1"})
    dev = await sq.raw(connect=True, token=token("d1", extra={"device": True}))

    async def burst() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for k in range(200):
            # Pacing the generator at 200 Hz, not synchronising on time.
            await asyncio.sleep(max(0.0, start + k / 200 - loop.time()))
            reply = await dev.command(
                "publish", {"channel": "telemetry:d1", "data": {"values": {"n": k}}}
            )
            assert "publish" in reply, reply

    publisher = asyncio.ensure_future(burst())
    arrivals: list[tuple[float, int]] = []
    while not arrivals or arrivals[-1][1] != 199:
        push = await slow.next_push(within=5.0)
        [point] = push["push"]["pub"]["data"]["points"]
        arrivals.append((time.monotonic(), int(point["values"]["n"])))
    await publisher
    values = [n for _, n in arrivals]
    assert values == sorted(set(values)), values  # newest first never repeats or goes back
    assert values[0] == 0
    assert len(values) >= 4  # it did deliver along the way, not only at the end
    first = arrivals[0][0]
    span = arrivals[-1][0] - first
    assert len(values) <= span / 0.2 + 2, (span, values)
    for window in range(int(span) + 1):
        in_window = [t for t, _ in arrivals if first + window <= t < first + window + 1]
        assert len(in_window) <= 6, arrivals
    got = []
    while len(got) < 200:  # the unthrottled subscriber gets every publication
        push = await full.next_push()
        got.append(int(push["push"]["pub"]["data"]["points"][0]["values"]["n"]))
    assert got == list(range(200))


async def test_unsubscribing_a_throttled_subscription_cancels_its_timer(squall):
    """After unsubscribe nothing waits to be sent, and the channel is back on the fast path."""
    sq = await squall(**{"telemetry.max_points_per_second": 0})
    slow = await sq.raw()
    connected = await slow.connect(token=dashboard_token())
    await slow.command("subscribe", {"channel": "telemetry:d1", "data": {"max_rate": 1}})
    full = await sq.raw(connect=True, token=dashboard_token())
    await full.command("subscribe", {"channel": "telemetry:d1"})
    dev = await sq.raw(connect=True, token=token("d1", extra={"device": True}))
    for k in range(2):
        await dev.command("publish", {"channel": "telemetry:d1", "data": {"values": {"n": k}}})
    await full.next_push()
    await full.next_push()  # both fanned out: the second now waits in the throttle
    client = sq.hub.clients[connected["connect"]["client"]]
    throttle = client.subs["telemetry:d1"].throttle
    assert throttle is not None
    assert throttle._timer is not None
    assert sq.hub.channels["telemetry:d1"].throttled == 1
    assert await slow.command("unsubscribe", {"channel": "telemetry:d1"}) == {
        "id": 3,
        "unsubscribe": {},
    }
    assert throttle._timer is None
    assert sq.hub.channels["telemetry:d1"].throttled == 0
    reply = await slow.command("ping")  # nothing was queued between the two replies
    assert reply == {"id": 4, "ping": {}}


async def test_max_rate_is_validated(squall):
    """max_rate must be a positive number up to 1000, and not combined with recovery: else 107."""
    sq = await squall()
    c = await sq.raw(connect=True, token=dashboard_token())
    for bad in ("5", 0, -1, True, 1001, None):
        reply = await c.command("subscribe", {"channel": "telemetry:d1", "data": {"max_rate": bad}})
        assert reply["error"]["code"] == 107, (bad, reply)
    reply = await c.command(
        "subscribe", {"channel": "chat:a", "recoverable": True, "data": {"max_rate": 5}}
    )
    assert reply["error"] == {"code": 107, "message": "max_rate cannot be combined with recovery"}
    reply = await c.command("subscribe", {"channel": "chat:b", "data": {"other": 1}})
    assert "subscribe" in reply  # data without max_rate is none of our business
    reply = await c.command("subscribe", {"channel": "chat:c", "data": {"max_rate": 0.5}})
    assert "subscribe" in reply
