"""Several Squall instances sharing one Redis behave as one hub to clients and backends."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.websocket
from centrifuge import ClientState

from tests.cluster import (
    WITHIN,
    Balancer,
    Sdk,
    api,
    api_ok,
    subscribed,
    take,
    until,
)
from tests.helpers.process import NODE_EXPIRY, SquallCluster, close_checked
from tests.helpers.server import RawClient, token


@pytest.fixture
def cluster(redis_url: str, unique_prefix: str, tmp_path: Path) -> Iterator[SquallCluster]:
    """Nodes on the shared Redis under this test's prefix; stopped by pid at teardown."""
    made = SquallCluster(redis_url, unique_prefix, base=tmp_path)
    yield made
    close_checked(made)


@pytest.fixture
def sdk(cluster: SquallCluster, io_loop: Any) -> Iterator[Sdk]:
    """SDK clients; requested after ``cluster`` so they are closed before the nodes stop."""
    made = Sdk()
    yield made
    io_loop.run_sync(made.close)


async def test_publications_reach_subscribers_on_every_instance_in_order(cluster, sdk):
    """SDK publishes on A and B and API publishes on C reach subscribers on A and B, in order."""
    a, b, c = await cluster.start_async(3)
    alice, _ = await sdk.connected(a.ws_url, "alice")
    bob, _ = await sdk.connected(b.ws_url, "bob")
    sub_a, ev_a, _ = await subscribed(alice, "chat:order")
    sub_b, ev_b, _ = await subscribed(bob, "chat:order")
    per_source = 30

    async def publish_sdk(sub: Any, src: str) -> None:
        for n in range(per_source):
            await sub.publish({"src": src, "n": n})

    async def publish_api(src: str) -> None:
        for n in range(per_source):
            await api_ok(c, "publish", {"channel": "chat:order", "data": {"src": src, "n": n}})

    await asyncio.gather(publish_sdk(sub_a, "A"), publish_sdk(sub_b, "B"), publish_api("C"))

    total = 3 * per_source
    got_a = await take(ev_a, total)
    got_b = await take(ev_b, total)
    views = []
    for got in (got_a, got_b):
        assert [p.offset for p in got] == list(range(1, total + 1))
        view = [(p.offset, p.data["src"], p.data["n"]) for p in got]
        for src in "ABC":
            assert [n for _, s, n in view if s == src] == list(range(per_source))
        views.append(view)
    assert views[0] == views[1]  # the same order on both instances
    assert ev_a.drain("publication") == []
    assert ev_b.drain("publication") == []


async def test_presence_and_stats_list_clients_of_all_instances(cluster, sdk):
    """presence and presence_stats, asked on any instance, count the clients of every instance."""
    a, b = await cluster.start_async(2)
    alice, _ = await sdk.connected(a.ws_url, "alice")
    bob1, _ = await sdk.connected(b.ws_url, "bob")
    bob2, _ = await sdk.connected(b.ws_url, "bob")
    sub_a, _, _ = await subscribed(alice, "chat:presence")
    for bob in (bob1, bob2):
        await subscribed(bob, "chat:presence")
    ids = {alice.client_id, bob1.client_id, bob2.client_id}

    result = await sub_a.presence()  # asked through A
    assert set(result.clients) == ids
    assert result.clients[bob2.client_id].user == "bob"
    stats = await sub_a.presence_stats()
    assert (stats.num_clients, stats.num_users) == (3, 2)

    for node in (a, b):  # the server API of either instance
        presence = await api_ok(node, "presence", {"channel": "chat:presence"})
        assert {cid: info["user"] for cid, info in presence["presence"].items()} == {
            alice.client_id: "alice",
            bob1.client_id: "bob",
            bob2.client_id: "bob",
        }
        stats_api = await api_ok(node, "presence_stats", {"channel": "chat:presence"})
        assert stats_api == {"num_clients": 3, "num_users": 2}

    await bob2.disconnect()
    stats_after = {}

    async def bob2_gone() -> bool:
        stats_after.update(await api_ok(a, "presence_stats", {"channel": "chat:presence"}))
        return stats_after["num_clients"] == 2

    await until(bob2_gone, what="presence drops the disconnected client on the other instance")
    assert stats_after == {"num_clients": 2, "num_users": 2}


async def test_join_and_leave_are_seen_across_instances(cluster, sdk):
    """A subscriber on A sees a client on B join and leave, and B's client sees A's join."""
    a, b = await cluster.start_async(2)
    alice, _ = await sdk.connected(a.ws_url, "alice")
    bob, _ = await sdk.connected(b.ws_url, "bob")
    _, ev_a, _ = await subscribed(alice, "chat:jl", join_leave=True)
    assert (await ev_a.next("join")).info.client == alice.client_id

    sub_b, ev_b, _ = await subscribed(bob, "chat:jl", join_leave=True)
    join = await ev_a.next("join")
    assert (join.info.user, join.info.client) == ("bob", bob.client_id)
    assert (await ev_b.next("join")).info.client == bob.client_id

    await sub_b.unsubscribe()
    leave = await ev_a.next("leave")
    assert (leave.info.user, leave.info.client) == ("bob", bob.client_id)
    assert ev_a.drain("join") == []


async def test_short_subscriptions_join_before_they_leave_on_other_instances(cluster):
    """Clients that subscribe on A and go away right after the reply: an observer on B
    gets each one's join before its leave. The two were published by separate calls on
    any of the pool's connections, and under load a leave often overtook its join (the
    observer's members list then kept ghosts)."""
    a, b = await cluster.start_async(2)
    ch = "chat:short-lived"
    observer = RawClient(await tornado.websocket.websocket_connect(b.ws_url))
    await observer.connect(sub="observer")
    assert "subscribe" in await observer.command("subscribe", {"channel": ch})
    total, at_once = 600, 100

    async def visit(n: int) -> None:
        c = RawClient(await tornado.websocket.websocket_connect(a.ws_url))
        try:
            await c.send({"id": 1, "connect": {"token": token(f"u{n}")}})
            await c.send({"id": 2, "subscribe": {"channel": ch}})
            while (await c.next_non_ping(within=WITHIN)).get("id") != 2:
                pass
        finally:
            c.close()

    gate = asyncio.Semaphore(at_once)

    async def gated(n: int) -> None:
        async with gate:
            await visit(n)

    events: dict[str, list[str]] = {}
    try:
        await asyncio.gather(*(gated(n) for n in range(total)))
        while sum(len(e) for e in events.values()) < 2 * total:
            push = (await observer.next_push(within=WITHIN))["push"]
            for event in ("join", "leave"):
                if event in push and push[event]["info"]["user"] != "observer":
                    events.setdefault(push[event]["info"]["client"], []).append(event)
    finally:
        observer.close()
    out_of_order = [c for c, e in events.items() if e != ["join", "leave"]]
    assert (len(events), out_of_order) == (total, [])


async def test_api_disconnect_on_one_instance_drops_the_user_on_another(cluster, sdk):
    """`disconnect` through A's API closes bob's connection on B; others stay connected."""
    a, b = await cluster.start_async(2)
    bob, bob_events = await sdk.connected(b.ws_url, "bob")
    carol, carol_events = await sdk.connected(b.ws_url, "carol")  # bystander on B
    dave, _ = await sdk.connected(a.ws_url, "dave")  # bystander on A

    await api_ok(a, "disconnect", {"user": "bob", "disconnect": {"code": 4501, "reason": "bye"}})
    ctx = await bob_events.next("disconnected")
    assert (ctx.code, ctx.reason) == (4501, "bye")
    assert bob.state is ClientState.DISCONNECTED

    for client in (carol, dave):
        assert (await client.rpc("echo", "still here")).data == "still here"
        assert client.state is ClientState.CONNECTED
    assert carol_events.drain("connecting") == []
    assert carol_events.drain("disconnected") == []


async def test_api_subscribe_and_unsubscribe_reach_users_on_other_instances(cluster, sdk):
    """`subscribe`/`unsubscribe` through A's API act on bob's connection on B."""
    a, b = await cluster.start_async(2)
    bob, events = await sdk.connected(b.ws_url, "bob")
    _, ev_chat, _ = await subscribed(bob, "chat:client-side")

    # Server-side subscription made through A.
    await api_ok(a, "subscribe", {"user": "bob", "channel": "chat:server-side"})
    ctx = await events.next("subscribed")
    assert ctx.channel == "chat:server-side"
    await api_ok(a, "publish", {"channel": "chat:server-side", "data": {"n": 1}})
    pub = await events.next("publication")
    assert (pub.channel, pub.pub.data) == ("chat:server-side", {"n": 1})

    # Unsubscribe both, through A.
    await api_ok(a, "unsubscribe", {"user": "bob", "channel": "chat:server-side"})
    assert (await events.next("unsubscribed")).channel == "chat:server-side"
    await api_ok(a, "unsubscribe", {"user": "bob", "channel": "chat:client-side"})
    ctx = await ev_chat.next("unsubscribed")
    assert ctx.code == 2000

    # Bob stays connected and subscribed to nothing, on B.
    channels = await api_ok(b, "channels", {})
    assert channels == {"channels": {}}
    assert bob.state is ClientState.CONNECTED
    assert events.drain("connecting") == []


async def test_info_lists_live_instances_and_drops_a_stopped_one(cluster, sdk):
    """`info` on any instance lists the live ones (name, uptime, clients); a stopped one expires."""
    a, b, c = await cluster.start_async(3)
    for _ in range(2):
        await sdk.connected(a.ws_url, "alice")
    bob, _ = await sdk.connected(b.ws_url, "bob")
    want = {"node-a": 2, "node-b": 1, "node-c": 0}
    seen: dict[str, dict[str, Any]] = {}

    async def converged(node: Any) -> bool:
        nodes = (await api_ok(node, "info", {}))["nodes"]
        seen.clear()
        seen.update({n["name"]: n for n in nodes})
        return {name: n["num_clients"] for name, n in seen.items()} == want

    for node in (a, b, c):
        await until(lambda node=node: converged(node), what=f"info on {node.port}: {seen}")
        assert len({n["uid"] for n in seen.values()}) == 3
        for n in seen.values():
            assert isinstance(n["uptime"], int)
            assert n["uptime"] >= 0
            assert n["version"]
    await bob.disconnect()

    async def without_b(node: Any) -> bool:
        nodes = (await api_ok(node, "info", {}))["nodes"]
        return sorted(n["name"] for n in nodes) == ["node-a", "node-c"]

    assert await b.stop_async() == 0
    for node in (a, c):  # no heartbeat from B for NODE_EXPIRY seconds: it is dropped
        await until(
            lambda node=node: without_b(node),
            within=NODE_EXPIRY + WITHIN,
            what="the stopped node leaves info",
        )


async def test_recovery_after_reconnecting_to_another_instance(cluster, sdk, io_loop):
    """A client behind a load balancer whose instance stops recovers exactly what it missed on B."""
    a, b = await cluster.start_async(2)
    balancer = await Balancer([a.port, b.port]).start()
    try:
        await _recover_on_another_instance(a, b, balancer, sdk)
    finally:
        await balancer.close()


async def _recover_on_another_instance(a: Any, b: Any, balancer: Balancer, sdk: Sdk) -> None:
    client, events = await sdk.connected(balancer.ws_url, "alice")
    assert balancer.routed == [a.port]
    _, ev, ctx = await subscribed(client, "chat:move", recoverable=True)
    assert ctx.recoverable is True
    bystander, by_events = await sdk.connected(b.ws_url, "bob")
    _, by_ev, _ = await subscribed(bystander, "chat:move")
    for n in (1, 2, 3):
        await api_ok(b, "publish", {"channel": "chat:move", "data": n})
    assert [p.offset for p in await take(ev, 3)] == [1, 2, 3]

    events.hold_reconnect = asyncio.Event()
    stopping = asyncio.ensure_future(a.stop_async())
    connecting = await events.next("connecting")
    assert (connecting.code, connecting.reason) == (3001, "shutdown")
    assert await stopping == 0
    for n in range(4, 9):  # missed: A is gone and the SDK is not connected anywhere
        await api_ok(b, "publish", {"channel": "chat:move", "data": n})
    events.hold_reconnect.set()

    await events.next("connected")
    assert balancer.routed[-1] == b.port
    ctx = await ev.next("subscribed")
    assert (ctx.was_recovering, ctx.recovered) == (True, True)
    await api_ok(b, "publish", {"channel": "chat:move", "data": 9})
    got = await take(ev, 6)
    assert [(p.offset, p.data) for p in got] == [(n, n) for n in range(4, 10)]
    assert ev.drain("publication") == []
    assert ev.drain("unsubscribed") == []

    # The bystander on B saw every publication once, without interruption.
    assert [(p.offset, p.data) for p in await take(by_ev, 9)] == [(n, n) for n in range(1, 10)]
    assert by_ev.drain("publication") == []
    assert by_ev.drain("subscribing") == []
    assert by_events.drain("connecting") == []
    channels = await api_ok(b, "channels", {})
    assert channels["channels"]["chat:move"]["num_clients"] == 2
    assert (await api(b, "info", {}))["result"]["nodes"][0]["num_clients"] == 2


@pytest.fixture
def stored_cluster(
    redis_url: str, mongo_url: str, unique_prefix: str, tmp_path: Path
) -> Iterator[SquallCluster]:
    """Nodes on the shared Redis and one shared MongoDB (this test's own database)."""
    made = SquallCluster(
        redis_url,
        unique_prefix,
        base=tmp_path,
        overrides={"mongodb.url": mongo_url, "mongodb.database": unique_prefix},
    )
    yield made
    close_checked(made)


@pytest.fixture
def stored_sdk(stored_cluster: SquallCluster, io_loop: Any) -> Iterator[Sdk]:
    made = Sdk()
    yield made
    io_loop.run_sync(made.close)


async def _start_with_a_slow_writer(cluster: SquallCluster) -> list[Any]:
    """Nodes A, B, C; B writes to MongoDB only every minute, so what it accepts stays
    queued there (any node's store may lag like this for a moment)."""
    cluster.add()
    cluster.add(**{"mongodb.flush_interval": 60})
    cluster.add()
    return await cluster.start_async()


async def _written(node: Any) -> bool:
    nodes = (await api_ok(node, "info", {}))["nodes"]
    return bool(nodes[0]["store"]["queue_depth"] == 0)


async def test_persistent_history_and_recovery_include_what_another_instance_has_not_stored(
    stored_cluster, stored_sdk
):
    """History and recovery of a persistent channel on C include a publication that B
    accepted but has not written to MongoDB yet: the broker's window has it."""
    a, b, c = await _start_with_a_slow_writer(stored_cluster)
    channel = "persist:lagging-writer"
    client, events = await stored_sdk.connected(c.ws_url, "alice")
    _, ev, ctx = await subscribed(client, channel, recoverable=True)
    assert ctx.recoverable is True

    events.hold_reconnect = asyncio.Event()
    await api_ok(c, "disconnect", {"user": "alice", "disconnect": {"code": 3011, "reason": "r"}})
    assert (await events.next("connecting")).code == 3011
    for node, n in ((a, 1), (b, 2), (a, 3)):  # missed
        result = await api_ok(node, "publish", {"channel": channel, "data": n})
        assert result["offset"] == n
    await until(lambda: _written(a), what="A has written its publications")

    page = await api_ok(c, "history", {"channel": channel, "limit": -1})
    assert [(p["offset"], p["data"]) for p in page["publications"]] == [(1, 1), (2, 2), (3, 3)]
    events.hold_reconnect.set()
    ctx = await ev.next("subscribed")
    assert (ctx.was_recovering, ctx.recovered) == (True, True)
    assert [(p.offset, p.data) for p in await take(ev, 3)] == [(1, 1), (2, 2), (3, 3)]
    assert ev.drain("publication") == []


async def test_persistent_recovery_with_a_publication_nowhere_readable_is_not_recovered(
    stored_cluster, stored_sdk
):
    """When a missed publication is neither in the broker's window nor stored yet (B still
    queues it), recovery says ``recovered: false``: never a silent gap."""
    a, b, c = await _start_with_a_slow_writer(stored_cluster)
    channel = "persist:hole"  # the broker keeps the last 5
    client, events = await stored_sdk.connected(c.ws_url, "alice")
    _, ev, _ = await subscribed(client, channel, recoverable=True)

    events.hold_reconnect = asyncio.Event()
    await api_ok(c, "disconnect", {"user": "alice", "disconnect": {"code": 3011, "reason": "r"}})
    assert (await events.next("connecting")).code == 3011
    await api_ok(a, "publish", {"channel": channel, "data": 1})
    await api_ok(b, "publish", {"channel": channel, "data": 2})  # queued on B
    for n in range(3, 9):
        await api_ok(a, "publish", {"channel": channel, "data": n})
    await until(lambda: _written(a), what="A has written its publications")

    events.hold_reconnect.set()
    ctx = await ev.next("subscribed")
    assert (ctx.was_recovering, ctx.recovered) == (True, False)
    assert ctx.stream_position.offset == 8
    assert ev.drain("publication") == []


async def test_history_remove_also_drops_what_another_instance_has_not_stored(stored_cluster):
    """``history_remove`` through A drops the publication B accepted and still queues for
    MongoDB: B writing it afterwards (here on shutdown) must not bring it back."""
    a, b, c = await _start_with_a_slow_writer(stored_cluster)
    channel = "persist:removed"
    await api_ok(a, "publish", {"channel": channel, "data": 1})
    await api_ok(b, "publish", {"channel": channel, "data": 2})  # queued on B
    await until(lambda: _written(a), what="A has written its publication")
    info = (await api_ok(b, "info", {}))["nodes"][0]["store"]
    assert info["queue_depth"] == 1

    await api_ok(a, "history_remove", {"channel": channel})
    await until(lambda: _written(b), what="B has dropped its queued publication")
    assert await b.stop_async() == 0  # a queued publication would be written now

    page = await api_ok(c, "history", {"channel": channel, "limit": -1})
    assert page["publications"] == []
    assert page["offset"] == 2  # the position is kept
    await api_ok(a, "publish", {"channel": channel, "data": 3})
    page = await api_ok(c, "history", {"channel": channel, "limit": -1})
    assert [(p["offset"], p["data"]) for p in page["publications"]] == [(3, 3)]
