"""The Centrifugo client protocol (v2, JSON) over a real WebSocket, command by command.

Raw JSON lines go over a real socket to the real app (``squall`` fixture); the
assertions are what an SDK would see: reply fields, push order, close codes.
Time-based behaviour runs with small configured intervals and waits for the
next message with a bounded timeout, never for a fixed time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
import tornado.httpclient

from server import __version__, codes
from tests.helpers.logs import expect_log
from tests.helpers.server import RawClient, token

# ---------------------------------------------------------------------- helpers


def kind(msg: dict[str, Any]) -> str:
    """'pub', 'join', 'leave', 'unsubscribe', ... for a push; 'reply' or 'ping' otherwise."""
    if "push" in msg:
        return next(k for k in msg["push"] if k != "channel")
    return "ping" if msg == {} else "reply"


async def next_pub(c: RawClient, within: float = 2.0) -> dict[str, Any]:
    """The next publication push (join/leave pushes and pings are skipped)."""
    while True:
        msg = await c.next_push(within)
        assert "closed" not in msg, msg
        if kind(msg) == "pub":
            return msg["push"]


async def next_of(c: RawClient, wanted: str, within: float = 2.0) -> dict[str, Any]:
    """The next push of one kind (others are skipped)."""
    while True:
        msg = await c.next_push(within)
        assert "closed" not in msg, msg
        if kind(msg) == wanted:
            return msg["push"]


async def subscribed(c: RawClient, channel: str, **params: Any) -> dict[str, Any]:
    reply = await c.command("subscribe", {"channel": channel, **params})
    assert "subscribe" in reply, reply
    return reply["subscribe"]


async def publish_api(sq: Any, channel: str, data: Any) -> dict[str, Any]:
    reply = await sq.api("publish", {"channel": channel, "data": data})
    assert "result" in reply, reply
    return reply["result"]


def error_code(reply: dict[str, Any]) -> int:
    assert "error" in reply, reply
    return int(reply["error"]["code"])


def chan() -> str:
    return uuid.uuid4().hex[:8]


# ---------------------------------------------------------------------- connect


async def test_connect_result_fields(squall):
    """The connect reply carries client id, version, ping interval and pong, and no expiry."""
    sq = await squall()
    c = await sq.raw()
    reply = await c.connect(token=token("alice", ttl=None))
    assert reply["id"] == 1
    result = reply["connect"]
    assert uuid.UUID(result["client"])
    assert result["version"] == __version__
    assert result["ping"] == 25
    assert result["pong"] is True
    assert "expires" not in result
    assert "ttl" not in result
    assert "subs" not in result
    assert result["client"] in sq.hub.clients


async def test_connect_result_with_expiring_token(squall):
    """A token with exp makes the connect reply say expires and the seconds left (ttl)."""
    sq = await squall()
    c = await sq.raw()
    result = (await c.connect(token=token("alice", ttl=600)))["connect"]
    assert result["expires"] is True
    assert 590 <= result["ttl"] <= 600


async def test_token_issued_by_a_clock_ahead_of_ours_is_accepted(squall):
    """iat is not a validity bound (as in Centrifugo): a backend whose clock runs ahead
    mints tokens with iat in our future. They were refused with 3500 (the SDK then stays
    disconnected for good) and as channel tokens with 103."""
    sq = await squall()
    c = await sq.raw()
    ahead = {"iat": int(time.time()) + 30}
    assert "connect" in await c.connect(token=token("alice", extra=ahead))
    ch = "private:" + chan()
    assert await subscribed(c, ch, token=token("alice", channel=ch, extra=ahead, ttl=None)) == {}


async def test_token_naming_a_user_or_channel_no_reply_can_carry_is_invalid(squall):
    """A lone surrogate in sub or in a channels entry (valid JSON, so a signed token)
    is an invalid token (3500): no JSON reply can carry it. As a user id it reached
    the join pushes and presence of every channel the connection joined."""
    sq = await squall()
    bystander = await sq.raw(connect=True)
    ch = "chat:" + chan()
    await subscribed(bystander, ch)
    for bad in (token("al\ud800ice"), token("alice", extra={"channels": ["chat:\udfff"]})):
        c = await sq.raw()
        with expect_log("squall.client", r"disconnect code=3500.*not valid Unicode|strings"):
            reply = await c.command("connect", {"token": bad})
        assert reply == {"closed": 3500, "reason": "invalid token"}
    reply = await bystander.command("presence", {"channel": ch})
    assert len(reply["presence"]["presence"]) == 1, reply


async def test_connect_without_pings_configured(squall):
    """With client.ping_interval 0 the connect reply announces no pings."""
    sq = await squall(**{"client.ping_interval": 0})
    result = (await (await sq.raw()).connect())["connect"]
    assert "ping" not in result
    assert "pong" not in result


async def test_every_connection_gets_its_own_client_id(squall):
    """Two connections of one user have different client ids."""
    sq = await squall()
    a = (await (await sq.raw()).connect())["connect"]["client"]
    b = (await (await sq.raw()).connect())["connect"]["client"]
    assert a != b


async def test_anonymous_connect_refused_by_default(squall):
    """Without a token, connect is refused with 3500 unless anonymous connections are on."""
    sq = await squall()
    c = await sq.raw()
    with expect_log("squall.client", r"disconnect code=3500.*token required"):
        assert await c.command("connect", {}) == {"closed": 3500, "reason": "invalid token"}


async def test_token_with_empty_sub_refused_when_anonymous_off(squall):
    """A valid token for user '' is anonymous, and refused like no token when that is off."""
    sq = await squall()
    c = await sq.raw()
    with expect_log("squall.client", r"disconnect code=3500"):
        reply = await c.command("connect", {"token": token("")})
    assert reply == {"closed": 3500, "reason": "invalid token"}


async def test_anonymous_connect_allowed_by_config(squall):
    """With allow_anonymous_connect, a client without token connects as user ''."""
    sq = await squall(**{"client.allow_anonymous_connect": True})
    c = await sq.raw()
    reply = await c.command("connect", {})
    assert "connect" in reply, reply
    who = await c.command("rpc", {"method": "whoami"})
    assert who["rpc"]["data"] == {"user": "", "client": reply["connect"]["client"]}


async def test_connect_and_subscribe_in_one_frame(squall):
    """connect and a subscribe sent together in one frame both succeed, in order."""
    sq = await squall()
    c = await sq.raw()
    await c.send(
        {"id": 1, "connect": {"token": token("alice")}},
        {"id": 2, "subscribe": {"channel": "news"}},
    )
    first, second = await c.next_non_ping(), await c.next_non_ping()
    assert first["id"] == 1
    assert "connect" in first
    assert second == {"id": 2, "subscribe": {}}


# ---------------------------------------------------------------------- batching


async def test_batched_commands_get_batched_replies_in_order(squall):
    """Several commands in one frame are answered in order, in one frame."""
    sq = await squall()
    c = await sq.raw(connect=True)
    frames_before = c.frames
    await c.send(
        {"id": 5, "rpc": {"method": "echo", "data": "a"}},
        {"id": 3, "ping": {}},
        {"id": 4, "rpc": {"method": "echo", "data": "b"}},
        {"id": 9, "rpc": {"method": "whoami"}},
    )
    replies = [await c.next_non_ping() for _ in range(4)]
    assert [r["id"] for r in replies] == [5, 3, 4, 9]
    assert replies[0]["rpc"] == {"data": "a"}
    assert replies[1] == {"id": 3, "ping": {}}
    assert replies[2]["rpc"] == {"data": "b"}
    assert c.frames - frames_before == 1


async def test_batched_subscribe_publish_history_run_in_order(squall):
    """Commands of one frame run in order: history sees the publish sent just before it."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "chat:" + chan()
    await c.send(
        {"id": 2, "subscribe": {"channel": ch}},
        {"id": 3, "publish": {"channel": ch, "data": {"n": 1}}},
        {"id": 4, "history": {"channel": ch, "limit": -1}},
    )
    replies = []
    while len(replies) < 3:
        msg = await c.next_non_ping()
        if "id" in msg:
            replies.append(msg)
    assert [r["id"] for r in replies] == [2, 3, 4]
    assert "subscribe" in replies[0]
    assert replies[1] == {"id": 3, "publish": {}}
    assert [p["data"] for p in replies[2]["history"]["publications"]] == [{"n": 1}]


# ---------------------------------------------------------------------- server-side subscriptions


async def test_token_channels_become_server_side_subscriptions(squall):
    """Channels in the token's `channels` claim are subscribed at connect and then receive pubs."""
    sq = await squall()
    c = await sq.raw()
    ch1, ch2 = "chat:" + chan(), "news" + chan()
    tok = token("alice", extra={"channels": [ch1, ch2]})
    reply = await c.connect(token=tok)
    subs = reply["connect"]["subs"]
    assert set(subs) == {ch1, ch2}
    assert subs[ch1]["recoverable"] is True
    assert subs[ch1]["offset"] == 0
    assert subs[ch1]["epoch"]
    assert subs[ch2] == {}
    await publish_api(sq, ch1, {"to": 1})
    await publish_api(sq, ch2, {"to": 2})
    first = await next_pub(c)
    second = await next_pub(c)
    assert (first["channel"], first["pub"]["data"], first["pub"]["offset"]) == (ch1, {"to": 1}, 1)
    assert (second["channel"], second["pub"]["data"]) == (ch2, {"to": 2})


async def test_token_channel_in_unknown_namespace_is_skipped(squall):
    """A token channel whose namespace does not exist is left out; the rest still works."""
    sq = await squall()
    c = await sq.raw()
    with expect_log("squall.client", r"token channel 'nope:x' skipped"):
        reply = await c.connect(token=token("alice", extra={"channels": ["nope:x", "news"]}))
    assert set(reply["connect"]["subs"]) == {"news"}


async def test_token_with_more_channels_than_max_channels_is_disconnected_3505(squall):
    """client.max_channels bounds a token's channels too, as in Centrifugo (3505): a token
    listing 6 channels with a limit of 3 subscribed all 6, and the connection could then
    subscribe to nothing itself. At the limit it connects."""
    sq = await squall(**{"client.max_channels": 3, "client.max_commands_per_frame": 10})
    c = await sq.raw()
    many = [f"news{i}" for i in range(6)]
    with expect_log("squall.client", r"disconnect code=3505 .*token lists 6 channels"):
        reply = await c.command("connect", {"token": token("alice", extra={"channels": many})})
    assert reply.get("closed") == 3505, reply
    assert sq.hub.clients == {}
    c2 = await sq.raw()
    reply = await c2.connect(token=token("alice", extra={"channels": many[:3]}))
    assert set(reply["connect"]["subs"]) == set(many[:3])


async def test_server_side_subscription_shows_in_presence(squall):
    """A server-side subscription counts in presence like a client one."""
    sq = await squall()
    ch = "chat:" + chan()
    c = await sq.raw()
    client_id = (await c.connect(token=token("alice", extra={"channels": [ch]})))["connect"][
        "client"
    ]
    await next_of(c, "join")  # announced to the channel, ourselves included
    reply = await c.command("presence", {"channel": ch})
    assert list(reply["presence"]["presence"]) == [client_id]


async def test_server_side_subscription_gets_join_and_leave_only_when_forced(squall):
    """A server-side subscription cannot ask for join/leave pushes: it gets them only when
    the namespace forces them (``force_push_join_leave``), as in Centrifugo. It got them
    always: every visitor of a big token channel cost a push to each of its members."""
    sq = await squall(**{"namespaces.chat.force_push_join_leave": False})
    ch = "chat:" + chan()
    member = await sq.raw()
    await member.connect(token=token("alice", extra={"channels": [ch]}))
    watcher = await sq.raw(connect=True, sub="carol")
    await subscribed(watcher, ch, join_leave=True)  # asks
    visitor = await sq.raw(connect=True, sub="bob")
    await subscribed(visitor, ch)
    while (await next_of(watcher, "join"))["join"]["info"]["user"] != "bob":
        pass  # its own join first
    await publish_api(sq, ch, "after the join")
    push = await member.next_push()
    assert kind(push) == "pub", push  # the join never came


def _hold_broker_subscribe(sq: Any, channel: str) -> asyncio.Event:
    """Hold the broker subscribe of ``channel`` until the returned event is set (a slow
    engine: a connect subscribing its token's channels waits there)."""
    release = asyncio.Event()
    real = sq.hub.broker.subscribe

    async def held(ch: str) -> None:
        if ch == channel:
            await release.wait()
        await real(ch)

    sq.hub.broker.subscribe = held
    return release


@pytest.mark.parametrize("method", ["disconnect", "subscribe", "unsubscribe", "send"])
async def test_server_api_command_during_a_connect_reaches_that_connection(squall, method):
    """A server API command for a user whose connect is still subscribing its token's
    channels reaches that connection: a disconnect closes it, the others act once the
    connect reply is out. They answered success and did nothing (a banned user connected
    anyway), as the connection was not registered until its connect finished."""
    sq = await squall()
    slow, other = "chat:" + chan(), "chat:" + chan()
    release = _hold_broker_subscribe(sq, slow)
    c = await sq.raw()
    await c.send({"id": 1, "connect": {"token": token("mallory", extra={"channels": [slow]})}})
    await asyncio.sleep(0.1)  # the connect waits for the broker
    params = {
        "disconnect": {"user": "mallory"},
        "subscribe": {"user": "mallory", "channel": other},
        "unsubscribe": {"user": "mallory", "channel": slow},
        "send": {"user": "mallory", "data": {"hello": 1}},
    }[method]
    assert (await sq.api(method, params)) == {"result": {}}
    release.set()
    if method == "disconnect":
        assert (await c.closed())[0] == 3503
        assert sq.hub.user_clients("mallory") == []
        return
    reply = await c.next_non_ping()
    assert reply["id"] == 1, reply
    assert slow in reply["connect"]["subs"], reply
    push = (await c.next_push())["push"]
    while "join" in push or "leave" in push:
        push = (await c.next_push())["push"]
    if method == "subscribe":
        assert (push["channel"], "subscribe" in push) == (other, True), push
    elif method == "unsubscribe":
        assert (push["channel"], push["unsubscribe"]["code"]) == (slow, 2000), push
        reply = await sq.api("presence_stats", {"channel": slow})
        assert reply["result"]["num_clients"] == 0
    else:
        assert push == {"message": {"data": {"hello": 1}}}, push


async def test_server_side_subscription_recovers_on_reconnect(squall):
    """Reconnecting with `subs` positions recovers the missed pubs of server-side channels."""
    sq = await squall()
    ch = "chat:" + chan()
    tok = token("alice", extra={"channels": [ch]})
    first = await sq.raw()
    epoch = (await first.connect(token=tok))["connect"]["subs"][ch]["epoch"]
    await publish_api(sq, ch, "seen")
    assert (await next_pub(first))["pub"]["offset"] == 1
    first.close()
    await publish_api(sq, ch, "missed-1")
    await publish_api(sq, ch, "missed-2")
    again = await sq.raw()
    reply = await again.connect(
        token=tok, subs={ch: {"recover": True, "offset": 1, "epoch": epoch}}
    )
    sub = reply["connect"]["subs"][ch]
    assert sub["recovered"] is True
    assert [p["data"] for p in sub["publications"]] == ["missed-1", "missed-2"]
    assert (sub["epoch"], sub["offset"]) == (epoch, 1)  # recovered from; the pubs move it


async def test_server_side_recoveries_share_the_outgoing_queue(squall):
    """Server-side channels recovered in one connect reply share half of
    client.max_queue_bytes: the one that does not fit is recovered: false, rather than
    a reply over the queue's limit ending the connection with 3008 at every reconnect."""
    sq = await squall(**{"client.max_queue_bytes": 64 * 1024})
    ch1, ch2 = "chat:" + chan(), "chat:" + chan()
    tok = token("alice", extra={"channels": [ch1, ch2]})
    first = await sq.raw()
    subs = (await first.connect(token=tok))["connect"]["subs"]
    first.close()
    for ch in (ch1, ch2):
        for n in range(5):  # 5 x 4 KB per channel: one fits in 32 KiB, both do not
            await publish_api(sq, ch, {"n": n, "pad": "x" * 4000})
    again = await sq.raw()
    reply = await again.connect(
        token=tok,
        subs={ch: {"recover": True, "offset": 0, "epoch": subs[ch]["epoch"]} for ch in subs},
    )
    got = reply["connect"]["subs"]
    assert got[ch1]["recovered"] is True
    assert [p["offset"] for p in got[ch1]["publications"]] == [1, 2, 3, 4, 5]
    assert got[ch2]["recovered"] is False
    assert "publications" not in got[ch2]
    assert got[ch2]["offset"] == 5
    await publish_api(sq, ch2, "live")
    assert (await next_pub(again))["pub"]["offset"] == 6  # still connected


# ---------------------------------------------------------------------- subscribe / unsubscribe


async def test_subscribe_result_for_recoverable_channel(squall):
    """Subscribing with recoverable to a history channel returns the stream position."""
    sq = await squall()
    ch = "chat:" + chan()
    pos = await publish_api(sq, ch, "before")
    c = await sq.raw(connect=True)
    result = await subscribed(c, ch, recoverable=True)
    assert result == {
        "recoverable": True,
        "positioned": True,
        "epoch": pos["epoch"],
        "offset": 1,
    }


async def test_subscribe_without_recoverable_has_no_position(squall):
    """A plain subscribe to a history channel returns no position (SDK did not ask)."""
    sq = await squall()
    c = await sq.raw(connect=True)
    assert await subscribed(c, "chat:" + chan()) == {}


async def test_unknown_namespace_gets_102(squall):
    """Subscribing to a channel of an unconfigured namespace gets 102 unknown channel."""
    sq = await squall()
    c = await sq.raw(connect=True)
    reply = await c.command("subscribe", {"channel": "nope:room"})
    assert reply["error"] == {"code": 102, "message": "unknown channel"}


async def test_already_subscribed_gets_105(squall):
    """Subscribing twice to the same channel gets 105 already subscribed."""
    sq = await squall()
    c = await sq.raw(connect=True)
    await subscribed(c, "news")
    reply = await c.command("subscribe", {"channel": "news"})
    assert reply["error"] == {"code": 105, "message": "already subscribed"}


async def test_max_channels_gets_106(squall):
    """Going over client.max_channels subscriptions gets 106 limit exceeded."""
    sq = await squall(**{"client.max_channels": 2})
    c = await sq.raw(connect=True)
    await subscribed(c, "a")
    await subscribed(c, "b")
    assert error_code(await c.command("subscribe", {"channel": "c"})) == 106
    assert await c.command("unsubscribe", {"channel": "a"}) == {"id": 5, "unsubscribe": {}}
    await subscribed(c, "c")


async def test_unsubscribed_channel_stops_delivering(squall):
    """After unsubscribe, publications to the channel no longer arrive."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "news" + chan()
    await subscribed(c, ch)
    await publish_api(sq, ch, 1)
    assert (await next_pub(c))["pub"]["data"] == 1
    assert "unsubscribe" in await c.command("unsubscribe", {"channel": ch})
    await publish_api(sq, ch, 2)
    # Had the pub been delivered, it would have been queued before this reply.
    assert await c.command("ping") == {"id": 4, "ping": {}}
    assert not c.inbox


async def test_unsubscribe_from_unknown_channel_is_fine(squall):
    """Unsubscribing from a channel one is not subscribed to is a no-op success."""
    sq = await squall()
    c = await sq.raw(connect=True)
    assert await c.command("unsubscribe", {"channel": "never"}) == {"id": 2, "unsubscribe": {}}


# ---------------------------------------------------------------------- permissions per namespace


async def test_chat_subscribers_may_publish_others_may_not(squall):
    """In chat (allow_publish_for_subscriber) only subscribers publish."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "chat:" + chan()
    assert error_code(await c.command("publish", {"channel": ch, "data": 1})) == 103
    await subscribed(c, ch)
    assert "publish" in await c.command("publish", {"channel": ch, "data": 2})
    assert (await next_pub(c))["pub"]["data"] == 2


async def test_chat_refuses_anonymous_subscribers(squall):
    """chat allows authenticated users only: an anonymous subscribe gets 103."""
    sq = await squall(**{"client.allow_anonymous_connect": True})
    c = await sq.raw()
    assert "connect" in await c.command("connect", {})
    assert error_code(await c.command("subscribe", {"channel": "chat:x"})) == 103


async def test_public_namespace_allows_anonymous_subscribe_and_publish(squall):
    """public lets anonymous connections subscribe, and publish without subscribing."""
    sq = await squall(**{"client.allow_anonymous_connect": True})
    reader = await sq.raw()
    assert "connect" in await reader.command("connect", {})
    writer = await sq.raw()
    assert "connect" in await writer.command("connect", {})
    ch = "public:" + chan()
    await subscribed(reader, ch)
    assert "publish" in await writer.command("publish", {"channel": ch, "data": {"anon": 1}})
    push = await next_pub(reader)
    assert push["pub"]["data"] == {"anon": 1}
    assert push["pub"]["info"]["user"] == ""


async def test_public_history_for_clients_but_not_anonymous(squall):
    """public's allow_history_for_client serves authenticated users only."""
    sq = await squall(**{"client.allow_anonymous_connect": True})
    ch = "public:" + chan()
    await publish_api(sq, ch, 1)
    user = await sq.raw(connect=True)
    reply = await user.command("history", {"channel": ch, "limit": -1})
    assert [p["data"] for p in reply["history"]["publications"]] == [1]
    anon = await sq.raw()
    assert "connect" in await anon.command("connect", {})
    assert error_code(await anon.command("history", {"channel": ch, "limit": -1})) == 103


async def test_readonly_namespace_refuses_publish_even_to_subscribers(squall):
    """readonly allows subscribing but never publishing from clients."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "readonly:" + chan()
    await subscribed(c, ch)
    assert error_code(await c.command("publish", {"channel": ch, "data": 1})) == 103
    await publish_api(sq, ch, "from backend")
    assert (await next_pub(c))["pub"]["data"] == "from backend"


async def test_private_namespace_needs_a_channel_token(squall):
    """private channels need a channel token; with one the subscriber can publish."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "private:" + chan()
    assert error_code(await c.command("subscribe", {"channel": ch})) == 103
    result = await subscribed(c, ch, token=token("alice", channel=ch, ttl=None))
    assert result == {}
    assert "publish" in await c.command("publish", {"channel": ch, "data": "hi"})
    assert (await next_pub(c))["pub"]["data"] == "hi"


async def test_dollar_channels_need_a_channel_token_whatever_the_namespace_allows(squall):
    """A channel starting with $ is private, as in Centrifugo, even in a namespace that
    lets every client subscribe; the $ is not part of the namespace name."""
    sq = await squall()
    c = await sq.raw(connect=True)
    for ch in ("$chat:" + chan(), "$" + chan()):
        reply = await c.command("subscribe", {"channel": ch})
        assert reply["error"] == {"code": 103, "message": "channel token required"}, ch
        await subscribed(c, ch, token=token("alice", channel=ch))
        await c.command("publish", {"channel": ch, "data": "hi"})  # chat: subscribers publish
        assert (await next_pub(c))["pub"]["data"] == "hi"
    assert error_code(await c.command("subscribe", {"channel": "$nope:x"})) == 102
    await subscribed(c, "chat:" + chan())  # no token needed without the $


async def test_map_and_shared_poll_subscriptions_are_refused(squall):
    """Subscription types other than a stream (type 0) are refused with Centrifugo's
    codes for a channel without them (108 shared poll, 103 map): Squall keeps no channel
    state to send, and a stream reply would leave the SDK waiting for it."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "chat:" + chan()
    for kind, code in ((1, 103), (2, 103), (3, 103), (4, 108)):
        reply = await c.command("subscribe", {"channel": ch, "type": kind})
        assert reply["error"] == {
            "code": code,
            "message": "only stream subscriptions (type 0) are supported",
        }
    for bad in ("map", True, 1.5):
        reply = await c.command("subscribe", {"channel": ch, "type": bad})
        assert reply["error"] == {"code": 107, "message": "type must be an integer"}
    assert sq.hub.clients[next(iter(sq.hub.clients))].subs == {}
    await subscribed(c, ch, type=0)


async def test_skip_history_publications_reach_a_subscriber_still_catching_up(squall):
    """The first subscriber of a channel with history waits for the stream to reach
    the position it read (went_live); a skip_history publication (offset 0, typing
    indicators, say) arriving then was taken for a gap: 2500 and never delivered, and
    with a resubscribe each time, a subscriber churned through them all. It is
    delivered now, and the stream goes on after it."""
    sq = await squall()
    ch = "public:" + chan()
    for n in range(3):
        await publish_api(sq, ch, {"n": n})
    c = await sq.raw(connect=True)
    sub = await subscribed(c, ch, recoverable=True)
    assert (sub["positioned"], sub["offset"]) == (True, 3), sub
    reply = await sq.api("publish", {"channel": ch, "data": {"typing": 1}, "skip_history": True})
    assert reply["result"]["offset"] == 0, reply
    push = await c.next_push()
    assert kind(push) == "pub", push  # not an unsubscribe with 2500
    assert push["push"]["pub"]["data"] == {"typing": 1}
    await publish_api(sq, ch, {"n": 3})
    pub = (await next_pub(c))["pub"]
    assert (pub["data"], pub["offset"]) == ({"n": 3}, 4)


async def test_channel_token_info_is_attached_to_publications(squall):
    """The channel token's info travels as chan_info with the subscriber's publications."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "private:" + chan()
    await subscribed(c, ch, token=token("alice", channel=ch, extra={"info": {"role": "mod"}}))
    await c.command("publish", {"channel": ch, "data": 1})
    assert (await next_pub(c))["pub"]["info"]["chan_info"] == {"role": "mod"}


async def test_refreshed_tokens_info_shows_in_later_publications(squall):
    """A refresh token's info replaces the connection's (one without info keeps it), a
    sub_refresh token's info the subscription's, as in Centrifugo: subscriptions kept
    the info of their subscribe, and a refresh without info dropped the connection's."""
    sq = await squall()
    c = await sq.raw()
    await c.connect(token=token("alice", extra={"info": {"v": 1}}))
    ch = "private:" + chan()
    await subscribed(c, ch, token=token("alice", channel=ch, extra={"info": {"role": "a"}}))

    async def published_info() -> dict[str, Any]:
        await c.command("publish", {"channel": ch, "data": 1})
        info = (await next_pub(c))["pub"]["info"]
        return {k: info.get(k) for k in ("conn_info", "chan_info")}

    assert await published_info() == {"conn_info": {"v": 1}, "chan_info": {"role": "a"}}
    assert "refresh" in await c.command(
        "refresh", {"token": token("alice", extra={"info": {"v": 2}})}
    )
    assert await published_info() == {"conn_info": {"v": 2}, "chan_info": {"role": "a"}}
    assert "refresh" in await c.command("refresh", {"token": token("alice")})
    assert await published_info() == {"conn_info": {"v": 2}, "chan_info": {"role": "a"}}
    fresh = token("alice", channel=ch, extra={"info": {"role": "b"}})
    assert "sub_refresh" in await c.command("sub_refresh", {"channel": ch, "token": fresh})
    assert await published_info() == {"conn_info": {"v": 2}, "chan_info": {"role": "b"}}


async def test_expired_channel_token_gets_109(squall):
    """An expired channel token gets 109 so the SDK fetches a new one."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "private:" + chan()
    old = token("alice", channel=ch, extra={"exp": int(time.time()) - 10}, ttl=None)
    assert error_code(await c.command("subscribe", {"channel": ch, "token": old})) == 109


async def test_channel_token_of_another_user_gets_103(squall):
    """A channel token minted for bob does not let alice in."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "private:" + chan()
    assert (
        error_code(await c.command("subscribe", {"channel": ch, "token": token("bob", channel=ch)}))
        == 103
    )


async def test_top_level_channels_follow_the_channel_section(squall):
    """Channels without a namespace: users subscribe, subscribers publish."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "lobby" + chan()
    assert error_code(await c.command("publish", {"channel": ch, "data": 1})) == 103
    await subscribed(c, ch)
    assert "publish" in await c.command("publish", {"channel": ch, "data": 2})


# ---------------------------------------------------------------------- presence and history


async def test_presence_and_stats_for_subscribers(squall):
    """Subscribers of chat see who is there: client ids with user and conn_info."""
    sq = await squall()
    a = await sq.raw()
    a_id = (await a.connect(token=token("alice", extra={"info": {"name": "A"}})))["connect"][
        "client"
    ]
    b = await sq.raw()
    b_id = (await b.connect(sub="bob"))["connect"]["client"]
    ch = "chat:" + chan()
    await subscribed(a, ch)
    await subscribed(b, ch)
    reply = await a.command("presence", {"channel": ch})
    presence = reply["presence"]["presence"]
    assert presence == {
        a_id: {"user": "alice", "client": a_id, "conn_info": {"name": "A"}},
        b_id: {"user": "bob", "client": b_id},
    }
    stats = await b.command("presence_stats", {"channel": ch})
    assert stats["presence_stats"] == {"num_clients": 2, "num_users": 2}


async def test_presence_needs_subscription_in_chat(squall):
    """In chat, presence and presence_stats are for subscribers only (103)."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "chat:" + chan()
    assert error_code(await c.command("presence", {"channel": ch})) == 103
    assert error_code(await c.command("presence_stats", {"channel": ch})) == 103
    assert error_code(await c.command("history", {"channel": ch})) == 103


async def test_presence_not_enabled_gets_108(squall):
    """Presence on a namespace without presence gets 108 not available."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "public:" + chan()
    await subscribed(c, ch)
    assert error_code(await c.command("presence", {"channel": ch})) == 108
    assert error_code(await c.command("presence_stats", {"channel": ch})) == 108


async def test_history_not_enabled_gets_108(squall):
    """History on a namespace without history gets 108 not available."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "readonly:" + chan()
    await subscribed(c, ch)
    assert error_code(await c.command("history", {"channel": ch})) == 108


async def test_history_limit_since_and_reverse(squall):
    """History honours limit (0 = position only, -1 = all), since and reverse."""
    sq = await squall()
    ch = "chat:" + chan()
    for n in range(1, 6):
        pos = await publish_api(sq, ch, {"n": n})
    epoch = pos["epoch"]
    c = await sq.raw(connect=True)
    await subscribed(c, ch)

    async def history(**params: Any) -> tuple[list[int], dict[str, Any]]:
        reply = await c.command("history", {"channel": ch, **params})
        result = reply["history"]
        return [p["offset"] for p in result.get("publications", [])], result

    offsets, result = await history()
    assert offsets == []
    assert (result["offset"], result["epoch"]) == (5, epoch)
    assert (await history(limit=-1))[0] == [1, 2, 3, 4, 5]
    assert (await history(limit=2))[0] == [1, 2]
    assert (await history(limit=2, reverse=True))[0] == [5, 4]
    assert (await history(limit=-1, reverse=True))[0] == [5, 4, 3, 2, 1]
    assert (await history(since={"offset": 2, "epoch": epoch}, limit=-1))[0] == [3, 4, 5]
    assert (await history(since={"offset": 2, "epoch": epoch}, limit=2))[0] == [3, 4]
    assert (await history(since={"offset": 5, "epoch": epoch}, limit=-1))[0] == []
    offsets, result = await history(limit=1)
    assert result["publications"][0]["data"] == {"n": 1}


async def test_history_pages_back_and_takes_since_without_epoch(squall):
    """Reversed, since pages back (offsets below it); a since without epoch reads the
    current stream (Centrifugo's rule) instead of an empty page; reversed since 0 is 107."""
    sq = await squall()
    ch = "chat:" + chan()
    for n in range(1, 6):
        pos = await publish_api(sq, ch, {"n": n})
    epoch = pos["epoch"]
    c = await sq.raw(connect=True)
    await subscribed(c, ch)

    async def offsets(**params: Any) -> list[int]:
        reply = await c.command("history", {"channel": ch, **params})
        return [p["offset"] for p in reply["history"].get("publications", [])]

    newest = await offsets(limit=2, reverse=True)
    assert newest == [5, 4]
    since = {"offset": newest[-1], "epoch": epoch}
    assert await offsets(since=since, limit=2, reverse=True) == [3, 2]
    assert await offsets(since={"offset": 2, "epoch": epoch}, limit=2, reverse=True) == [1]
    assert await offsets(since={"offset": 2}, limit=-1) == [3, 4, 5]
    assert await offsets(since={"offset": 2, "epoch": ""}, limit=-1) == [3, 4, 5]
    assert await offsets(since={"offset": 4}, limit=-1, reverse=True) == [3, 2, 1]
    reply = await c.command("history", {"channel": ch, "since": {"offset": 0}, "reverse": True})
    assert error_code(reply) == 107


async def test_history_of_a_long_persistent_stream_comes_in_pages_of_10000(squall):
    """History "all" (limit -1) of a persistent channel longer than 10 000 returns the
    first 10 000 (reversed: the newest), client and server API alike, and paging on
    with ``since`` reaches the rest: a stream of millions is never read whole."""
    sq = await squall()
    ch = "persist:" + chan()
    opts = sq.hub.config.channel_options(ch)
    total = 10_050
    for n in range(1, total + 1):
        pos = await sq.hub.publish(ch, b"%d" % n, opts)
    assert pos.offset == total
    c = await sq.raw(connect=True)
    await subscribed(c, ch)

    async def offsets(**params: Any) -> list[int]:
        reply = await c.command("history", {"channel": ch, **params})
        assert reply["history"]["offset"] == total, reply
        return [p["offset"] for p in reply["history"]["publications"]]

    first = await offsets(limit=-1)
    assert first == list(range(1, 10_001))
    rest = await offsets(limit=-1, since={"offset": first[-1], "epoch": pos.epoch})
    assert rest == list(range(10_001, total + 1))
    assert await offsets(limit=20_000, reverse=True) == list(range(total, 50, -1))
    reply = await sq.api("history", {"channel": ch, "limit": -1})
    assert len(reply["result"]["publications"]) == 10_000
    assert reply["result"]["publications"][-1]["offset"] == 10_000


async def test_persistent_history_never_returns_a_publication_older_than_persist_ttl(squall):
    """A persistent channel's history and recovery skip publications older than
    ``persist_ttl`` (README), although the broker's window still holds them: its
    ``history_ttl`` is renewed by every publish, so a busy channel keeps old ones."""
    ttl = 1.0
    sq = await squall(
        **{"namespaces.persist.history_ttl": ttl, "namespaces.persist.persist_ttl": ttl}
    )
    ch = "persist:" + chan()
    opts = sq.hub.config.channel_options(ch)
    first = await sq.hub.publish(ch, b"1", opts)
    await asyncio.sleep(0.7 * ttl)
    await sq.hub.publish(ch, b"2", opts)  # renews the window's ttl
    await asyncio.sleep(0.5 * ttl)  # the first is 1.2 ttl old, the second 0.5
    reply = await sq.api("history", {"channel": ch, "limit": -1})
    assert [p["data"] for p in reply["result"]["publications"]] == [2], reply
    c = await sq.raw(connect=True)
    sub = await c.command(
        "subscribe",
        {"channel": ch, "recoverable": True, "recover": True, "offset": 0, "epoch": first.epoch},
    )
    # Offset 1 is gone: not recoverable exactly (the window alone would have "recovered").
    assert (sub["subscribe"]["recovered"], sub["subscribe"].get("publications")) == (False, None)
    await c.command("unsubscribe", {"channel": ch})
    sub = await c.command(
        "subscribe",
        {"channel": ch, "recoverable": True, "recover": True, "offset": 1, "epoch": first.epoch},
    )
    assert sub["subscribe"]["recovered"] is True, sub
    assert [p["data"] for p in sub["subscribe"]["publications"]] == [2], sub


async def test_history_since_another_epoch_gets_112(squall):
    """History since a position from another stream epoch gets 112, not an empty page."""
    sq = await squall()
    ch = "chat:" + chan()
    await publish_api(sq, ch, 1)
    c = await sq.raw(connect=True)
    await subscribed(c, ch)
    reply = await c.command("history", {"channel": ch, "since": {"offset": 0, "epoch": "gone"}})
    assert reply["error"] == {"code": 112, "message": "unrecoverable position"}


async def test_history_keeps_only_history_size(squall):
    """Only the last history_size publications are kept (public: 10)."""
    sq = await squall()
    ch = "public:" + chan()
    for n in range(1, 13):
        await publish_api(sq, ch, n)
    c = await sq.raw(connect=True)
    reply = await c.command("history", {"channel": ch, "limit": -1})
    assert [p["data"] for p in reply["history"]["publications"]] == list(range(3, 13))


# ---------------------------------------------------------------------- recovery


async def test_recovery_returns_exactly_the_missed_publications(squall):
    """Resubscribing with recover and the last position returns every missed pub once, in order."""
    sq = await squall()
    ch = "chat:" + chan()
    a = await sq.raw(connect=True)
    first = await subscribed(a, ch, recoverable=True)
    epoch = first["epoch"]
    for n in (1, 2):
        await publish_api(sq, ch, {"n": n})
    assert [(await next_pub(a))["pub"]["offset"] for _ in range(2)] == [1, 2]
    a.close()
    for n in (3, 4, 5):
        await publish_api(sq, ch, {"n": n})

    b = await sq.raw(connect=True)
    result = await subscribed(b, ch, recoverable=True, recover=True, offset=2, epoch=epoch)
    assert result["was_recovering"] is True
    assert result["recovered"] is True
    assert result["recoverable"] is True
    # The position recovered from, as Centrifugo replies: the SDKs move it with each
    # publication the app handled, so one it failed on is recovered again.
    assert (result["epoch"], result["offset"]) == (epoch, 2)
    pubs = result["publications"]
    assert [p["offset"] for p in pubs] == [3, 4, 5]
    assert [p["data"] for p in pubs] == [{"n": 3}, {"n": 4}, {"n": 5}]
    await publish_api(sq, ch, {"n": 6})
    push = await next_pub(b)
    assert (push["pub"]["offset"], push["pub"]["data"]) == (6, {"n": 6})


async def test_recovery_with_nothing_missed(squall):
    """Recovering from the current top is recovered with no publications."""
    sq = await squall()
    ch = "chat:" + chan()
    pos = await publish_api(sq, ch, 1)
    c = await sq.raw(connect=True)
    result = await subscribed(c, ch, recover=True, offset=pos["offset"], epoch=pos["epoch"])
    assert result["recovered"] is True
    assert "publications" not in result


async def test_recovery_with_wrong_epoch_is_not_recovered(squall):
    """A position from another epoch cannot be recovered: recovered false, live pubs continue."""
    sq = await squall()
    ch = "chat:" + chan()
    pos = await publish_api(sq, ch, 1)
    c = await sq.raw(connect=True)
    result = await subscribed(c, ch, recover=True, offset=1, epoch="not-" + pos["epoch"])
    assert result["was_recovering"] is True
    assert result["recovered"] is False
    assert result["epoch"] == pos["epoch"]
    assert "publications" not in result
    await publish_api(sq, ch, 2)
    assert (await next_pub(c))["pub"]["offset"] == 2


async def test_recovery_without_epoch_recovers_from_the_current_stream(squall):
    """A recover without epoch (centrifuge-js ``since: {offset}``) means the current
    epoch, as in Centrifugo and the history call: the missed publications come back."""
    sq = await squall()
    ch = "chat:" + chan()
    for n in (1, 2, 3):
        pos = await publish_api(sq, ch, n)
    c = await sq.raw(connect=True)
    result = await subscribed(c, ch, recoverable=True, recover=True, offset=1)
    assert result["recovered"] is True
    assert [p["offset"] for p in result["publications"]] == [2, 3]
    assert (result["epoch"], result["offset"]) == (pos["epoch"], 1)
    assert "unsubscribe" in await c.command("unsubscribe", {"channel": ch})
    # An empty epoch is the same; get_state's flag 2 gets the publications, not 112.
    result = await subscribed(c, ch, recoverable=True, recover=True, offset=2, epoch="", flag=2)
    assert result["recovered"] is True
    assert [p["offset"] for p in result["publications"]] == [3]
    await publish_api(sq, ch, 4)
    assert (await next_pub(c))["pub"]["offset"] == 4


async def test_recovery_beyond_the_history_window_is_not_recovered(squall):
    """When history no longer reaches back to the position, recovered is false (no silent gap)."""
    sq = await squall()
    ch = "public:" + chan()  # history_size 10
    pos = await publish_api(sq, ch, 1)
    for n in range(2, 16):
        await publish_api(sq, ch, n)
    c = await sq.raw(connect=True)
    result = await subscribed(c, ch, recover=True, offset=2, epoch=pos["epoch"])
    assert result["recovered"] is False
    assert "publications" not in result
    assert result["offset"] == 15


async def test_recovery_from_a_future_offset_is_not_recovered(squall):
    """An offset ahead of the stream (e.g. from a lost stream) is not recoverable."""
    sq = await squall()
    ch = "chat:" + chan()
    pos = await publish_api(sq, ch, 1)
    c = await sq.raw(connect=True)
    result = await subscribed(c, ch, recover=True, offset=99, epoch=pos["epoch"])
    assert result["recovered"] is False


# ---------------------------------------------------------------------- join / leave


async def test_join_and_leave_pushes(squall):
    """Subscribers of a join_leave channel see others join and leave, with their info."""
    sq = await squall()
    ch = "chat:" + chan()
    a = await sq.raw(connect=True)
    await subscribed(a, ch)
    assert (await next_of(a, "join"))["join"]["info"]["user"] == "alice"  # itself
    b = await sq.raw()
    b_id = (await b.connect(token=token("bob", extra={"info": {"n": "B"}})))["connect"]["client"]
    await subscribed(b, ch)
    join = await next_of(a, "join")
    assert join == {
        "channel": ch,
        "join": {"info": {"user": "bob", "client": b_id, "conn_info": {"n": "B"}}},
    }
    assert "unsubscribe" in await b.command("unsubscribe", {"channel": ch})
    leave = await next_of(a, "leave")
    assert leave["leave"]["info"]["client"] == b_id


async def test_join_and_leave_reach_a_subscriber_positioned_in_existing_history(squall):
    """A recoverable subscriber to a channel that already has history gets join/leave
    pushes at once, not only after the next publication (as Centrifugo does)."""
    sq = await squall()
    ch = "chat:" + chan()
    await publish_api(sq, ch, 1)  # the stream is at offset 1 before anyone subscribes here
    a = await sq.raw(connect=True)
    assert (await subscribed(a, ch, recoverable=True))["offset"] == 1
    assert (await next_of(a, "join"))["join"]["info"]["user"] == "alice"  # itself
    b = await sq.raw(connect=True, sub="bob")
    await subscribed(b, ch, recoverable=True)
    assert (await next_of(a, "join"))["join"]["info"]["user"] == "bob"
    b.close()
    assert (await next_of(a, "leave"))["leave"]["info"]["user"] == "bob"
    await publish_api(sq, ch, 2)
    push = await next_pub(a)
    assert (push["pub"]["offset"], push["pub"]["data"]) == (2, 2)


async def test_leave_push_when_a_subscriber_disconnects(squall):
    """A subscriber whose connection drops is announced as leaving."""
    sq = await squall()
    ch = "chat:" + chan()
    a = await sq.raw(connect=True)
    await subscribed(a, ch)
    b = await sq.raw(connect=True, sub="bob")
    await subscribed(b, ch)
    assert (await next_of(a, "join"))["join"]["info"]["user"] == "alice"
    assert (await next_of(a, "join"))["join"]["info"]["user"] == "bob"
    b.close()
    assert (await next_of(a, "leave"))["leave"]["info"]["user"] == "bob"


async def test_presence_forgets_a_subscriber_that_left(squall):
    """Once a subscriber's leave is announced, presence no longer lists it."""
    sq = await squall()
    ch = "chat:" + chan()
    a = await sq.raw()
    a_id = (await a.connect())["connect"]["client"]
    await subscribed(a, ch)
    b = await sq.raw(connect=True, sub="bob")
    await subscribed(b, ch)
    stats = await a.command("presence_stats", {"channel": ch})
    assert stats["presence_stats"] == {"num_clients": 2, "num_users": 2}
    b.close()
    assert (await next_of(a, "leave"))["leave"]["info"]["user"] == "bob"
    reply = await a.command("presence", {"channel": ch})
    assert list(reply["presence"]["presence"]) == [a_id]


async def test_unsubscribe_then_subscribe_again_keeps_the_subscriber_in_presence(squall):
    """A client that leaves a presence channel and joins it again right away (a view
    mounted again) is listed in presence once more: the removal of its old entry ran after
    the new one was added and deleted it, until the next refresh (25 s by default)."""
    sq = await squall()
    ch = "chat:" + chan()
    a = await sq.raw(connect=True)
    await subscribed(a, ch)
    b = await sq.raw()
    b_id = (await b.connect(sub="bob"))["connect"]["client"]
    await subscribed(b, ch)
    await b.send(
        {"id": 100, "unsubscribe": {"channel": ch}}, {"id": 101, "subscribe": {"channel": ch}}
    )
    replies = []
    while len(replies) < 2:
        msg = await b.next_non_ping()
        if "id" in msg:
            replies.append(msg)
    assert [r["id"] for r in replies] == [100, 101], replies
    assert "subscribe" in replies[1], replies
    reply = await a.command("presence", {"channel": ch})
    assert b_id in reply["presence"]["presence"], reply
    stats = await sq.api("presence_stats", {"channel": ch})
    assert stats["result"] == {"num_clients": 2, "num_users": 2}
    # Bob's join, his leave, then his join again, in that order.
    seen = []
    while len(seen) < 3:
        push = (await a.next_push())["push"]
        if kind({"push": push}) in ("join", "leave"):
            event = kind({"push": push})
            if push[event]["info"]["user"] == "bob":
                seen.append(event)
    assert seen == ["join", "leave", "join"]


# ---------------------------------------------------------------------- rpc / send


async def test_rpc_echo_and_whoami(squall):
    """Built-in RPC: echo returns its data, whoami the user and client id."""
    sq = await squall()
    c = await sq.raw()
    client_id = (await c.connect())["connect"]["client"]
    data = {"nested": [1, "two", {"three": None}]}
    assert (await c.command("rpc", {"method": "echo", "data": data}))["rpc"] == {"data": data}
    who = await c.command("rpc", {"method": "whoami"})
    assert who["rpc"]["data"] == {"user": "alice", "client": client_id}


async def test_unknown_rpc_method_gets_104(squall):
    """An RPC method nobody registered gets 104 and the connection stays."""
    sq = await squall()
    c = await sq.raw(connect=True)
    assert error_code(await c.command("rpc", {"method": "nope"})) == 104
    assert "rpc" in await c.command("rpc", {"method": "echo"})


async def test_registered_rpc_handler_is_called(squall):
    """An application RPC handler registered on the hub answers rpc calls."""
    sq = await squall()

    async def double(client: Any, data: bytes) -> bytes:
        return str(int(data) * 2).encode()

    sq.hub.rpc_handlers["double"] = double
    c = await sq.raw(connect=True)
    assert (await c.command("rpc", {"method": "double", "data": 21}))["rpc"] == {"data": 42}


async def test_send_reaches_message_handlers_without_reply(squall):
    """`send` delivers data to the hub's message handlers and gets no reply."""
    sq = await squall()
    got: asyncio.Future[tuple[str, bytes]] = asyncio.get_running_loop().create_future()
    sq.hub.message_handlers.append(lambda client, data: got.set_result((client.user, data)))
    c = await sq.raw(connect=True)
    await c.send({"send": {"data": {"hello": "server"}}})
    assert await c.command("ping") == {"id": 2, "ping": {}}  # the next message is this reply
    assert await asyncio.wait_for(got, 2) == ("alice", b'{"hello":"server"}')


async def test_send_with_id_gets_no_reply_either(squall):
    """`send` never gets a reply, even when the SDK sends it with an id."""
    sq = await squall()
    c = await sq.raw(connect=True)
    await c.send({"id": 7, "send": {"data": 1}})
    assert await c.command("ping") == {"id": 2, "ping": {}}


# ---------------------------------------------------------------------- refresh


async def test_refresh_with_new_token_moves_expiry(squall):
    """refresh with a fresh token returns the new ttl."""
    sq = await squall()
    c = await sq.raw()
    client_id = (await c.connect(token=token("alice", ttl=60)))["connect"]["client"]
    reply = await c.command("refresh", {"token": token("alice", ttl=3600)})
    result = reply["refresh"]
    assert result["client"] == client_id
    assert result["version"] == __version__
    assert result["expires"] is True
    assert 3590 <= result["ttl"] <= 3600


async def test_refresh_with_other_users_token_closes_with_3500(squall):
    """A refresh token for another user closes the connection with 3500."""
    sq = await squall()
    c = await sq.raw()
    await c.connect(token=token("alice", ttl=60))
    with expect_log("squall.client", r"disconnect code=3500.*another user"):
        reply = await c.command("refresh", {"token": token("mallory", ttl=3600)})
    assert reply == {"closed": 3500, "reason": "invalid token"}


async def test_refresh_with_expired_token_disconnects_with_3005(squall):
    """Refreshing with an already expired token closes with 3005 (Centrifugo's answer: the
    SDK reconnects with a new token; an error reply would end a centrifuge-js client)."""
    sq = await squall()
    c = await sq.raw()
    await c.connect(token=token("alice", ttl=60))
    old = token("alice", ttl=None, extra={"exp": int(time.time()) - 5})
    with expect_log("squall.client", r"disconnect code=3005 .*refresh token expired"):
        assert await c.command("refresh", {"token": old}) == {
            "closed": 3005,
            "reason": "connection expired",
        }


async def test_connection_expires_with_3005_when_not_refreshed(squall):
    """A connection whose token expires and is not refreshed is closed with 3005."""
    sq = await squall(**{"client.expired_close_delay": 0.1})
    c = await sq.raw()
    result = (await c.connect(token=token("alice", ttl=2)))["connect"]
    assert result["expires"] is True
    with expect_log("squall.client", r"disconnect code=3005 reason=connection expired"):
        assert await c.closed(within=5) == (3005, "connection expired")


async def test_refreshed_connection_outlives_its_first_token(squall):
    """After a refresh the connection stays open past the first token's exp."""
    sq = await squall(**{"client.expired_close_delay": 0.1, "client.ping_interval": 0.5})
    c = await sq.raw()
    await c.connect(token=token("alice", ttl=2))
    old_deadline = time.time() + 2 + 0.1
    assert "refresh" in await c.command("refresh", {"token": token("alice", ttl=3600)})
    while time.time() < old_deadline + 0.5:  # server pings mark the time passing
        msg = await c.next(within=2)
        assert msg == {}, msg
        await c.send_raw("{}")
    assert await c.command("ping") == {"id": 3, "ping": {}}


async def test_server_api_refresh_expired_closes_with_3005(squall):
    """The server API can expire a user's connections at once (3005)."""
    sq = await squall()
    c = await sq.raw(connect=True)
    assert await sq.api("refresh", {"user": "alice", "expired": True}) == {"result": {}}
    assert await c.closed() == (3005, "connection expired")


# ---------------------------------------------------------------------- sub_refresh


async def test_sub_refresh_moves_the_subscription_expiry(squall):
    """sub_refresh with a fresh channel token returns the new ttl of the subscription."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "private:" + chan()
    result = await subscribed(c, ch, token=token("alice", channel=ch, ttl=60))
    assert result["expires"] is True
    assert 50 <= result["ttl"] <= 60
    reply = await c.command("sub_refresh", {"channel": ch, "token": token("alice", channel=ch)})
    assert reply["sub_refresh"]["expires"] is True
    assert 3590 <= reply["sub_refresh"]["ttl"] <= 3600


async def test_ttl_of_a_token_that_never_expires_is_capped_at_a_year(squall):
    """ttl is a uint32 in the protocol: a token with exp 9999999999 gave a ttl of about
    8.2e9, which the protocol's own decoders refuse (centrifuge-go's among them). Every
    reply caps it at a year, as Centrifugo does: connect, refresh, subscribe and
    sub_refresh."""
    sq = await squall()
    c = await sq.raw()
    never = {"exp": 9_999_999_999}
    year = 365 * 24 * 3600
    connected = (await c.connect(token=token("alice", ttl=None, extra=never)))["connect"]
    assert year - 5 <= connected["ttl"] <= year, connected
    refreshed = await c.command("refresh", {"token": token("alice", ttl=None, extra=never)})
    assert year - 5 <= refreshed["refresh"]["ttl"] <= year, refreshed
    ch = "private:" + chan()
    sub = await subscribed(c, ch, token=token("alice", channel=ch, ttl=None, extra=never))
    assert year - 5 <= sub["ttl"] <= year, sub
    params = {"channel": ch, "token": token("alice", channel=ch, ttl=None, extra=never)}
    again = await c.command("sub_refresh", params)
    assert year - 5 <= again["sub_refresh"]["ttl"] <= year, again


async def test_sub_refresh_with_token_for_another_channel_gets_103(squall):
    """sub_refresh with a channel token for a different channel gets 103."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "private:" + chan()
    await subscribed(c, ch, token=token("alice", channel=ch, ttl=60))
    reply = await c.command("sub_refresh", {"channel": ch, "token": token("alice", channel="x:y")})
    assert error_code(reply) == 103


async def test_sub_refresh_with_expired_token_gets_a_temporary_109(squall):
    """sub_refresh with an expired channel token gets 109 marked temporary, so the SDKs
    fetch a new token and retry; the subscription stays until it expires."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "private:" + chan()
    await subscribed(c, ch, token=token("alice", channel=ch, ttl=60))
    old = token("alice", channel=ch, ttl=None, extra={"exp": int(time.time()) - 5})
    reply = await c.command("sub_refresh", {"channel": ch, "token": old})
    assert reply["error"] == {"code": 109, "message": "token expired", "temporary": True}
    assert ch in sq.hub.clients[next(iter(sq.hub.clients))].subs


async def test_sub_refresh_when_not_subscribed_gets_103(squall):
    """sub_refresh on a channel one is not subscribed to gets 103."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "private:" + chan()
    reply = await c.command("sub_refresh", {"channel": ch, "token": token("alice", channel=ch)})
    assert error_code(reply) == 103


async def test_subscription_expires_with_unsubscribe_2501(squall):
    """A channel token that expires without sub_refresh ends the subscription with 2501."""
    sq = await squall(**{"client.expired_close_delay": 0.1})
    c = await sq.raw(connect=True)
    ch = "private:" + chan()
    await subscribed(c, ch, token=token("alice", channel=ch, ttl=2))
    with expect_log("squall.client", r"unsubscribe code=2501"):
        push = await next_of(c, "unsubscribe", within=5)
    assert push == {
        "channel": ch,
        "unsubscribe": {"code": 2501, "reason": "subscription expired"},
    }
    assert "ping" in await c.command("ping")  # the connection itself stays


# ---------------------------------------------------------------------- pings, stale, shutdown


async def test_server_pings_arrive_and_answering_keeps_the_connection(squall):
    """Server pings ({}) arrive every ping_interval; a client that answers stays connected."""
    sq = await squall(**{"client.ping_interval": 0.2, "client.pong_timeout": 0.3})
    c = await sq.raw(connect=True)
    started = time.monotonic()
    for _ in range(5):
        assert await c.next(within=1) == {}
        await c.send_raw("{}")
    assert time.monotonic() - started > 0.6  # well past one pong_timeout
    assert await c.command("ping") == {"id": 2, "ping": {}}


async def test_client_that_does_not_answer_pings_gets_3012(squall):
    """A client that never answers the server's pings is closed with 3012 no pong."""
    sq = await squall(**{"client.ping_interval": 0.2, "client.pong_timeout": 0.2})
    c = await sq.raw(connect=True)
    with expect_log("squall.client", r"disconnect code=3012 reason=no pong"):
        assert await c.closed(within=3) == (3012, "no pong")


async def test_a_pong_waiting_behind_a_slow_command_does_not_end_the_connection(squall):
    """A connection's frames are read in order: while one of its commands waits on a slow
    engine, the pong it has sent waits unread. That is not a dead peer: no 3012."""
    sq = await squall(**{"client.ping_interval": 0.2, "client.pong_timeout": 0.2})
    broker = sq.hub.broker
    history = broker.history

    async def slow_history(*args: Any, **kw: Any) -> Any:
        await asyncio.sleep(1.0)  # several ping intervals and pong timeouts
        return await history(*args, **kw)

    broker.history = slow_history  # type: ignore[method-assign]
    c = await sq.raw(connect=True)
    await c.send({"id": 2, "history": {"channel": "public:slow", "limit": 1}})
    pings = 0
    while True:
        frame = await c.next(within=3)
        if frame == {}:
            pings += 1
            await c.send_raw("{}")
            continue
        assert frame["id"] == 2, frame
        assert frame["history"]["publications"] == []
        break
    assert pings >= 2
    assert "ping" in await c.command("ping")  # still connected


async def test_connection_without_connect_is_closed_as_stale(squall):
    """A connection that never sends connect is closed with 3502 after connect_timeout."""
    sq = await squall(**{"client.connect_timeout": 0.2})
    c = await sq.raw()
    with expect_log("squall.client", r"disconnect code=3502 reason=stale"):
        assert await c.closed(within=3) == (3502, "stale")


async def test_graceful_shutdown_closes_clients_with_3001(squall):
    """On shutdown every client is closed with 3001 (reconnect elsewhere); new ones get 503."""
    sq = await squall()
    a = await sq.raw(connect=True)
    b = await sq.raw(connect=True, sub="bob")
    await subscribed(b, "chat:" + chan())
    sq.hub.closing = True
    sq.hub.disconnect_all(codes.SHUTDOWN)
    assert await a.closed() == (3001, "shutdown")
    assert await b.closed() == (3001, "shutdown")
    assert sq.hub.clients == {}
    with (
        expect_log("tornado.access", r"503 GET /connection/websocket"),
        pytest.raises(tornado.httpclient.HTTPClientError) as info,
    ):
        await sq.raw()
    assert info.value.code == 503


# ---------------------------------------------------------------------- server API control


async def test_server_api_disconnect_uses_the_given_code(squall):
    """Server API disconnect closes the user's connections with the requested code and reason."""
    sq = await squall()
    c = await sq.raw(connect=True)
    other = await sq.raw(connect=True, sub="bob")
    reply = await sq.api(
        "disconnect", {"user": "alice", "disconnect": {"code": 4000, "reason": "bye"}}
    )
    assert reply == {"result": {}}
    assert await c.closed() == (4000, "bye")
    assert await other.command("ping") == {"id": 2, "ping": {}}


async def test_server_api_subscribe_and_unsubscribe_pushes(squall):
    """Server API subscribe/unsubscribe reach the client as subscribe/unsubscribe pushes."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "chat:" + chan()
    assert await sq.api("subscribe", {"user": "alice", "channel": ch}) == {"result": {}}
    push = await next_of(c, "subscribe")
    assert push["channel"] == ch
    await publish_api(sq, ch, "live")
    assert (await next_pub(c))["pub"]["data"] == "live"
    assert await sq.api("unsubscribe", {"user": "alice", "channel": ch}) == {"result": {}}
    push = await next_of(c, "unsubscribe")
    assert push["unsubscribe"] == {"code": 2000, "reason": "server unsubscribe"}


async def test_server_api_subscribe_then_unsubscribe_in_one_batch_leaves_nothing(squall):
    """A batch [subscribe, unsubscribe, subscribe, unsubscribe] for one user and channel:
    the subscribe ran in the background and the unsubscribe at once (the memory broker
    hands both over in one loop turn), so the user stayed subscribed, in presence and
    getting publications. The commands take effect in their order."""
    sq = await squall()
    c = await sq.raw(connect=True)
    ch = "chat:" + chan()
    pair = [
        {"subscribe": {"user": "alice", "channel": ch}},
        {"unsubscribe": {"user": "alice", "channel": ch}},
    ]
    reply = await sq.api("batch", {"commands": pair * 2})
    assert [next(iter(r)) for r in reply["replies"]] == ["subscribe", "unsubscribe"] * 2
    kinds = []
    while len(kinds) < 4:
        push = await c.next_push()
        if kind(push) in ("subscribe", "unsubscribe"):
            kinds.append(kind(push))
    assert kinds == ["subscribe", "unsubscribe"] * 2
    client = next(iter(sq.hub.clients.values()))
    assert client.subs == {}
    assert client.server_op is None  # the finished subscribes are not kept
    assert ch not in sq.hub.channels
    await publish_api(sq, ch, "after")
    with pytest.raises(TimeoutError):
        await next_pub(c, within=0.3)


async def test_server_api_subscribe_stops_at_max_channels(squall):
    """Server API subscribe does not take a connection past client.max_channels (logged)."""
    sq = await squall(**{"client.max_channels": 2})
    c = await sq.raw(connect=True)
    for ch in ("chat:" + chan(), "chat:" + chan()):
        await subscribed(c, ch)
    over = "chat:" + chan()
    with expect_log("squall.client", r"server subscribe .* client.max_channels \(2\) reached"):
        assert await sq.api("subscribe", {"user": "alice", "channel": over}) == {"result": {}}
    assert over not in sq.hub.channels
    assert await c.command("ping") == {"id": 4, "ping": {}}  # no subscribe push came first


async def test_server_api_send_pushes_a_message(squall):
    """Server API send delivers a `message` push to the user's connections only."""
    sq = await squall()
    c = await sq.raw(connect=True)
    other = await sq.raw(connect=True, sub="bob")
    assert await sq.api("send", {"user": "alice", "data": {"note": 1}}) == {"result": {}}
    assert await next_of(c, "message") == {"message": {"data": {"note": 1}}}
    assert await other.command("ping") == {"id": 2, "ping": {}}
    assert not other.inbox


async def test_server_api_send_follows_a_users_connections_as_they_come_and_go(squall):
    """send reaches every connection of the user, then the one left after the other
    closes; when the last one closes the user is no longer counted as connected."""
    sq = await squall()
    first = await sq.raw(connect=True)
    second = await sq.raw(connect=True)
    assert await sq.api("send", {"user": "alice", "data": 1}) == {"result": {}}
    assert await next_of(first, "message") == {"message": {"data": 1}}
    assert await next_of(second, "message") == {"message": {"data": 1}}
    first.close()
    await _until(lambda: len(sq.hub.clients) == 1)
    assert await sq.api("send", {"user": "alice", "data": 2}) == {"result": {}}
    assert await next_of(second, "message") == {"message": {"data": 2}}
    second.close()
    await _until(lambda: not sq.hub.clients)
    assert sq.hub.node_info().num_users == 0


async def _until(cond: Any, within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
