"""Redis failures under a running cluster: instances stay up, say so, and streams stay honest.

Each test starts its own ``redis-server`` (``tests.helpers.services``) so it
can kill and restart it by pid, or kill one instance's pub/sub connection
with ``CLIENT KILL ID``. Subscribers record every SDK event in arrival order
(``Timeline``), so the final view can be checked for duplicates and for gaps
that were not announced (``check_stream``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tornado.websocket
from centrifuge import ClientState
from redis.asyncio import Redis

from tests.cluster import (
    Sdk,
    SubEvents,
    api,
    api_ok,
    status,
    take,
    until,
)
from tests.helpers import services
from tests.helpers.process import SquallCluster, SquallProcess, close_checked
from tests.helpers.server import RawClient, token

PACE = 0.01  # seconds between one publisher's publications (load shape, not synchronisation)


@pytest.fixture
def redis_server() -> Iterator[services.ServiceProcess]:
    """A private redis-server (no persistence) this test may kill and restart."""
    try:
        svc = services.start_redis()
    except RuntimeError as exc:
        services.unavailable(str(exc))
    yield svc
    svc.stop()


@pytest.fixture
def cluster(
    redis_server: services.ServiceProcess, unique_prefix: str, tmp_path: Path
) -> Iterator[SquallCluster]:
    """Nodes on the private Redis; stopped by pid before it is."""
    made = SquallCluster(f"redis://127.0.0.1:{redis_server.port}/0", unique_prefix, base=tmp_path)
    yield made
    close_checked(made)


@pytest.fixture
def sdk(cluster: SquallCluster, io_loop: Any) -> Iterator[Sdk]:
    made = Sdk()
    yield made
    io_loop.run_sync(made.close)


class Timeline(SubEvents):
    """Subscription events in queues (``next``) and, in arrival order, in ``events``."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, Any]] = []

    def put(self, kind: str, ctx: Any) -> None:
        self.events.append((kind, ctx))
        super().put(kind, ctx)


async def subscribe(client: Any, channel: str, **kw: Any) -> tuple[Any, Timeline]:
    events = Timeline()
    sub = client.new_subscription(channel, events=events, **kw)
    await sub.subscribe()
    await events.next("subscribed")
    assert [c.code for c in events.drain("subscribing")] == [0]  # "subscribe called"
    return sub, events


def check_stream(timeline: Timeline) -> tuple[list[Any], list[Any]]:
    """A recoverable subscription's view: no duplicate, and no gap that was not announced.

    Offsets must follow each other, except right after a resubscribe that said
    ``recovered: false`` (the application was told it missed something).
    Returns (publication data in arrival order, recovery signals seen).
    """
    last: int | None = None
    data: list[Any] = []
    signals: list[Any] = []
    for kind, ctx in timeline.events:
        if kind == "subscribing" and ctx.code:
            signals.append(ctx.code)
        elif kind == "subscribed":
            if ctx.was_recovering:
                signals.append(("recovered", ctx.recovered))
            if not (ctx.was_recovering and ctx.recovered):
                last = ctx.stream_position.offset  # a fresh start, announced
        elif kind == "publication":
            offset = ctx.pub.offset
            assert last is None or offset == last + 1, f"silent gap: {last} -> {offset}"
            last = offset
            data.append(ctx.pub.data)
    keys = [(d["src"], d["n"]) for d in data]
    assert len(keys) == len(set(keys)), f"duplicates in {keys}"
    return data, signals


@dataclass
class Publisher:
    """Publishes ``{"src", "n"}`` through one node's API; records what was acknowledged."""

    node: SquallProcess
    src: str
    channel: str
    attempted: list[int] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)

    async def run(self, numbers: range) -> None:
        for n in numbers:
            self.attempted.append(n)
            reply = await api(
                self.node, "publish", {"channel": self.channel, "data": {"src": self.src, "n": n}}
            )
            if "result" in reply:
                self.acked.append(n)
            else:
                assert reply["error"]["code"] == 100, reply  # temporary: retry later
                self.refused.append(n)
            await asyncio.sleep(PACE)


def received(data: list[Any], src: str) -> list[int]:
    return [d["n"] for d in data if d["src"] == src]


async def test_redis_outage_instances_stay_up_deliver_locally_and_resume(
    redis_server, cluster, sdk
):
    """With Redis killed mid-stream both instances stay up and deliver locally; after a restart
    delivery resumes and recoverable subscribers are told recovered=false, with no duplicates."""
    a, b = await cluster.start_async(2)
    alice, alice_events = await sdk.connected(a.ws_url, "alice")
    bob, bob_events = await sdk.connected(b.ws_url, "bob")
    carol, carol_events = await sdk.connected(a.ws_url, "carol")  # bystander: no subscriptions
    _, stream_a = await subscribe(alice, "chat:stream", recoverable=True)
    _, stream_b = await subscribe(bob, "chat:stream", recoverable=True)
    _, ticker_a = await subscribe(alice, "ticker")  # no history
    ticker_b_sub, ticker_b = await subscribe(bob, "ticker")
    pub_a = Publisher(a, "A", "chat:stream")
    pub_b = Publisher(b, "B", "chat:stream")

    # 1. Redis up: both instances' publications reach both subscribers.
    await asyncio.gather(pub_a.run(range(10)), pub_b.run(range(10)))
    for stream in (stream_a, stream_b):
        await take(stream, 20)

    # 2. Kill Redis while both publishers are sending.
    sending = asyncio.gather(pub_a.run(range(10, 40)), pub_b.run(range(10, 40)))
    await take(stream_a, 10)  # mid-stream: some of the second batch are through
    acked_before_kill = {"A": list(pub_a.acked), "B": list(pub_b.acked)}
    redis_server.kill()
    await sending
    assert pub_a.refused, "the publisher on A never saw Redis down"
    assert pub_b.refused, "the publisher on B never saw Redis down"

    # 3. Outage: up (/health 200), not ready (/ready 503), local delivery only.
    for node in (a, b):
        await until(lambda node=node: _status_is(node, "/ready", 503), what="/ready 503")
        assert await status(node, "/health") == 200
    reply = await api(a, "publish", {"channel": "chat:stream", "data": {"src": "A", "n": 99}})
    assert reply["error"]["code"] == 100  # history channels: no position can be assigned
    for n in range(3):
        await api_ok(a, "publish", {"channel": "ticker", "data": {"src": "A", "n": n}})
    await ticker_b_sub.publish({"src": "B", "n": 0})  # an SDK publish on B, delivered on B
    assert [p.data for p in await take(ticker_a, 3)] == [{"src": "A", "n": n} for n in range(3)]
    assert [p.data for p in await take(ticker_b, 1)] == [{"src": "B", "n": 0}]
    reply = await api(b, "presence", {"channel": "chat:stream"})
    assert reply["error"]["code"] == 100  # answered at once, as a temporary error
    assert (await carol.rpc("echo", "up")).data == "up"
    for node in (a, b):
        assert node.running

    # 4. Redis back on the same port, empty: ready again, streams restart announced.
    redis_server.start()
    for node in (a, b):
        await until(lambda node=node: _status_is(node, "/ready", 200), what="/ready 200")
    for stream, ticker in ((stream_a, ticker_a), (stream_b, ticker_b)):
        ctx = await stream.next("subscribed")  # after an `unsubscribe` 2500
        assert (ctx.was_recovering, ctx.recovered) == (True, False)  # new epoch: told, not hidden
        await ticker.next("subscribed")

    # 5. Cross-instance delivery resumes on both channels.
    await asyncio.gather(pub_a.run(range(40, 50)), pub_b.run(range(40, 50)))
    assert pub_a.acked[-10:] == list(range(40, 50))
    assert pub_b.acked[-10:] == list(range(40, 50))
    await api_ok(b, "publish", {"channel": "ticker", "data": {"src": "B", "n": 1}})
    for ticker in (ticker_a, ticker_b):
        assert [p.data for p in await take(ticker, 1)] == [{"src": "B", "n": 1}]

    # Each subscriber's final view of the stream.
    for stream in (stream_a, stream_b):
        while True:  # everything acknowledged after the restart arrives
            data = [ctx.pub.data for kind, ctx in stream.events if kind == "publication"]
            if {40, 49} <= set(received(data, "A")) and {40, 49} <= set(received(data, "B")):
                break
            await stream.next("publication")
        data, signals = check_stream(stream)
        assert signals == [2500, ("recovered", False)]
        for pub in (pub_a, pub_b):
            got = received(data, pub.src)
            assert got == sorted(got)  # one source's order is kept
            assert set(got) <= set(pub.attempted)
            assert set(acked_before_kill[pub.src]) <= set(got)  # delivered before Redis died
            assert set(range(40, 50)) <= set(got)  # everything after the restart
            assert not set(got) & {99}
    for ticker in (ticker_a, ticker_b):
        assert [c.code for k, c in ticker.events if k == "subscribing" and c.code] == [2500]

    # Bystander and subscribers stayed connected throughout.
    for events in (alice_events, bob_events, carol_events):
        assert events.drain("connecting") == []
        assert events.drain("disconnected") == []
    assert carol.state is ClientState.CONNECTED


async def kill_pubsub_link(redis_server: services.ServiceProcess, node: str) -> None:
    """Have Redis drop ``node``'s pub/sub connection (``CLIENT KILL ID``)."""
    redis = Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/0")
    try:
        links = await redis.client_list(_type="pubsub")
        (link,) = [c for c in links if c["name"] == node]
        assert await redis.client_kill_filter(_id=link["id"]) == 1
    finally:
        await redis.aclose()


async def _status_is(node: SquallProcess, path: str, code: int) -> bool:
    return await status(node, path) == code


async def test_pubsub_link_killed_on_one_instance_its_subscribers_recover_exactly(
    redis_server, cluster, sdk
):
    """After Redis drops A's pub/sub link, A's subscriber gets 2500 and recovers exactly the
    missed publications; B's subscriber notices nothing."""
    # A reconnects after 1-2 s: long enough to publish while its link is certainly down.
    cluster.add(**{"redis.reconnect_delay": 2.0, "redis.reconnect_max_delay": 2.0})
    cluster.add()
    a, b = await cluster.start_async()
    alice, alice_events = await sdk.connected(a.ws_url, "alice")
    bob, bob_events = await sdk.connected(b.ws_url, "bob")  # bystander on B
    _, ev_a = await subscribe(alice, "chat:link", recoverable=True)
    _, ev_b = await subscribe(bob, "chat:link", recoverable=True)
    publisher = Publisher(b, "B", "chat:link")
    await publisher.run(range(1, 4))
    for ev in (ev_a, ev_b):
        assert [p.data["n"] for p in await take(ev, 3)] == [1, 2, 3]

    await kill_pubsub_link(redis_server, "node-a")
    await until(lambda: _status_is(a, "/ready", 503), what="A notices its link is gone")
    await publisher.run(range(4, 9))  # A is not subscribed in Redis now: it misses these
    assert publisher.acked == list(range(1, 9))
    assert await status(b, "/ready") == 200

    ctx = await ev_a.next("subscribing")
    assert (ctx.code, ctx.reason) == (2500, "insufficient state")
    ctx = await ev_a.next("subscribed", within=10)
    assert (ctx.was_recovering, ctx.recovered) == (True, True)
    await until(lambda: _status_is(a, "/ready", 200), what="A ready again")
    await publisher.run(range(9, 10))

    for ev in (ev_a, ev_b):
        got = await take(ev, 6)
        assert [(p.offset, p.data["n"]) for p in got] == [(n, n) for n in range(4, 10)]
        data, _ = check_stream(ev)
        assert [d["n"] for d in data] == list(range(1, 10))
        assert ev.drain("publication") == []
    assert [c.code for k, c in ev_b.events if k == "subscribing" and c.code] == []
    for events in (alice_events, bob_events):
        assert events.drain("connecting") == []


async def test_user_commands_on_an_instance_whose_link_is_down_answer_100(redis_server, cluster):
    """A server API disconnect (or send, subscribe, ...) through an instance whose own
    pub/sub link is down while Redis answers commands reached the other instances but
    not its own connections, and answered success: the user stayed connected there.
    It answers 100 (retry) until the link is back, then works."""
    cluster.add(**{"redis.reconnect_delay": 2.0, "redis.reconnect_max_delay": 2.0})
    (a,) = await cluster.start_async()
    mallory = RawClient(await tornado.websocket.websocket_connect(a.ws_url))
    await mallory.connect(sub="mallory")
    await kill_pubsub_link(redis_server, "node-a")
    await until(lambda: _status_is(a, "/ready", 503), what="A notices its link is gone")
    reply = await api(a, "disconnect", {"user": "mallory"})
    assert reply["error"]["code"] == 100, reply
    await until(lambda: _status_is(a, "/ready", 200), what="A ready again")
    assert "result" in await api(a, "disconnect", {"user": "mallory"})
    try:
        assert (await mallory.closed(within=5))[0] == 3503
    finally:
        mallory.close()
    assert a.log_text().count("control disconnect refused: the broker's pub/sub link is down") == 1


async def test_redis_restarted_without_its_data_persistent_channels_continue_their_stream(
    redis_server, cluster
):
    """A persistent channel's stream outlives Redis losing its data while Squall runs: reads
    and publishes continue from the store's offsets in the same epoch, never a new epoch that
    would hide the durable history."""
    (node,) = await cluster.start_async(1)
    read_first, publish_first = "persist:read-first", "persist:publish-first"
    epochs = {}
    for ch in (read_first, publish_first):
        for n in (1, 2, 3):
            result = await api_ok(node, "publish", {"channel": ch, "data": {"n": n}})
            assert result["offset"] == n
        epochs[ch] = result["epoch"]

    redis_server.kill()
    redis_server.start()  # the same port, empty
    await until(lambda: _status_is(node, "/ready", 200), what="/ready 200")

    page = await api_ok(node, "history", {"channel": read_first, "limit": -1})
    assert (page["offset"], page["epoch"]) == (3, epochs[read_first])
    assert [p["data"]["n"] for p in page["publications"]] == [1, 2, 3]
    for ch in (read_first, publish_first):
        result = await api_ok(node, "publish", {"channel": ch, "data": {"n": 4}})
        assert (result["offset"], result["epoch"]) == (4, epochs[ch])
        page = await api_ok(node, "history", {"channel": ch, "limit": -1})
        assert [p["data"]["n"] for p in page["publications"]] == [1, 2, 3, 4]
        assert (page["offset"], page["epoch"]) == (4, epochs[ch])


@pytest.fixture
def stored_cluster(
    redis_server: services.ServiceProcess, mongo_url: str, unique_prefix: str, tmp_path: Path
) -> Iterator[SquallCluster]:
    """Nodes on the private Redis and one shared MongoDB (this test's own database)."""
    made = SquallCluster(
        f"redis://127.0.0.1:{redis_server.port}/0",
        unique_prefix,
        base=tmp_path,
        overrides={"mongodb.url": mongo_url, "mongodb.database": unique_prefix},
    )
    yield made
    close_checked(made)


async def test_redis_losing_its_data_after_another_instance_published_keeps_the_stream(
    redis_server, stored_cluster
):
    """Instance B looked at persistent channels while they were still empty, then A
    published to them and Redis lost its data. B's next history read and publish continue
    A's stream from the store (same epoch, next offset): B used to trust its old look at
    the empty store, published into a new epoch and read an empty one, hiding the durable
    history from every instance."""
    a, b = await stored_cluster.start_async(2)
    read_first, publish_first = "persist:b-reads-first", "persist:b-publishes-first"
    for ch in (read_first, publish_first):
        page = await api_ok(b, "history", {"channel": ch, "limit": -1})
        assert (page["publications"], page["offset"]) == ([], 0)
    epochs = {}
    for ch in (read_first, publish_first):
        for n in (1, 2, 3):
            result = await api_ok(a, "publish", {"channel": ch, "data": {"n": n}})
        epochs[ch] = result["epoch"]
    await until(lambda: _store_idle(a), what="A has written its publications")

    redis_server.kill()
    redis_server.start()  # the same port, empty
    for node in (a, b):
        await until(lambda node=node: _status_is(node, "/ready", 200), what="/ready 200")

    page = await api_ok(b, "history", {"channel": read_first, "limit": -1})
    assert [p["data"]["n"] for p in page["publications"]] == [1, 2, 3]
    assert (page["offset"], page["epoch"]) == (3, epochs[read_first])
    result = await api_ok(b, "publish", {"channel": publish_first, "data": {"n": 4}})
    assert (result["offset"], result["epoch"]) == (4, epochs[publish_first])
    for node in (a, b):
        page = await api_ok(node, "history", {"channel": publish_first, "limit": -1})
        assert [p["data"]["n"] for p in page["publications"]] == [1, 2, 3, 4]
        assert page["epoch"] == epochs[publish_first]
    assert b.log_text().count("the broker lost the stream of persist:b-publishes-first") == 1


async def _store_idle(node: SquallProcess) -> bool:
    nodes = (await api_ok(node, "info", {}))["nodes"]
    return bool(nodes[0]["store"]["queue_depth"] == 0)


async def test_history_remove_while_redis_is_down_answers_100_in_json(redis_server, cluster):
    """history_remove with Redis unreachable gets error 100 (temporary) like every other
    method, not an HTTP 500 page; in a batch the other commands still get their replies."""
    (a,) = await cluster.start_async(1)
    await api_ok(a, "publish", {"channel": "chat:rm", "data": {"n": 1}})
    redis_server.kill()
    reply = await api(a, "history_remove", {"channel": "chat:rm"})
    assert reply["error"] == {"code": 100, "message": "internal server error", "temporary": True}
    batch = await api(
        a,
        "batch",
        {"commands": [{"history_remove": {"channel": "chat:rm"}}, {"presence_stats": {}}]},
    )
    assert [list(r) for r in batch["replies"]] == [["error"], ["error"]], batch
    assert batch["replies"][0]["error"]["code"] == 100, batch


async def test_connect_with_token_channels_while_redis_is_down_fails_and_is_retried(
    redis_server, cluster, sdk
):
    """A connect whose token lists a channel that cannot be subscribed now (Redis down) gets
    error 100 (temporary) and the SDK reconnects until it can; it used to connect without the
    channel and never receive its publications."""
    (a,) = await cluster.start_async(1)
    redis_server.kill()
    await until(lambda: _status_is(a, "/ready", 503), what="/ready 503")
    tok = token("alice", extra={"channels": ["chat:srv", "ticker"]})
    client, events = sdk.client(a.ws_url, "alice", token=tok)
    await client.connect()
    error = await events.next("error")
    assert (error.error.code, error.error.temporary) == (100, True)
    assert events.drain("connected") == []

    redis_server.start()
    await events.next("connected", within=10)
    channels = {(await events.next("subscribed")).channel for _ in range(2)}
    assert channels == {"chat:srv", "ticker"}
    await api_ok(a, "publish", {"channel": "chat:srv", "data": {"n": 1}})
    pub = await events.next("publication")
    assert (pub.channel, pub.pub.data) == ("chat:srv", {"n": 1})
    presence = await api_ok(a, "presence_stats", {"channel": "chat:srv"})
    assert presence == {"num_clients": 1, "num_users": 1}  # the failed attempts left nothing
