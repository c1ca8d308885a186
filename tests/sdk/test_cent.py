"""The real ``cent`` HTTP API client against Squall: every server API method it offers us.

Effects on connections are observed through raw protocol clients (and, for
server-side subscribe, the centrifuge-python SDK's own events).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cent import (
    AsyncClient,
    BatchRequest,
    BroadcastRequest,
    CentApiResponseError,
    CentUnauthorizedError,
    ChannelsRequest,
    Disconnect,
    DisconnectRequest,
    HistoryRemoveRequest,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
    RefreshRequest,
    StreamPosition,
    SubscribeRequest,
    UnsubscribeRequest,
)
from centrifuge import Client, ClientEventHandler

from tests.helpers.server import API_KEY, TIME_FACTOR, token

WITHIN = 5.0  # seconds any single event may take to arrive


@contextlib.asynccontextmanager
async def cent_client(sq: Any, api_key: str = API_KEY) -> AsyncIterator[AsyncClient]:
    """A cent ``AsyncClient`` for this server, closed on exit."""
    async with AsyncClient(api_url=f"{sq.http_url}/api", api_key=api_key, timeout=10) as api:
        yield api


async def subscriber(sq: Any, user: str, channel: str) -> Any:
    """A raw client connected as ``user`` and subscribed to ``channel``."""
    c = await sq.raw(connect=True, sub=user)
    reply = await c.command("subscribe", {"channel": channel})
    assert "subscribe" in reply, reply
    return c


async def publish_n(api: AsyncClient, channel: str, n: int) -> str:
    """Publish ``{"n": 1..n}``; returns the stream epoch."""
    epoch = ""
    for i in range(1, n + 1):
        result = await api.publish(PublishRequest(channel=channel, data={"n": i}))
        assert result.offset == i
        epoch = result.epoch
    return epoch


async def test_publish_returns_offset_and_epoch_and_reaches_subscribers(squall):
    """publish returns the stream offset and epoch; a subscriber gets the data at that offset."""
    sq = await squall()
    c = await subscriber(sq, "alice", "chat:pub")
    async with cent_client(sq) as api:
        first = await api.publish(PublishRequest(channel="chat:pub", data={"text": "one"}))
        second = await api.publish(
            PublishRequest(channel="chat:pub", data={"text": "two"}, tags={"k": "v"})
        )
    assert (first.offset, second.offset) == (1, 2)
    assert first.epoch
    assert first.epoch == second.epoch
    pushes = [(await c.next_push())["push"] for _ in range(3)]
    pubs = [p["pub"] for p in pushes if "pub" in p]
    assert [p["offset"] for p in pubs] == [1, 2]
    assert pubs[0]["data"] == {"text": "one"}
    assert pubs[1]["tags"] == {"k": "v"}


async def test_broadcast_publishes_to_every_channel(squall):
    """broadcast publishes to each channel and returns one result per channel, in order."""
    sq = await squall()
    c = await subscriber(sq, "alice", "chat:b2")
    async with cent_client(sq) as api:
        await api.publish(PublishRequest(channel="chat:b2", data="before"))
        result = await api.broadcast(
            BroadcastRequest(channels=["chat:b1", "chat:b2"], data={"all": True})
        )
    assert len(result.responses) == 2
    assert [r.error for r in result.responses] == [None, None]
    assert [r.result.offset for r in result.responses] == [1, 2]
    pubs = []
    while len(pubs) < 2:
        push = (await c.next_push())["push"]
        if "pub" in push:
            pubs.append(push["pub"])
    assert [p["data"] for p in pubs] == ["before", {"all": True}]


async def test_subscribe_pushes_subscribe_to_a_connected_raw_client(squall):
    """Server API subscribe sends a `subscribe` push and then the channel's publications."""
    sq = await squall()
    c = await sq.raw(connect=True, sub="alice")
    async with cent_client(sq) as api:
        await api.subscribe(SubscribeRequest(user="alice", channel="chat:srv"))
        push = await c.next_push()
        assert push["push"]["channel"] == "chat:srv"
        sub = push["push"]["subscribe"]
        assert sub["recoverable"] is True
        assert sub["offset"] == 0
        await api.publish(PublishRequest(channel="chat:srv", data={"x": 1}))
    pub = None
    while pub is None:
        pub = (await c.next_push())["push"].get("pub")
    assert pub["data"] == {"x": 1}


class ServerSubEvents(ClientEventHandler):
    def __init__(self) -> None:
        self.connected: asyncio.Queue[Any] = asyncio.Queue()
        self.subscribed: asyncio.Queue[Any] = asyncio.Queue()
        self.unsubscribed: asyncio.Queue[Any] = asyncio.Queue()
        self.publications: asyncio.Queue[Any] = asyncio.Queue()

    async def on_connected(self, ctx: Any) -> None:
        self.connected.put_nowait(ctx)

    async def on_subscribed(self, ctx: Any) -> None:
        self.subscribed.put_nowait(ctx)

    async def on_unsubscribed(self, ctx: Any) -> None:
        self.unsubscribed.put_nowait(ctx)

    async def on_publication(self, ctx: Any) -> None:
        self.publications.put_nowait(ctx)


@contextlib.asynccontextmanager
async def sdk_client(sq: Any, user: str = "alice") -> AsyncIterator[tuple[Client, ServerSubEvents]]:
    """A connected centrifuge-python client recording server-side subscription events."""
    events = ServerSubEvents()
    client = Client(sq.ws_url, events=events, token=token(user), proxy=None)
    await client.connect()
    try:
        await next_of(events.connected)
        yield client, events
    finally:
        await client.disconnect()
        tasks = list(client._background_tasks)  # the SDK closes its socket in the background
        if tasks:
            await asyncio.wait(tasks, timeout=WITHIN)


async def next_of(queue: asyncio.Queue[Any]) -> Any:
    async with asyncio.timeout(WITHIN * TIME_FACTOR):
        return await queue.get()


async def test_subscribe_and_unsubscribe_reach_the_sdk_as_server_side_events(squall):
    """The SDK sees server API subscribe/unsubscribe as server-side subscribed/unsubscribed."""
    sq = await squall()
    async with sdk_client(sq) as (_, events), cent_client(sq) as api:
        await api.subscribe(SubscribeRequest(user="alice", channel="chat:sdk-srv"))
        ctx = await next_of(events.subscribed)
        assert ctx.channel == "chat:sdk-srv"
        assert ctx.recoverable is True
        await api.publish(PublishRequest(channel="chat:sdk-srv", data="hello"))
        pub = await next_of(events.publications)
        assert (pub.channel, pub.pub.data, pub.pub.offset) == ("chat:sdk-srv", "hello", 1)
        await api.unsubscribe(UnsubscribeRequest(user="alice", channel="chat:sdk-srv"))
        ctx = await next_of(events.unsubscribed)
        assert ctx.channel == "chat:sdk-srv"


async def test_subscribe_data_and_info_reach_the_client_and_presence(squall):
    """subscribe's `data` arrives in the subscribe push; its `info` is the channel info."""
    sq = await squall()
    async with sdk_client(sq) as (client, events), cent_client(sq) as api:
        await api.subscribe(
            SubscribeRequest(
                user="alice", channel="chat:welcome", data={"hello": 1}, info={"role": "x"}
            )
        )
        ctx = await next_of(events.subscribed)
        assert ctx.data == {"hello": 1}
        presence = await api.presence(PresenceRequest(channel="chat:welcome"))
        assert presence.presence[client.client_id].chan_info == {"role": "x"}


def b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value, indent=1).encode()).decode()  # several lines


async def test_b64_payloads_are_decoded_when_they_hold_json(squall):
    """cent's b64data / b64info (Centrifugo's binary variants) work for JSON payloads."""
    sq = await squall()
    c = await subscriber(sq, "alice", "chat:b64")
    async with cent_client(sq) as api:
        one = await api.publish(PublishRequest(channel="chat:b64", data=None, b64data=b64([1])))
        both = await api.publish(
            PublishRequest(channel="chat:b64", data="ignored", b64data=b64({"b": 2}))
        )
        fanned = await api.broadcast(
            BroadcastRequest(channels=["chat:b64", "chat:b64x"], data=None, b64data=b64("x"))
        )
        for bad in ("not base64!", base64.b64encode(b"\xff not json").decode()):
            with pytest.raises(CentApiResponseError) as err:
                await api.publish(PublishRequest(channel="chat:b64", data=None, b64data=bad))
            assert err.value.code == 107
        await api.subscribe(
            SubscribeRequest(
                user="alice", channel="chat:b64sub", b64data=b64({"d": 1}), b64info=b64({"i": 1})
            )
        )
        pubs, subscribed = [], None
        while len(pubs) < 3 or subscribed is None:
            push = (await c.next_push())["push"]
            if "pub" in push:
                pubs.append(push["pub"])
            subscribed = push.get("subscribe", subscribed)
        presence = await api.presence(PresenceRequest(channel="chat:b64sub"))
    assert (one.offset, both.offset) == (1, 2)
    assert [r.error for r in fanned.responses] == [None, None]
    assert [p["data"] for p in pubs] == [[1], {"b": 2}, "x"]
    assert subscribed["data"] == {"d": 1}
    assert [info.chan_info for info in presence.presence.values()] == [{"i": 1}]


async def test_unsubscribe_pushes_unsubscribe_with_server_code(squall):
    """Server API unsubscribe sends the client an `unsubscribe` push with code 2000."""
    sq = await squall()
    c = await subscriber(sq, "alice", "chat:unsub")
    bystander = await subscriber(sq, "bob", "chat:unsub")
    async with cent_client(sq) as api:
        await api.unsubscribe(UnsubscribeRequest(user="alice", channel="chat:unsub"))
        push = await c.next_push()
        while "unsubscribe" not in push["push"]:
            push = await c.next_push()
        assert push["push"]["channel"] == "chat:unsub"
        assert push["push"]["unsubscribe"] == {"code": 2000, "reason": "server unsubscribe"}
        result = await api.presence_stats(PresenceStatsRequest(channel="chat:unsub"))
        assert (result.num_clients, result.num_users) == (1, 1)
        await api.publish(PublishRequest(channel="chat:unsub", data="after"))
    got = None
    while got is None:
        got = (await bystander.next_push())["push"].get("pub")
    assert got["data"] == "after"


async def test_disconnect_closes_the_user_with_the_given_code(squall):
    """Server API disconnect closes every connection of the user with the given code/reason."""
    sq = await squall()
    c1 = await sq.raw(connect=True, sub="alice")
    c2 = await sq.raw(connect=True, sub="alice")
    bob = await sq.raw(connect=True, sub="bob")
    async with cent_client(sq) as api:
        await api.disconnect(
            DisconnectRequest(user="alice", disconnect=Disconnect(code=4000, reason="bye"))
        )
    assert await c1.closed() == (4000, "bye")
    assert await c2.closed() == (4000, "bye")
    reply = await bob.command("rpc", {"method": "echo", "data": 1})
    assert reply["rpc"]["data"] == 1


async def test_disconnect_keeps_whitelisted_connections(squall):
    """disconnect with `whitelist` closes the user's other connections, not the listed ones."""
    sq = await squall()
    keep = await sq.raw()
    keep_id = (await keep.connect("alice"))["connect"]["client"]
    other = await sq.raw(connect=True, sub="alice")
    async with cent_client(sq) as api:
        await api.disconnect(DisconnectRequest(user="alice", whitelist=[keep_id]))
    assert await other.closed() == (3503, "force disconnect")
    assert list(sq.hub.clients) == [keep_id]
    reply = await keep.command("rpc", {"method": "echo", "data": "kept"})
    assert reply["rpc"]["data"] == "kept"


async def test_disconnect_with_a_long_non_ascii_reason_still_closes(squall):
    """A reason over the 123-byte close-frame limit is cut, and the client is still closed."""
    sq = await squall()
    c = await sq.raw(connect=True, sub="alice")
    reason = "é" * 100  # 100 characters, 200 bytes in UTF-8
    async with cent_client(sq) as api:
        await api.disconnect(
            DisconnectRequest(user="alice", disconnect=Disconnect(code=4500, reason=reason))
        )
    code, got = await c.closed()
    assert code == 4500
    assert got
    assert reason.startswith(got)
    assert len(got.encode()) <= 123
    assert not sq.hub.clients


async def test_disconnect_one_client_of_a_user(squall):
    """disconnect with `client` closes only that connection (default code 3503)."""
    sq = await squall()
    target, other = await sq.raw(), await sq.raw(connect=True, sub="alice")
    client_id = (await target.connect("alice"))["connect"]["client"]
    async with cent_client(sq) as api:
        await api.disconnect(DisconnectRequest(user="alice", client=client_id))
    assert await target.closed() == (3503, "force disconnect")
    reply = await other.command("rpc", {"method": "echo", "data": 2})
    assert reply["rpc"]["data"] == 2


async def test_refresh_expired_closes_with_3005(squall):
    """Server API refresh with expired=True closes the user's connection with 3005."""
    sq = await squall()
    c = await sq.raw(connect=True, sub="alice")
    async with cent_client(sq) as api:
        await api.refresh(RefreshRequest(user="alice", expired=True))
    code, _ = await c.closed()
    assert code == 3005


async def test_refresh_with_an_expiry_already_passed_closes_now(squall):
    """refresh with expire_at in the past closes with 3005 at once, not after the grace."""
    sq = await squall()  # client.expired_close_delay: 25 s by default
    c = await sq.raw(connect=True, sub="alice")
    other = await sq.raw(connect=True, sub="bob")
    async with cent_client(sq) as api:
        await api.refresh(RefreshRequest(user="alice", expire_at=int(time.time()) - 10))
        await api.refresh(RefreshRequest(user="bob", expire_at=int(time.time()) + 100))
        with pytest.raises(CentApiResponseError) as err:
            await api.refresh(RefreshRequest(user="bob", expire_at=-1))
    assert err.value.code == 107
    assert await c.closed() == (3005, "connection expired")
    push = await other.next_push()
    assert push["push"]["refresh"]["expires"] is True
    assert 90 <= push["push"]["refresh"]["ttl"] <= 100


async def test_presence_and_presence_stats(squall):
    """presence lists each subscribed client with its user; presence_stats counts them."""
    sq = await squall()
    await subscriber(sq, "alice", "chat:pres")
    await subscriber(sq, "alice", "chat:pres")
    await subscriber(sq, "bob", "chat:pres")
    async with cent_client(sq) as api:
        result = await api.presence(PresenceRequest(channel="chat:pres"))
        stats = await api.presence_stats(PresenceStatsRequest(channel="chat:pres"))
    assert set(result.presence) == set(sq.hub.clients)
    assert sorted(info.user for info in result.presence.values()) == ["alice", "alice", "bob"]
    for client_id, info in result.presence.items():
        assert info.client == client_id
    assert (stats.num_clients, stats.num_users) == (3, 2)


async def test_history_since_limit_and_reverse(squall):
    """history pages by limit, continues after `since`, and reverses newest first."""
    sq = await squall()
    async with cent_client(sq) as api:
        epoch = await publish_n(api, "chat:hist", 5)

        top = await api.history(HistoryRequest(channel="chat:hist"))
        assert (top.publications, top.offset, top.epoch) == ([], 5, epoch)

        everything = await api.history(HistoryRequest(channel="chat:hist", limit=-1))
        assert [p.offset for p in everything.publications] == [1, 2, 3, 4, 5]
        assert [p.data for p in everything.publications] == [{"n": i} for i in range(1, 6)]

        first = await api.history(HistoryRequest(channel="chat:hist", limit=2))
        assert [p.offset for p in first.publications] == [1, 2]

        since = StreamPosition(offset=2, epoch=epoch)
        page = await api.history(HistoryRequest(channel="chat:hist", since=since, limit=2))
        assert [p.offset for p in page.publications] == [3, 4]
        assert (page.offset, page.epoch) == (5, epoch)

        newest = await api.history(HistoryRequest(channel="chat:hist", limit=2, reverse=True))
        assert [p.offset for p in newest.publications] == [5, 4]

        # The next page back: since the oldest of this one, reversed.
        back = StreamPosition(offset=4, epoch=epoch)
        older = await api.history(
            HistoryRequest(channel="chat:hist", since=back, limit=2, reverse=True)
        )
        assert [p.offset for p in older.publications] == [3, 2]

        # cent's StreamPosition defaults to an empty epoch: it means the current one.
        no_epoch = await api.history(
            HistoryRequest(channel="chat:hist", since=StreamPosition(offset=3), limit=-1)
        )
        assert [p.offset for p in no_epoch.publications] == [4, 5]


async def test_history_remove_empties_history_but_keeps_the_position(squall):
    """history_remove drops publications; the stream position (offset, epoch) stays."""
    sq = await squall()
    async with cent_client(sq) as api:
        epoch = await publish_n(api, "chat:hrm", 3)
        await api.history_remove(HistoryRemoveRequest(channel="chat:hrm"))
        page = await api.history(HistoryRequest(channel="chat:hrm", limit=-1))
        assert (page.publications, page.offset, page.epoch) == ([], 3, epoch)
        result = await api.publish(PublishRequest(channel="chat:hrm", data="next"))
        assert (result.offset, result.epoch) == (4, epoch)


async def test_channels_lists_active_channels_matching_the_pattern(squall):
    """channels lists channels with subscribers and their counts, filtered by pattern."""
    sq = await squall()
    await subscriber(sq, "alice", "chat:ch-one")
    await subscriber(sq, "bob", "chat:ch-one")
    await subscriber(sq, "alice", "chat:ch-two")
    await subscriber(sq, "alice", "news")
    async with cent_client(sq) as api:
        everything = await api.channels(ChannelsRequest())
        matching = await api.channels(ChannelsRequest(pattern="chat:ch-*"))
    assert set(everything.channels) == {"chat:ch-one", "chat:ch-two", "news"}
    assert {k: v.num_clients for k, v in matching.channels.items()} == {
        "chat:ch-one": 2,
        "chat:ch-two": 1,
    }


async def test_channels_pattern_has_centrifugos_alternatives_and_escapes(squall):
    """Patterns follow Centrifugo's glob (cent documents it): {a,b} alternatives, \\ escapes."""
    sq = await squall()
    for channel in ("chat:one", "chat:two", "chat:three", "chat:a,b", "chat:x*y", "news"):
        await subscriber(sq, "alice", channel)

    async with cent_client(sq) as api:

        async def names(pattern: str) -> set[str]:
            return set((await api.channels(ChannelsRequest(pattern=pattern))).channels)

        assert await names("chat:{one,t[w]o}") == {"chat:one", "chat:two"}
        assert await names("{news,chat:{one,{two,none}}}") == {"news", "chat:one", "chat:two"}
        assert await names("chat:{a\\,b,x\\*y}") == {"chat:a,b", "chat:x*y"}
        assert await names("chat:[!o]*") == {"chat:two", "chat:three", "chat:a,b", "chat:x*y"}
        assert await names("chat:x\\*") == set()  # an escaped * is a literal *
        # 256 alternatives; a pattern long enough to block the loop while translated
        for pattern in ("{a,b}" * 8, "[" * 1025):
            with pytest.raises(CentApiResponseError) as err:
                await api.channels(ChannelsRequest(pattern=pattern))
            assert err.value.code == 107


async def test_info_lists_this_node(squall):
    """info returns a nodes list whose first node is this one, with live counts."""
    sq = await squall()
    await subscriber(sq, "alice", "chat:info")
    await subscriber(sq, "bob", "chat:info")
    async with cent_client(sq) as api:
        result = await api.info(InfoRequest())
    node = result.nodes[0]
    assert node.uid == sq.hub.node.uid
    assert node.name == sq.hub.node.name
    assert node.version == sq.hub.node.version
    assert (node.num_clients, node.num_users, node.num_channels, node.num_subs) == (2, 2, 1, 2)


async def test_batch_runs_commands_and_replies_in_order(squall):
    """batch runs several commands in order and returns their replies in the same order."""
    sq = await squall()
    await subscriber(sq, "alice", "chat:batch")
    async with cent_client(sq) as api:
        result = await api.batch(
            BatchRequest(
                requests=[
                    PublishRequest(channel="chat:batch", data={"n": 1}),
                    PublishRequest(channel="chat:batch", data={"n": 2}),
                    HistoryRequest(channel="chat:batch", limit=-1),
                    PresenceStatsRequest(channel="chat:batch"),
                    InfoRequest(),
                ]
            )
        )
    first, second, history, stats, info = result.replies
    assert (first.offset, second.offset) == (1, 2)
    assert [p.data for p in history.publications] == [{"n": 1}, {"n": 2}]
    assert (stats.num_clients, stats.num_users) == (1, 1)
    assert info.nodes[0].uid == sq.hub.node.uid


async def test_a_batch_of_1500_commands_runs_whole(squall):
    """A batch has no count limit but the body size, as in Centrifugo: 1 500 publishes
    were refused with a top-level error, which cent reads as a KeyError ('replies')."""
    sq = await squall()
    async with cent_client(sq) as api:
        result = await api.batch(
            BatchRequest(
                requests=[PublishRequest(channel="chat:big", data={"n": n}) for n in range(1500)]
            )
        )
        history = await api.history(HistoryRequest(channel="chat:big", limit=-1))
    assert [r.offset for r in result.replies] == list(range(1, 1501))
    assert [p.data["n"] for p in history.publications][-3:] == [1497, 1498, 1499]


async def test_unknown_channel_is_api_error_102(squall):
    """Publishing to a channel of an unknown namespace raises CentApiResponseError code 102."""
    sq = await squall()
    async with cent_client(sq) as api:
        with pytest.raises(CentApiResponseError) as err:
            await api.publish(PublishRequest(channel="nosuchns:x", data={}))
    assert err.value.code == 102


async def test_wrong_api_key_is_unauthorized(squall):
    """A wrong API key raises CentUnauthorizedError, and nothing is published."""
    sq = await squall()
    async with cent_client(sq, api_key="not-the-key") as api:
        with pytest.raises(CentUnauthorizedError):
            await api.publish(PublishRequest(channel="chat:x", data={}))
    async with cent_client(sq) as api:
        page = await api.history(HistoryRequest(channel="chat:x", limit=-1))
    assert page.publications == []
    assert page.offset == 0


async def test_session_target_is_refused_not_widened_to_every_connection(squall):
    """Centrifugo's `session` target is error 107, never widened to all the user's connections."""
    sq = await squall()
    c1 = await subscriber(sq, "alice", "chat:sess")
    c2 = await subscriber(sq, "alice", "chat:sess")
    async with cent_client(sq) as api:
        calls = [
            (api.refresh, RefreshRequest(user="alice", session="s1", expired=True)),
            (api.disconnect, DisconnectRequest(user="alice", session="s1")),
            (api.unsubscribe, UnsubscribeRequest(user="alice", channel="chat:sess", session="s1")),
            (api.subscribe, SubscribeRequest(user="alice", channel="chat:other", session="s1")),
        ]
        for method, request in calls:
            with pytest.raises(CentApiResponseError) as err:
                await method(request)
            assert err.value.code == 107, request
        stats = await api.presence_stats(PresenceStatsRequest(channel="chat:sess"))
    assert (stats.num_clients, stats.num_users) == (2, 1)
    for c in (c1, c2):
        reply = await c.command("rpc", {"method": "echo", "data": "still here"})
        assert reply["rpc"]["data"] == "still here"
    assert all(set(client.subs) == {"chat:sess"} for client in sq.hub.clients.values())
