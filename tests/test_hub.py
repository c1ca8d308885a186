"""Hub stream tracking: duplicates are dropped, gaps make subscribers resubscribe.

A real broker produces these cases only under faults (see the Redis fault
tests); here the hub is fed publications directly, as a broker would after a
lost or repeated pub/sub message.
"""

from __future__ import annotations

from server import codes
from server.broker import Publication
from tests.helpers.server import token


async def _subscribed(sq, channel="chat:g"):
    c = await sq.raw(connect=True)
    reply = await c.command("subscribe", {"channel": channel, "recoverable": True})
    assert reply["subscribe"]["recoverable"] is True
    assert (await c.next_push())["push"]["join"]
    return c, reply["subscribe"]["epoch"]


async def test_duplicate_publication_is_delivered_once(squall):
    """A publication the broker delivers twice reaches the subscriber once."""
    sq = await squall()
    c, _ = await _subscribed(sq)
    await sq.api("publish", {"channel": "chat:g", "data": {"n": 1}})
    first = await c.next_push()
    assert first["push"]["pub"]["offset"] == 1
    epoch = sq.hub.channels["chat:g"].position.epoch
    sq.hub.on_publication("chat:g", Publication(1, epoch, b'{"n":1}'))
    await sq.api("publish", {"channel": "chat:g", "data": {"n": 2}})
    second = await c.next_push()
    assert second["push"]["pub"]["offset"] == 2
    assert second["push"]["pub"]["data"] == {"n": 2}


async def test_offset_gap_sends_insufficient_state_then_recovery_fills_it(squall):
    """After an offset jump the subscriber gets unsubscribe 2500 and can recover what it missed."""
    sq = await squall()
    c, epoch = await _subscribed(sq)
    await sq.api("publish", {"channel": "chat:g", "data": {"n": 1}})
    assert (await c.next_push())["push"]["pub"]["offset"] == 1
    # The broker's link drops while offset 2 is published: it reaches history
    # but not this node. Offset 3 arrives after the link is back.
    await sq.hub.broker.unsubscribe("chat:g")
    await sq.api("publish", {"channel": "chat:g", "data": {"n": 2}})
    await sq.hub.broker.subscribe("chat:g")
    await sq.api("publish", {"channel": "chat:g", "data": {"n": 3}})
    push = await c.next_push()
    assert push["push"]["unsubscribe"] == {"code": 2500, "reason": "insufficient state"}
    reply = await c.command(
        "subscribe", {"channel": "chat:g", "recover": True, "offset": 1, "epoch": epoch}
    )
    result = reply["subscribe"]
    assert result["recovered"] is True
    assert [p["data"]["n"] for p in result["publications"]] == [2, 3]


async def test_epoch_change_sends_insufficient_state(squall):
    """A publication from a new stream epoch makes the subscriber resubscribe (no silent gap)."""
    sq = await squall()
    c, _ = await _subscribed(sq)
    await sq.api("publish", {"channel": "chat:g", "data": {"n": 1}})
    assert (await c.next_push())["push"]["pub"]["offset"] == 1
    sq.hub.on_publication("chat:g", Publication(1, "new-epoch", b"{}"))
    push = await c.next_push()
    assert push["push"]["unsubscribe"]["code"] == 2500


async def test_on_gap_tells_every_subscriber_of_the_channel(squall):
    """When the broker reports a gap, all local subscribers of that channel resubscribe."""
    sq = await squall()
    a, _ = await _subscribed(sq)
    b, _ = await _subscribed(sq)
    assert (await a.next_push())["push"]["join"]  # b's join
    other = await sq.raw(connect=True)
    await other.command("subscribe", {"channel": "chat:other"})
    sq.hub.on_gap(["chat:g"])
    for c in (a, b):
        assert (await c.next_push())["push"]["unsubscribe"]["code"] == 2500
    assert "chat:g" not in sq.hub.channels
    assert "chat:other" in sq.hub.channels


async def test_join_leave_pushes_go_only_to_subscribers_that_ask(squall):
    """Without force_push_join_leave, only subscriptions with join_leave get join/leave pushes."""
    sq = await squall(**{"namespaces.chat.force_push_join_leave": False})
    asks = await sq.raw(connect=True)
    await asks.command("subscribe", {"channel": "chat:j", "join_leave": True})
    silent = await sq.raw(connect=True)
    await silent.command("subscribe", {"channel": "chat:j"})
    joiner = await sq.raw(connect=True, sub="bob")
    await joiner.command("subscribe", {"channel": "chat:j"})
    joins = [(await asks.next_push())["push"]["join"]["info"]["user"] for _ in range(3)]
    assert joins == ["alice", "alice", "bob"]  # itself, `silent`, then `joiner`
    joiner.close()
    push = await asks.next_push()
    assert push["push"]["leave"]["info"]["user"] == "bob"
    await sq.api("publish", {"channel": "chat:j", "data": {"after": "leave"}})
    first = await silent.next_push()
    assert first["push"]["pub"]["data"] == {"after": "leave"}  # no join/leave before it


async def test_shutdown_closes_connections_that_never_connected(squall):
    """Graceful shutdown sends 3001 to a socket that has not sent connect yet, too."""
    sq = await squall()
    idle = await sq.raw()
    connected = await sq.raw(connect=True)
    sq.hub.closing = True
    sq.hub.disconnect_all(codes.SHUTDOWN)
    assert await idle.closed() == (3001, "shutdown")
    assert await connected.closed() == (3001, "shutdown")


async def test_connect_during_shutdown_is_refused_with_reconnect_code(squall):
    """A connect that arrives while the node drains gets 3001, so the SDK reconnects elsewhere."""
    sq = await squall()
    late = await sq.raw()
    sq.hub.closing = True
    await late.send({"id": 1, "connect": {"token": token("alice")}})
    assert await late.closed() == (3001, "shutdown")
