"""The basic protocol round trip over a real WebSocket."""

from __future__ import annotations


async def test_connect_subscribe_publish_roundtrip(squall):
    """A client connects, subscribes, sees its own join, then its publication at offset 1."""
    sq = await squall()
    c = await sq.raw(connect=True)
    reply = await c.command("subscribe", {"channel": "chat:a"})
    assert "subscribe" in reply
    reply = await c.command("publish", {"channel": "chat:a", "data": {"n": 1}})
    assert reply == {"id": 3, "publish": {}}
    join = await c.next_push()
    assert join["push"]["join"]["info"]["user"] == "alice"
    push = await c.next_push()
    assert push["push"]["channel"] == "chat:a"
    assert push["push"]["pub"]["data"] == {"n": 1}
    assert push["push"]["pub"]["offset"] == 1
