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


async def test_handshake_during_shutdown_is_refused_with_503(squall):
    """Once shutdown starts, a new WebSocket handshake gets HTTP 503, not a session."""
    import pytest
    import tornado.httpclient
    import tornado.websocket

    sq = await squall()
    sq.hub.closing = True
    with pytest.raises(tornado.httpclient.HTTPClientError) as err:
        await tornado.websocket.websocket_connect(sq.ws_url)
    assert err.value.code == 503
    assert not sq.hub.clients
