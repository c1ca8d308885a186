"""The real centrifuge-python SDK against Squall: what an application using it observes.

Each test drives the SDK through its public API and waits on the SDK's own
event handlers (recorded into per-event queues, every wait bounded). Clients
are disconnected at teardown, before the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from centrifuge import (
    Client,
    ClientDisconnectedError,
    ClientEventHandler,
    ClientState,
    Filter,
    ReplyError,
    StreamPosition,
    Subscription,
    SubscriptionEventHandler,
    SubscriptionState,
)

from server import __version__
from tests.helpers.server import TIME_FACTOR, token

WITHIN = 5.0  # seconds any single SDK event may take to arrive


class Recorder:
    """Every event of one kind goes to its own queue; ``next`` waits for one, bounded."""

    def __init__(self) -> None:
        self.queues: defaultdict[str, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)

    def put(self, kind: str, ctx: Any) -> None:
        self.queues[kind].put_nowait(ctx)

    async def next(self, kind: str, within: float = WITHIN) -> Any:
        async with asyncio.timeout(within * TIME_FACTOR):
            return await self.queues[kind].get()

    def drain(self, kind: str) -> list[Any]:
        """Events of this kind recorded so far and not yet taken (never waits)."""
        out = []
        queue = self.queues[kind]
        while not queue.empty():
            out.append(queue.get_nowait())
        return out


class ClientEvents(Recorder, ClientEventHandler):
    """Client-level events, server-side subscriptions included.

    ``hold_reconnect``: while set, an ``on_connecting`` caused by a server
    disconnect waits on it. The SDK awaits this handler before it schedules
    the reconnect, so the test can act while the client is certainly offline.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hold_reconnect: asyncio.Event | None = None

    async def on_connecting(self, ctx: Any) -> None:
        self.put("connecting", ctx)
        if self.hold_reconnect is not None and ctx.code >= 3000:
            # Bounded: a failing test must not leave the SDK stuck here.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WITHIN * TIME_FACTOR):
                    await self.hold_reconnect.wait()

    async def on_connected(self, ctx: Any) -> None:
        self.put("connected", ctx)

    async def on_disconnected(self, ctx: Any) -> None:
        self.put("disconnected", ctx)

    async def on_error(self, ctx: Any) -> None:
        self.put("error", ctx)

    async def on_subscribed(self, ctx: Any) -> None:
        self.put("subscribed", ctx)

    async def on_subscribing(self, ctx: Any) -> None:
        self.put("subscribing", ctx)

    async def on_unsubscribed(self, ctx: Any) -> None:
        self.put("unsubscribed", ctx)

    async def on_publication(self, ctx: Any) -> None:
        self.put("publication", ctx)

    async def on_join(self, ctx: Any) -> None:
        self.put("join", ctx)

    async def on_leave(self, ctx: Any) -> None:
        self.put("leave", ctx)


class SubEvents(Recorder, SubscriptionEventHandler):
    async def on_subscribing(self, ctx: Any) -> None:
        self.put("subscribing", ctx)

    async def on_subscribed(self, ctx: Any) -> None:
        self.put("subscribed", ctx)

    async def on_unsubscribed(self, ctx: Any) -> None:
        self.put("unsubscribed", ctx)

    async def on_publication(self, ctx: Any) -> None:
        self.put("publication", ctx)

    async def on_join(self, ctx: Any) -> None:
        self.put("join", ctx)

    async def on_leave(self, ctx: Any) -> None:
        self.put("leave", ctx)

    async def on_error(self, ctx: Any) -> None:
        self.put("error", ctx)


class Sdk:
    """Makes SDK clients for one test and disconnects them all at teardown."""

    def __init__(self) -> None:
        self.clients: list[Client] = []

    def client(self, url: str, user: str = "alice", **kw: Any) -> tuple[Client, ClientEvents]:
        events = ClientEvents()
        if "get_token" not in kw:
            kw.setdefault("token", token(user))
        kw.setdefault("min_reconnect_delay", 0.05)
        kw.setdefault("max_reconnect_delay", 0.5)
        client = Client(url, events=events, proxy=None, **kw)  # proxy=None: loopback only
        self.clients.append(client)
        return client, events

    async def connected(
        self, url: str, user: str = "alice", **kw: Any
    ) -> tuple[Client, ClientEvents]:
        """A client that is connected; its initial ``connecting`` event is consumed."""
        client, events = self.client(url, user, **kw)
        await client.connect()
        await events.next("connected")
        assert [c.code for c in events.drain("connecting")] == [0]
        return client, events

    async def close(self) -> None:
        for client in self.clients:
            await client.disconnect()
            # The SDK closes its socket in background tasks; let them finish
            # while the loop and the server still run.
            tasks = list(client._background_tasks)
            if tasks:
                await asyncio.wait(tasks, timeout=WITHIN)


@pytest.fixture
def sdk(squall: Any, io_loop: Any) -> Iterator[Sdk]:
    """SDK client factory; requested after ``squall`` so clients close before the server."""
    made = Sdk()
    yield made
    io_loop.run_sync(made.close)


async def subscribed(
    client: Client, channel: str, **kw: Any
) -> tuple[Subscription, SubEvents, Any]:
    """Subscribe and wait for ``on_subscribed``; returns (subscription, events, its context).

    The initial ``subscribing`` event is consumed.
    """
    events = SubEvents()
    sub = client.new_subscription(channel, events=events, **kw)
    await sub.subscribe()
    ctx = await events.next("subscribed")
    assert [c.code for c in events.drain("subscribing")] == [0]
    return sub, events, ctx


async def until(condition: Callable[[], bool], within: float = WITHIN) -> None:
    """Wait for a server-side condition the SDK has no event for (bounded polling)."""
    async with asyncio.timeout(within * TIME_FACTOR):
        while not condition():
            await asyncio.sleep(0.01)


async def api_ok(sq: Any, method: str, params: dict[str, Any]) -> dict[str, Any]:
    reply = await sq.api(method, params)
    assert "result" in reply, reply
    return reply["result"]


# ---------------------------------------------------------------------- connection


async def test_connect_reports_connected_with_client_id_and_version(squall, sdk):
    """connect() fires on_connected with the client id the server assigned and its version."""
    sq = await squall()
    client, events = sdk.client(sq.ws_url)
    await client.connect()
    ctx = await events.next("connected")
    assert client.state is ClientState.CONNECTED
    assert ctx.client == client.client_id
    assert ctx.version == __version__
    assert list(sq.hub.clients) == [client.client_id]
    assert sq.hub.clients[client.client_id].user == "alice"
    assert [c.code for c in events.drain("connecting")] == [0]  # "connect called" only
    assert events.drain("error") == []


# ---------------------------------------------------------------------- pub/sub


async def test_subscribe_publish_and_receive_on_chat(squall, sdk):
    """A publication from one SDK client reaches another subscriber with data, info and offset."""
    sq = await squall()
    alice, _ = await sdk.connected(sq.ws_url, "alice")
    bob, _ = await sdk.connected(sq.ws_url, "bob")
    sub_a, ev_a, ctx = await subscribed(alice, "chat:room")
    assert sub_a.state is SubscriptionState.SUBSCRIBED
    assert ctx.channel == "chat:room"
    _, ev_b, _ = await subscribed(bob, "chat:room")

    await sub_a.publish({"text": "hi"})

    for events in (ev_b, ev_a):
        pub = (await events.next("publication")).pub
        assert pub.data == {"text": "hi"}
        assert pub.offset == 1
        assert pub.info is not None
        assert pub.info.user == "alice"
        assert pub.info.client == alice.client_id


async def test_permessage_deflate_negotiated_by_the_sdk_carries_everything(squall, sdk):
    """With client.compression on, the SDK's WebSocket library (websockets) negotiates
    permessage-deflate and compresses what it sends: commands and publications, a
    large one too, go both ways."""
    sq = await squall(**{"client.compression": True})
    alice, _ = await sdk.connected(sq.ws_url, "alice")
    bob, _ = await sdk.connected(sq.ws_url, "bob")
    conn = sq.hub.clients[alice.client_id].transport._handler.ws_connection
    assert conn._decompressor is not None  # the server inflates what alice sends
    sub_a, ev_a, _ = await subscribed(alice, "chat:zip")
    _, ev_b, _ = await subscribed(bob, "chat:zip")
    big = {"text": "squall " * 6000}  # 42 KB, about 200 bytes compressed
    for data in ({"n": 1}, big, {"n": 3}):
        await sub_a.publish(data)
    for events in (ev_b, ev_a):
        got = [(await events.next("publication")).pub.data for _ in range(3)]
        assert got == [{"n": 1}, big, {"n": 3}]
    assert (await alice.rpc("echo", {"x": 1})).data == {"x": 1}
    # What alice sent arrived compressed: far fewer bytes on the wire than in its messages.
    assert conn._message_bytes_in > 42_000 > 10 * conn._wire_bytes_in


async def test_presence_and_presence_stats_with_two_clients(squall, sdk):
    """Presence lists both subscribers; presence_stats counts 2 clients and 2 users."""
    sq = await squall()
    alice, _ = await sdk.connected(sq.ws_url, "alice")
    bob, _ = await sdk.connected(sq.ws_url, "bob")
    sub_a, _, _ = await subscribed(alice, "chat:presence")
    sub_b, _, _ = await subscribed(bob, "chat:presence")

    result = await sub_a.presence()
    assert set(result.clients) == {alice.client_id, bob.client_id}
    assert {info.user for info in result.clients.values()} == {"alice", "bob"}
    assert result.clients[bob.client_id].client == bob.client_id

    stats = await sub_b.presence_stats()
    assert (stats.num_clients, stats.num_users) == (2, 2)


async def test_history_with_limit_since_and_reverse(squall, sdk):
    """history() returns the oldest N with limit, newest first with reverse, and after `since`."""
    sq = await squall()
    client, _ = await sdk.connected(sq.ws_url)
    sub, _, _ = await subscribed(client, "chat:history")
    epoch = ""
    for n in range(1, 6):
        result = await api_ok(sq, "publish", {"channel": "chat:history", "data": {"n": n}})
        epoch = result["epoch"]

    page = await sub.history(limit=2)
    assert [p.offset for p in page.publications] == [1, 2]
    assert [p.data for p in page.publications] == [{"n": 1}, {"n": 2}]
    assert (page.offset, page.epoch) == (5, epoch)

    page = await sub.history(limit=2, reverse=True)
    assert [p.offset for p in page.publications] == [5, 4]

    page = await sub.history(limit=10, since=StreamPosition(offset=3, epoch=epoch))
    assert [p.offset for p in page.publications] == [4, 5]

    page = await sub.history()  # limit 0: only the stream position
    assert page.publications == []
    assert (page.offset, page.epoch) == (5, epoch)


async def test_history_page_too_large_for_the_queue_is_cut_and_pages_on(squall, sdk):
    """A history reply that would fill the outgoing queue is cut to a shorter page the
    client pages on from: whole, it ended the connection with 3008, and an application
    loading history on every subscribe never stayed connected."""
    sq = await squall(**{"client.max_queue_bytes": 64 * 1024})
    client, events = await sdk.connected(sq.ws_url)
    sub, _, _ = await subscribed(client, "chat:big-history")
    epoch = ""
    for n in range(1, 21):  # 20 x 5 KB: more than the 64 KiB queue can take at once
        result = await api_ok(
            sq, "publish", {"channel": "chat:big-history", "data": {"n": n, "pad": "x" * 5000}}
        )
        epoch = result["epoch"]

    got: list[int] = []
    pages = 0
    while not got or got[-1] < 20:
        since = StreamPosition(offset=got[-1], epoch=epoch) if got else None
        page = await sub.history(limit=20, since=since)
        assert 0 < len(page.publications) < 20
        assert (page.offset, page.epoch) == (20, epoch)
        got += [p.data["n"] for p in page.publications]
        pages += 1
    assert got == list(range(1, 21))
    assert pages > 1

    page = await sub.history(limit=20, reverse=True)
    assert [p.offset for p in page.publications] == list(range(20, 20 - len(page.publications), -1))
    assert events.drain("connecting") == []
    assert client.state is ClientState.CONNECTED


async def test_rpc_echo_returns_the_data(squall, sdk):
    """rpc("echo", data) returns the same data."""
    sq = await squall()
    client, _ = await sdk.connected(sq.ws_url)
    result = await client.rpc("echo", {"x": [1, 2, "three"]})
    assert result.data == {"x": [1, 2, "three"]}


async def test_join_and_leave_of_another_client_are_seen(squall, sdk):
    """A subscriber sees another client's join when it subscribes and leave when it unsubscribes."""
    sq = await squall()
    alice, _ = await sdk.connected(sq.ws_url, "alice")
    bob, _ = await sdk.connected(sq.ws_url, "bob")
    _, ev_a, _ = await subscribed(alice, "chat:jl", join_leave=True)
    own = await ev_a.next("join")
    assert own.info.client == alice.client_id

    sub_b, _, _ = await subscribed(bob, "chat:jl", join_leave=True)
    join = await ev_a.next("join")
    assert (join.info.user, join.info.client) == ("bob", bob.client_id)

    await sub_b.unsubscribe()
    leave = await ev_a.next("leave")
    assert (leave.info.user, leave.info.client) == ("bob", bob.client_id)


# ---------------------------------------------------------------------- recovery / disconnects


async def test_recovery_after_dropped_connection_delivers_missed_once_in_order(squall, sdk):
    """After a force-reconnect, the SDK recovers every missed publication once, in order."""
    sq = await squall()
    client, events = await sdk.connected(sq.ws_url)
    _, ev, ctx = await subscribed(client, "chat:recover", recoverable=True)
    assert ctx.recoverable is True
    assert ctx.recovered is False
    await api_ok(sq, "publish", {"channel": "chat:recover", "data": {"n": 1}})
    assert (await ev.next("publication")).pub.offset == 1
    first_id = client.client_id

    events.hold_reconnect = asyncio.Event()
    await api_ok(
        sq,
        "disconnect",
        {"user": "alice", "disconnect": {"code": 3011, "reason": "force reconnect"}},
    )
    connecting = await events.next("connecting")
    assert (connecting.code, connecting.reason) == (3011, "force reconnect")
    assert (await ev.next("subscribing")).code == 1  # transport closed
    assert not sq.hub.clients  # really offline now; the SDK waits on the hold
    for n in range(2, 7):
        await api_ok(sq, "publish", {"channel": "chat:recover", "data": {"n": n}})
    events.hold_reconnect.set()

    await events.next("connected")
    assert client.client_id != first_id
    ctx = await ev.next("subscribed")
    assert ctx.was_recovering is True
    assert ctx.recovered is True
    await api_ok(sq, "publish", {"channel": "chat:recover", "data": {"n": 7}})

    got = []
    while not got or got[-1].offset < 7:
        got.append((await ev.next("publication")).pub)
    assert [p.offset for p in got] == [2, 3, 4, 5, 6, 7]
    assert [p.data["n"] for p in got] == [2, 3, 4, 5, 6, 7]
    assert ev.drain("publication") == []
    assert events.drain("disconnected") == []


async def test_recovery_too_large_for_the_queue_is_recovered_false_not_a_reconnect_loop(
    squall, sdk
):
    """Missed publications that would fill the outgoing queue come back as
    ``recovered: false``: sent as a reply they ended the connection with 3008 (slow),
    and the SDK, resubscribing from the same position, never got back online."""
    sq = await squall(**{"client.max_queue_bytes": 64 * 1024})
    client, events = await sdk.connected(sq.ws_url)
    _, ev, _ = await subscribed(client, "chat:big-gap", recoverable=True)
    events.hold_reconnect = asyncio.Event()
    await api_ok(sq, "disconnect", {"user": "alice", "disconnect": {"code": 3011}})
    assert (await events.next("connecting")).code == 3011
    for n in range(20):  # 20 x 5 KB: more than the 64 KiB queue can take at once
        await api_ok(
            sq, "publish", {"channel": "chat:big-gap", "data": {"n": n, "pad": "x" * 5000}}
        )
    events.hold_reconnect.set()

    await events.next("connected")
    ctx = await ev.next("subscribed")
    assert (ctx.was_recovering, ctx.recovered) == (True, False)
    assert ctx.stream_position.offset == 20  # resumes at the top
    await api_ok(sq, "publish", {"channel": "chat:big-gap", "data": {"n": 20}})
    assert (await ev.next("publication")).pub.offset == 21
    assert ev.drain("publication") == []
    assert events.drain("connecting") == []
    assert client.state is ClientState.CONNECTED


class FailsOnce(SubEvents):
    """Publication handler that raises once, on the first publication after ``arm()``."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def arm(self) -> None:
        self.armed = True

    async def on_publication(self, ctx: Any) -> None:
        if self.armed:
            self.armed = False
            self.put("failed", ctx)
            raise RuntimeError("the application could not store it")
        await super().on_publication(ctx)


async def test_recovered_publications_a_handler_failed_on_are_recovered_again(squall, sdk, io_loop):
    """The SDK keeps its position before a recovered publication its handler failed on,
    so recovering again delivers it (the subscribe reply carries the position recovered
    from, as Centrifugo's does, not the stream's top)."""
    sq = await squall()
    ch = "chat:handler-fails"
    client, events = await sdk.connected(sq.ws_url)
    await api_ok(sq, "publish", {"channel": ch, "data": {"n": 1}})
    ev = FailsOnce()
    sub = client.new_subscription(ch, events=ev, recoverable=True)
    await sub.subscribe()
    assert (await ev.next("subscribed")).stream_position.offset == 1
    await client.disconnect()
    assert (await events.next("disconnected")).reason == "disconnect called"
    for n in (2, 3):
        await api_ok(sq, "publish", {"channel": ch, "data": {"n": n}})

    ev.arm()
    # The SDK reports the handler's exception to the loop's handler, then stops.
    io_loop.asyncio_loop.set_exception_handler(lambda loop, context: None)
    try:
        await client.connect()
        ctx = await ev.next("subscribed")
        assert (ctx.recovered, ctx.stream_position.offset) == (True, 1)
        assert (await ev.next("failed")).pub.offset == 2
        assert (await events.next("disconnected")).reason.startswith("exception in event handler")
    finally:
        io_loop.asyncio_loop.set_exception_handler(None)
    assert ev.drain("publication") == []

    await client.connect()
    ctx = await ev.next("subscribed")
    assert (ctx.was_recovering, ctx.recovered) == (True, True)
    got = [(await ev.next("publication")).pub for _ in range(2)]
    assert [(p.offset, p.data["n"]) for p in got] == [(2, 2), (3, 3)]


async def test_terminal_disconnect_leaves_the_sdk_disconnected(squall, sdk):
    """A 3503 force disconnect ends in on_disconnected, and the SDK does not reconnect."""
    sq = await squall()
    client, events = await sdk.connected(sq.ws_url)
    await api_ok(
        sq,
        "disconnect",
        {"user": "alice", "disconnect": {"code": 3503, "reason": "force disconnect"}},
    )
    ctx = await events.next("disconnected")
    assert (ctx.code, ctx.reason) == (3503, "force disconnect")
    assert client.state is ClientState.DISCONNECTED
    assert events.drain("connecting") == []
    assert not sq.hub.clients
    with pytest.raises(ClientDisconnectedError):
        await client.ready()


async def test_invalid_token_is_terminal(squall, sdk):
    """A token with a bad signature ends in on_disconnected 3500, without reconnecting."""
    sq = await squall()
    client, events = sdk.client(sq.ws_url, token=token("alice") + "x")
    await client.connect()
    ctx = await events.next("disconnected")
    assert (ctx.code, ctx.reason) == (3500, "invalid token")
    assert client.state is ClientState.DISCONNECTED
    assert events.drain("connected") == []


async def test_expired_connect_token_is_replaced_through_get_token(squall, sdk):
    """Connecting with an expired token gets error 109; the SDK fetches a new one and connects."""
    sq = await squall()
    fetched: list[str] = []

    async def get_token() -> str:
        fetched.append("alice")
        return token("alice")

    client, events = sdk.client(sq.ws_url, token=token("alice", ttl=-60), get_token=get_token)
    await client.connect()
    await events.next("connected")
    assert fetched == ["alice"]
    (err,) = events.drain("error")
    assert isinstance(err.error, ReplyError)
    assert err.error.code == 109
    assert client.state is ClientState.CONNECTED


async def test_sdk_answers_server_pings_and_stays_connected(squall, sdk):
    """With fast server pings and a short pong timeout, the SDK's pongs keep it connected."""
    sq = await squall(**{"client.ping_interval": 0.1, "client.pong_timeout": 1.0})
    client, events = await sdk.connected(sq.ws_url)
    conn = sq.hub.clients[client.client_id]
    start = sq.hub.metrics.messages_in
    await until(lambda: sq.hub.metrics.messages_in >= start + 5)  # 5 pongs, no other commands
    assert not conn.closed
    assert client.state is ClientState.CONNECTED
    assert events.drain("connecting") == []


async def test_connection_token_refresh_keeps_the_client_connected_past_exp(squall, sdk):
    """With a short-lived token and get_token, the SDK refreshes and stays on one connection."""
    close_delay = 1.0 * TIME_FACTOR  # server grace after exp before closing with 3005
    sq = await squall(**{"client.expired_close_delay": close_delay})
    calls: asyncio.Queue[float] = asyncio.Queue()

    async def get_token() -> str:
        calls.put_nowait(time.time())
        return token("alice", ttl=2)

    client, events = sdk.client(sq.ws_url, get_token=get_token)
    await client.connect()
    await events.next("connected")
    conn_id = client.client_id
    first_exp = sq.hub.clients[conn_id].exp
    assert first_exp > 0

    # Keep going until a refresh happens after the first token's exp plus the
    # server's grace: without refreshes the server would have closed us (3005).
    async with asyncio.timeout((first_exp - time.time() + close_delay + 5) * TIME_FACTOR):
        while True:
            called_at = await calls.get()
            if called_at > first_exp + close_delay:
                break
    result = await client.rpc("echo", "still here")
    assert result.data == "still here"
    assert client.state is ClientState.CONNECTED
    assert client.client_id == conn_id
    assert sq.hub.clients[conn_id].exp > first_exp
    assert [c.code for c in events.drain("connecting")] == [0]  # the first connect only
    assert events.drain("disconnected") == []
    assert events.drain("error") == []


async def test_insufficient_state_unsubscribe_makes_the_sdk_resubscribe_and_recover(squall, sdk):
    """An `unsubscribe` 2500 (stream gap) makes the SDK resubscribe and recover what it missed."""
    sq = await squall()
    client, _ = await sdk.connected(sq.ws_url)
    _, ev, _ = await subscribed(client, "chat:gap", recoverable=True)
    await api_ok(sq, "publish", {"channel": "chat:gap", "data": 1})
    assert (await ev.next("publication")).pub.offset == 1

    sq.hub.on_gap(["chat:gap"])  # what the broker reports after losing its pub/sub link
    ctx = await ev.next("subscribing")
    assert (ctx.code, ctx.reason) == (2500, "insufficient state")
    ctx = await ev.next("subscribed")
    assert (ctx.was_recovering, ctx.recovered) == (True, True)
    await api_ok(sq, "publish", {"channel": "chat:gap", "data": 2})
    assert (await ev.next("publication")).pub.offset == 2
    assert ev.drain("publication") == []
    assert ev.drain("unsubscribed") == []


async def test_recovery_reads_beyond_history_size_on_a_persistent_namespace(squall, sdk):
    """On a `persist` namespace the SDK recovers more publications than the broker history keeps."""
    sq = await squall()
    client, events = await sdk.connected(sq.ws_url)
    _, ev, _ = await subscribed(client, "persist:feed", recoverable=True)
    await api_ok(sq, "publish", {"channel": "persist:feed", "data": 1})
    assert (await ev.next("publication")).pub.offset == 1

    events.hold_reconnect = asyncio.Event()
    await api_ok(sq, "disconnect", {"user": "alice", "disconnect": {"code": 3011}})
    assert (await events.next("connecting")).code == 3011
    for n in range(2, 10):  # 8 missed; the namespace's history_size is 5
        await api_ok(sq, "publish", {"channel": "persist:feed", "data": n})
    events.hold_reconnect.set()

    ctx = await ev.next("subscribed")
    assert (ctx.was_recovering, ctx.recovered) == (True, True)
    got = [(await ev.next("publication")).pub for _ in range(8)]
    assert [(p.offset, p.data) for p in got] == [(n, n) for n in range(2, 10)]
    assert ev.drain("publication") == []


async def test_get_state_is_called_again_when_recovery_is_impossible(squall, sdk):
    """With get_state, an unrecoverable position (error 112) makes the SDK reload its state."""
    sq = await squall()
    client, events = await sdk.connected(sq.ws_url)
    states: asyncio.Queue[StreamPosition] = asyncio.Queue()

    async def get_state(channel: str) -> StreamPosition:
        # What an app does: read the stream position first, then its own data.
        top = await api_ok(sq, "history", {"channel": channel, "limit": 0})
        position = StreamPosition(offset=top["offset"], epoch=top["epoch"])
        states.put_nowait(position)
        return position

    await api_ok(sq, "publish", {"channel": "chat:state", "data": 1})
    _, ev, ctx = await subscribed(client, "chat:state", get_state=get_state)
    assert (await states.get()).offset == 1
    assert (ctx.was_recovering, ctx.recovered) == (True, True)

    events.hold_reconnect = asyncio.Event()
    await api_ok(sq, "disconnect", {"user": "alice", "disconnect": {"code": 3011}})
    assert (await events.next("connecting")).code == 3011
    for n in (2, 3):
        await api_ok(sq, "publish", {"channel": "chat:state", "data": n})
    await api_ok(sq, "history_remove", {"channel": "chat:state"})  # 2 and 3 are gone
    events.hold_reconnect.set()

    async with asyncio.timeout(WITHIN * TIME_FACTOR):
        reloaded = await states.get()
    assert reloaded.offset == 3
    ctx = await ev.next("subscribed")
    assert (ctx.was_recovering, ctx.recovered) == (True, True)
    assert ctx.stream_position.offset == 3
    await api_ok(sq, "publish", {"channel": "chat:state", "data": 4})
    assert (await ev.next("publication")).pub.offset == 4
    assert ev.drain("publication") == []
    assert ev.drain("error") == []


async def test_connection_info_from_the_token_reaches_other_clients(squall, sdk):
    """The token's `info` claim shows in publications, presence and history as conn_info."""
    sq = await squall()
    alice, _ = await sdk.connected(sq.ws_url, token=token("alice", extra={"info": {"n": "A"}}))
    bob, _ = await sdk.connected(sq.ws_url, "bob")
    sub_a, _, _ = await subscribed(alice, "chat:info")
    sub_b, ev_b, _ = await subscribed(bob, "chat:info")
    await sub_a.publish("hello")
    pub = (await ev_b.next("publication")).pub
    assert pub.info.conn_info == {"n": "A"}
    presence = await sub_b.presence()
    assert presence.clients[alice.client_id].conn_info == {"n": "A"}
    page = await sub_b.history(limit=1)
    assert page.publications[0].info.conn_info == {"n": "A"}


# ---------------------------------------------------------------------- tokens, server-side subs


async def test_private_channel_needs_a_channel_token(squall, sdk):
    """A private channel subscribes with get_token's channel token; without one: error 103."""
    sq = await squall()
    client, _ = await sdk.connected(sq.ws_url)
    asked: list[str] = []

    async def get_token(channel: str) -> str:
        asked.append(channel)
        return token("alice", channel=channel)

    sub, _, ctx = await subscribed(client, "private:room", get_token=get_token)
    assert asked == ["private:room"]
    assert sub.state is SubscriptionState.SUBSCRIBED
    assert ctx.channel == "private:room"

    events = SubEvents()
    denied = client.new_subscription("private:other", events=events)
    await denied.subscribe()
    ctx = await events.next("unsubscribed")
    assert ctx.code == 103
    assert denied.state is SubscriptionState.UNSUBSCRIBED


async def test_channel_token_refresh_keeps_the_subscription_past_exp(squall, sdk):
    """A short-lived channel token is refreshed through get_token; the subscription stays."""
    close_delay = 1.0 * TIME_FACTOR  # server grace after exp before unsubscribing (2501)
    sq = await squall(**{"client.expired_close_delay": close_delay})
    client, _ = await sdk.connected(sq.ws_url)
    calls: asyncio.Queue[float] = asyncio.Queue()

    async def get_token(channel: str) -> str:
        calls.put_nowait(time.time())
        return token("alice", channel=channel, ttl=2)

    sub, ev, _ = await subscribed(client, "private:short", get_token=get_token)
    server_sub = sq.hub.clients[client.client_id].subs["private:short"]
    first_exp = server_sub.exp
    assert first_exp > 0
    async with asyncio.timeout((first_exp - time.time() + close_delay + 5) * TIME_FACTOR):
        while await calls.get() <= first_exp + close_delay:
            pass
    await sub.publish("still subscribed")
    assert (await ev.next("publication")).pub.data == "still subscribed"
    assert sq.hub.clients[client.client_id].subs["private:short"] is server_sub
    assert server_sub.exp > first_exp
    assert ev.drain("unsubscribed") == []
    assert ev.drain("subscribing") == []
    assert ev.drain("error") == []


async def test_tags_filter_is_refused_not_ignored(squall, sdk):
    """A tags filter gets 107: Squall does not filter, and ignoring the filter would
    hand the application the publications it asked not to get."""
    sq = await squall()
    client, _ = await sdk.connected(sq.ws_url)
    events = SubEvents()
    sub = client.new_subscription(
        "chat:tags", events=events, tags_filter=Filter.eq("ticker", "BTC")
    )
    await sub.subscribe()
    unsubscribed = await events.next("unsubscribed")
    assert (unsubscribed.code, unsubscribed.reason) == (
        107,
        "publication tags filter is not supported",
    )
    assert sub.state is SubscriptionState.UNSUBSCRIBED
    assert sq.hub.clients[client.client_id].subs == {}
    assert events.drain("publication") == []


async def test_server_side_subscription_from_token_channels_claim(squall, sdk):
    """Channels in the token's `channels` claim arrive as server-side subscriptions and pubs."""
    sq = await squall()
    tok = token("alice", extra={"channels": ["chat:server"]})
    client, events = sdk.client(sq.ws_url, token=tok)
    await client.connect()
    await events.next("connected")
    ctx = await events.next("subscribed")
    assert ctx.channel == "chat:server"
    assert ctx.recoverable is True

    await api_ok(sq, "publish", {"channel": "chat:server", "data": {"hello": "server"}})
    pub = await events.next("publication")
    assert pub.channel == "chat:server"
    assert pub.pub.data == {"hello": "server"}
    assert pub.pub.offset == 1
    assert client.subscriptions() == {}  # nothing client-side


async def server_side_subscriber(sq: Any, sdk: Any, channel: str) -> ClientEvents:
    """A connected SDK client whose token subscribes it to ``channel`` server-side, and
    which has received the channel's first publication (offset 1)."""
    client, events = sdk.client(sq.ws_url, token=token("alice", extra={"channels": [channel]}))
    await client.connect()
    await events.next("connected")
    await events.next("subscribed")
    await api_ok(sq, "publish", {"channel": channel, "data": 1})
    assert (await events.next("publication")).pub.offset == 1
    assert [c.code for c in events.drain("connecting")] == [0]
    return events


async def reconnected_with_2_and_3(events: ClientEvents) -> None:
    """After a disconnect: connected again, recovered, publications 2 and 3 exactly once."""
    await events.next("connected")
    ctx = await events.next("subscribed")
    assert (ctx.was_recovering, ctx.recovered) == (True, True)
    got = [(await events.next("publication")).pub for _ in range(2)]
    assert [(p.offset, p.data) for p in got] == [(2, 2), (3, 3)]
    assert events.drain("publication") == []


async def test_gap_in_a_server_side_subscription_makes_the_sdk_reconnect_and_recover(squall, sdk):
    """A publication lost on the way to the node (the broker link dropped meanwhile) ends
    a server-side subscription's connection with 3010; the SDK reconnects at once and
    recovers exactly what it missed."""
    sq = await squall()
    events = await server_side_subscriber(sq, sdk, "chat:srv-gap")

    await sq.hub.broker.unsubscribe("chat:srv-gap")  # offset 2 reaches history only
    await api_ok(sq, "publish", {"channel": "chat:srv-gap", "data": 2})
    await sq.hub.broker.subscribe("chat:srv-gap")
    await api_ok(sq, "publish", {"channel": "chat:srv-gap", "data": 3})

    ctx = await events.next("connecting")
    assert (ctx.code, ctx.reason) == (3010, "insufficient state")
    await reconnected_with_2_and_3(events)


async def test_server_side_subscription_recovers_after_reconnect(squall, sdk):
    """A server-side subscription recovers publications missed while reconnecting."""
    sq = await squall()
    events = await server_side_subscriber(sq, sdk, "chat:srv-recover")

    events.hold_reconnect = asyncio.Event()
    await api_ok(sq, "disconnect", {"user": "alice", "disconnect": {"code": 3011}})
    assert (await events.next("connecting")).code == 3011
    for n in (2, 3):
        await api_ok(sq, "publish", {"channel": "chat:srv-recover", "data": n})
    events.hold_reconnect.set()

    await reconnected_with_2_and_3(events)
