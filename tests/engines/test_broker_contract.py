"""The ``Broker`` / ``PresenceManager`` contract, run against every engine.

One suite over the ``broker`` fixture (memory, redis). For Redis, ``peer`` is
a second ``RedisBroker`` (another node id) on the same Redis and prefix, so
the suite also proves that nodes share offsets, history and presence; for
memory it is the same instance.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from tornado.ioloop import IOLoop

from server import broker_memory
from server.broker import (
    Broker,
    ClientInfo,
    PresenceManager,
    PublishOptions,
    StreamPosition,
)
from server.broker_memory import MemoryBroker, MemoryPresenceManager
from server.broker_redis import RedisBroker
from server.config import RedisConfig
from tests.engines import RecordingEvents, eventually, info
from tests.helpers.logs import expect_log

HISTORY = PublishOptions(history_size=10, history_ttl=60.0)


@dataclass
class Engines:
    kind: str
    broker: Broker
    presence: PresenceManager
    events: RecordingEvents
    peer: Broker  # another node on the same storage (the same instance for memory)
    peer_presence: PresenceManager
    peer_events: RecordingEvents


def redis_config(url: str, prefix: str) -> RedisConfig:
    return RedisConfig(
        url=url, prefix=prefix, socket_timeout=1.0, reconnect_delay=0.02, reconnect_max_delay=0.2
    )


@pytest.fixture(params=["memory", "redis"])
def broker(
    request: pytest.FixtureRequest, io_loop: IOLoop, unique_prefix: str
) -> Iterator[Engines]:
    """Started engines of one kind; closed after the test."""
    events, peer_events = RecordingEvents(), RecordingEvents()
    if request.param == "memory":
        mem, presence = MemoryBroker(), MemoryPresenceManager()
        engines = Engines("memory", mem, presence, events, mem, presence, events)
        started: list[Broker] = [mem]
    else:
        cfg = redis_config(request.getfixturevalue("redis_url"), unique_prefix)
        a, b = RedisBroker(cfg, node_id="node-a"), RedisBroker(cfg, node_id="node-b")
        engines = Engines("redis", a, a, events, b, b, peer_events)
        started = [a, b]

    async def start() -> None:
        await engines.broker.start(events)
        if engines.peer is not engines.broker:
            await engines.peer.start(peer_events)

    io_loop.run_sync(start)
    yield engines

    async def close() -> None:
        for b in started:
            await b.close()

    io_loop.run_sync(close)


def channel() -> str:
    return "ch:" + uuid.uuid4().hex[:8]


async def subscribe_everywhere(e: Engines, *channels: str) -> None:
    for ch in channels:
        await e.broker.subscribe(ch)
        await e.peer.subscribe(ch)


# ---------------------------------------------------------------------- positions and history


async def test_offsets_increase_and_are_shared_by_every_node(broker: Engines) -> None:
    """Publishing from any node continues one stream: offsets 1, 2, 3... in one epoch."""
    ch = channel()
    positions = []
    for i in range(6):
        node = broker.broker if i % 2 == 0 else broker.peer
        positions.append(await node.publish(ch, b'{"i":%d}' % i, HISTORY))
    assert [p.offset for p in positions] == [1, 2, 3, 4, 5, 6]
    assert len({p.epoch for p in positions}) == 1
    assert positions[0].epoch != ""
    page = await broker.peer.history(ch, limit=0)
    assert page.position == positions[-1]


async def test_history_returns_everything_kept_oldest_first(broker: Engines) -> None:
    """history() without arguments returns every kept publication with its fields."""
    ch = channel()
    who = ClientInfo("u1", "c1", conn_info=b'{"name":"x"}', chan_info=b"[1]")
    await broker.broker.publish(ch, b'{"a":1}', HISTORY)
    opts = PublishOptions(history_size=10, history_ttl=60.0, info=who, tags={"k": "v"})
    before = int(time.time() * 1000)
    pos = await broker.broker.publish(ch, b'{"b":\n2}', opts)
    page = await broker.peer.history(ch)
    assert [p.data for p in page.publications] == [b'{"a":1}', b'{"b":\n2}']
    assert [p.offset for p in page.publications] == [1, 2]
    last = page.publications[-1]
    assert (last.epoch, last.info, dict(last.tags or {})) == (pos.epoch, who, {"k": "v"})
    assert before - 1000 <= last.time <= int(time.time() * 1000) + 1000
    assert page.publications[0].info is None
    assert page.position == pos


async def test_history_since_limit_and_reverse(broker: Engines) -> None:
    """since/limit/reverse select the right window of the stream."""
    ch = channel()
    for i in range(1, 8):
        top = await broker.broker.publish(ch, b"%d" % i, HISTORY)

    async def offsets(**kw: object) -> list[int]:
        page = await broker.peer.history(ch, **kw)  # type: ignore[arg-type]
        assert page.position == top
        return [p.offset for p in page.publications]

    since = StreamPosition(4, top.epoch)
    assert await offsets(since=since) == [5, 6, 7]
    assert await offsets(since=since, limit=2) == [5, 6]
    # Reversed, since pages back: the publications before it, newest first.
    assert await offsets(since=since, reverse=True) == [3, 2, 1]
    assert await offsets(since=since, limit=2, reverse=True) == [3, 2]
    assert await offsets(since=StreamPosition(2, top.epoch), limit=2, reverse=True) == [1]
    assert await offsets(since=StreamPosition(1, top.epoch), reverse=True) == []
    assert await offsets(since=StreamPosition(0, top.epoch), reverse=True) == []
    assert await offsets(limit=3) == [1, 2, 3]
    assert await offsets(limit=3, reverse=True) == [7, 6, 5]
    assert await offsets(since=StreamPosition(0, top.epoch)) == [1, 2, 3, 4, 5, 6, 7]
    assert await offsets(since=top) == []
    # An empty epoch stands for the stream's own (Centrifugo's rule); another one
    # gets nothing.
    assert await offsets(since=StreamPosition(4, "")) == [5, 6, 7]
    assert await offsets(since=StreamPosition(4, ""), limit=2, reverse=True) == [3, 2]
    assert await offsets(since=StreamPosition(4, "other")) == []
    assert await offsets(since=StreamPosition(4, "other"), reverse=True) == []


async def test_history_limit_zero_returns_only_the_position(broker: Engines) -> None:
    """limit=0 returns no publications, just the stream's current top."""
    ch = channel()
    await broker.broker.publish(ch, b"1", HISTORY)
    top = await broker.broker.publish(ch, b"2", HISTORY)
    page = await broker.peer.history(ch, limit=0)
    assert page.publications == []
    assert page.position == top


async def test_history_since_other_epoch_returns_empty_page_and_position(broker: Engines) -> None:
    """A position from another epoch gets no publications, only the current position."""
    ch = channel()
    top = await broker.broker.publish(ch, b"1", HISTORY)
    page = await broker.broker.history(ch, since=StreamPosition(0, "other"))
    assert page.publications == []
    assert page.position == top


async def test_position_read_before_first_publish_stays_valid(broker: Engines) -> None:
    """A subscriber that read an empty stream's position can recover the first publication."""
    ch = channel()
    empty = await broker.broker.history(ch, limit=0)
    assert empty.position.offset == 0
    assert empty.position.epoch != ""
    pos = await broker.peer.publish(ch, b"1", HISTORY)
    assert pos == StreamPosition(1, empty.position.epoch)
    page = await broker.broker.history(ch, since=empty.position)
    assert [p.data for p in page.publications] == [b"1"]


async def test_history_is_trimmed_to_history_size(broker: Engines) -> None:
    """Only the newest history_size publications are kept; offsets keep counting."""
    ch = channel()
    opts = PublishOptions(history_size=3, history_ttl=60.0)
    for i in range(1, 6):
        top = await broker.broker.publish(ch, b"%d" % i, opts)
    page = await broker.peer.history(ch)
    assert [p.offset for p in page.publications] == [3, 4, 5]
    assert page.position == top


async def test_history_expires_after_ttl_but_position_survives(broker: Engines) -> None:
    """After history_ttl the items are gone, but the offset and epoch continue."""
    ch = channel()
    top = await broker.broker.publish(ch, b"1", PublishOptions(history_size=5, history_ttl=0.2))

    async def expired() -> bool:
        return not (await broker.peer.history(ch)).publications

    await eventually(expired)
    page = await broker.peer.history(ch)
    assert page.position == top
    nxt = await broker.broker.publish(ch, b"2", HISTORY)
    assert nxt == StreamPosition(2, top.epoch)


async def test_history_off_publishes_with_offset_zero(broker: Engines) -> None:
    """Without history a publication has offset 0 and an empty epoch, and keeps nothing."""
    ch = channel()
    await subscribe_everywhere(broker, ch)
    pos = await broker.broker.publish(ch, b"1", PublishOptions())
    assert pos == StreamPosition(0, "")
    await broker.peer_events.wait_for(lambda: len(broker.peer_events.pubs_in(ch)) == 1)
    pub = broker.peer_events.pubs_in(ch)[0]
    assert (pub.offset, pub.epoch, pub.data) == (0, "", b"1")
    assert (await broker.broker.history(ch)).publications == []


async def test_idempotency_key_returns_first_position_and_publishes_once(broker: Engines) -> None:
    """A repeated idempotency key gets the first position; nothing new is stored or sent."""
    ch = channel()
    await subscribe_everywhere(broker, ch)
    opts = PublishOptions(history_size=10, history_ttl=60.0, idempotency_key="k1")
    first = await broker.broker.publish(ch, b"1", opts)
    again = await broker.peer.publish(ch, b"1", opts)
    assert again == first
    other = await broker.broker.publish(ch, b"2", HISTORY)
    assert other.offset == first.offset + 1
    await broker.events.wait_for(lambda: len(broker.events.pubs_in(ch)) >= 2)
    assert [p.data for p in broker.events.pubs_in(ch)] == [b"1", b"2"]
    assert [p.offset for p in (await broker.peer.history(ch)).publications] == [1, 2]

    no_history = PublishOptions(idempotency_key="k2")
    assert await broker.broker.publish(ch, b"3", no_history) == StreamPosition(0, "")
    assert await broker.peer.publish(ch, b"3", no_history) == StreamPosition(0, "")
    sentinel = await broker.broker.publish(ch, b"4", HISTORY)
    await broker.events.wait_for(lambda: broker.events.pubs_in(ch)[-1].offset == sentinel.offset)
    assert [p.data for p in broker.events.pubs_in(ch)] == [b"1", b"2", b"3", b"4"]


async def test_remove_history_keeps_position(broker: Engines) -> None:
    """remove_history drops the items; the next publication continues the same stream."""
    ch = channel()
    await broker.broker.publish(ch, b"1", HISTORY)
    top = await broker.broker.publish(ch, b"2", HISTORY)
    await broker.peer.remove_history(ch)
    page = await broker.broker.history(ch)
    assert page.publications == []
    assert page.position == top
    assert await broker.broker.publish(ch, b"3", HISTORY) == StreamPosition(3, top.epoch)
    assert [p.offset for p in (await broker.peer.history(ch)).publications] == [3]


async def test_restore_position_starts_a_stream_at_the_durable_position(broker: Engines) -> None:
    """With no live stream, restore_position continues from the given position."""
    ch = channel()
    restored = await broker.broker.restore_position(ch, StreamPosition(41, "durable"))
    assert restored == StreamPosition(41, "durable")
    assert await broker.peer.restore_position(ch, StreamPosition(7, "x")) == restored
    assert await broker.peer.publish(ch, b"1", HISTORY) == StreamPosition(42, "durable")


async def test_restore_position_keeps_a_live_stream(broker: Engines) -> None:
    """restore_position never rewinds a stream that already assigned offsets."""
    ch = channel()
    live = await broker.broker.publish(ch, b"1", HISTORY)
    assert await broker.peer.restore_position(ch, StreamPosition(99, "durable")) == live
    assert await broker.broker.publish(ch, b"2", HISTORY) == StreamPosition(2, live.epoch)


async def test_publish_requiring_a_stream_never_starts_a_new_epoch(broker: Engines) -> None:
    """require_stream (persistent channels): with no position (lost, expired, or a history
    read that only fixed an epoch) the publish raises StreamMissing and changes nothing;
    once the stream is restored it continues it."""
    from server.errors import StreamMissing

    ch = channel()
    required = PublishOptions(history_size=10, history_ttl=60.0, require_stream=True)
    with pytest.raises(StreamMissing):
        await broker.broker.publish(ch, b"1", required)
    read = await broker.peer.history(ch)  # fixes an epoch, assigns no offset
    assert read.position.offset == 0
    with pytest.raises(StreamMissing):
        await broker.peer.publish(ch, b"1", required)
    assert (await broker.broker.history(ch, limit=None)).publications == []
    await broker.broker.restore_position(ch, StreamPosition(7, "durable"))
    assert await broker.peer.publish(ch, b"8", required) == StreamPosition(8, "durable")
    assert await broker.broker.publish(ch, b"9", required) == StreamPosition(9, "durable")


# ---------------------------------------------------------------------- delivery


async def test_publication_reaches_every_subscribed_node_in_order(broker: Engines) -> None:
    """Subscribed nodes receive each publication once, in offset order, with its fields."""
    ch = channel()
    await subscribe_everywhere(broker, ch)
    who = ClientInfo("u1", "c1", conn_info=b'{"n":1}')
    opts = PublishOptions(history_size=10, history_ttl=60.0, info=who, tags={"t": "1"})
    for i in range(1, 21):
        await (broker.broker if i % 2 else broker.peer).publish(ch, b"%d" % i, opts)
    for ev in (broker.events, broker.peer_events):
        await ev.wait_pubs(ch, 20)
        pubs = ev.pubs_in(ch)
        assert [p.offset for p in pubs] == list(range(1, 21))
        assert [p.data for p in pubs] == [b"%d" % i for i in range(1, 21)]
        assert (pubs[0].info, dict(pubs[0].tags or {})) == (who, {"t": "1"})


async def test_unsubscribed_channel_gets_nothing(broker: Engines) -> None:
    """After unsubscribe a node receives nothing more from that channel."""
    gone, kept = channel(), channel()
    await subscribe_everywhere(broker, gone, kept)
    await broker.broker.publish(gone, b"before", HISTORY)
    for ev in (broker.events, broker.peer_events):
        await ev.wait_pubs(gone, 1)
    await broker.broker.unsubscribe(gone)
    if broker.peer is not broker.broker:
        await broker.peer.unsubscribe(gone)
    await broker.peer.publish(gone, b"after", HISTORY)
    await broker.broker.publish_join(gone, info("u1", "c1"))
    # Delivery is ordered per node, so once the later publication to ``kept``
    # arrived, anything for ``gone`` would have arrived too.
    await broker.peer.publish(kept, b"sentinel", HISTORY)
    for ev in (broker.events, broker.peer_events):
        await ev.wait_pubs(kept, 1)
        assert [p.data for p in ev.pubs_in(gone)] == [b"before"]
        assert ev.joins == []


async def test_subscribe_is_idempotent(broker: Engines) -> None:
    """Subscribing twice delivers each publication once; one unsubscribe stops it."""
    ch, other = channel(), channel()
    await broker.broker.subscribe(ch)
    await broker.broker.subscribe(ch)
    await broker.broker.subscribe(other)
    await broker.broker.publish(ch, b"1", HISTORY)
    await broker.broker.publish(other, b"x", HISTORY)
    await broker.events.wait_for(lambda: len(broker.events.pubs_in(other)) == 1)
    assert [p.data for p in broker.events.pubs_in(ch)] == [b"1"]
    await broker.broker.unsubscribe(ch)
    await broker.broker.publish(ch, b"2", HISTORY)
    await broker.broker.publish(other, b"y", HISTORY)
    await broker.events.wait_for(lambda: len(broker.events.pubs_in(other)) == 2)
    assert [p.data for p in broker.events.pubs_in(ch)] == [b"1"]


async def test_join_and_leave_reach_subscribed_nodes(broker: Engines) -> None:
    """Join and leave announcements arrive at every node subscribed to the channel."""
    ch = channel()
    await subscribe_everywhere(broker, ch)
    who = ClientInfo("u1", "c1", conn_info=b'{"a":1}', chan_info=b'{"b":2}')
    await broker.broker.publish_join(ch, who)
    await broker.peer.publish_leave(ch, info("u2", "c2"))
    for ev in (broker.events, broker.peer_events):
        await ev.wait_until(lambda e: e.joins and e.leaves)
        assert ev.joins == [(ch, who)]
        assert ev.leaves == [(ch, info("u2", "c2"))]


async def test_control_reaches_every_node(broker: Engines) -> None:
    """A control message reaches every node, the sender included, without subscribing."""
    await broker.broker.publish_control(b'{"type":"x"}')
    await broker.peer.publish_control(b'{"type":"y"}')
    for ev in (broker.events, broker.peer_events):
        await ev.wait_until(lambda e: len(e.controls) >= 2)
        assert sorted(ev.controls) == [b'{"type":"x"}', b'{"type":"y"}']


async def test_ping_succeeds_when_the_engine_works(broker: Engines) -> None:
    """ping() returns quietly when the engine works end to end."""
    await broker.broker.ping()
    await broker.peer.ping()
    assert broker.events.controls == []


# ---------------------------------------------------------------------- presence


async def test_presence_add_refresh_remove_and_stats(broker: Engines) -> None:
    """Presence lists every client on any node; stats count clients and distinct users."""
    ch = channel()
    a1 = ClientInfo("alice", "c1", conn_info=b'{"x":1}', chan_info=b"[2]")
    a2, b1 = info("alice", "c2"), info("bob", "c3")
    await broker.presence.add_presence(ch, a1, 30.0)
    await broker.presence.add_presence(ch, a2, 30.0)
    await broker.peer_presence.add_presence(ch, b1, 30.0)
    assert await broker.peer_presence.presence(ch) == {"c1": a1, "c2": a2, "c3": b1}
    assert await broker.presence.presence_stats(ch) == (3, 2)

    await broker.presence.add_presence(ch, a1, 30.0)  # refresh: still one entry
    assert await broker.presence.presence_stats(ch) == (3, 2)

    await broker.peer_presence.remove_presence(ch, "c3")
    await broker.peer_presence.remove_presence(ch, "c3")  # idempotent
    assert await broker.presence.presence(ch) == {"c1": a1, "c2": a2}
    assert await broker.presence.presence_stats(ch) == (2, 1)
    assert await broker.presence.presence(channel()) == {}
    assert await broker.presence.presence_stats(channel()) == (0, 0)


async def test_presence_entries_expire_unless_refreshed(broker: Engines) -> None:
    """An entry disappears ttl seconds after its last add; a refreshed one stays."""
    ch = channel()
    await broker.presence.add_presence(ch, info("alice", "stale"), 0.2)
    await broker.presence.add_presence(ch, info("bob", "fresh"), 0.2)
    await broker.peer_presence.add_presence(ch, info("bob", "fresh"), 30.0)

    async def stale_gone() -> bool:
        return "stale" not in await broker.peer_presence.presence(ch)

    await eventually(stale_gone)
    assert await broker.presence.presence(ch) == {"fresh": info("bob", "fresh")}
    assert await broker.presence.presence_stats(ch) == (1, 1)


async def test_memory_engine_warns_when_it_forgets_idempotency_keys_early(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past its bound the memory engine forgets the oldest keys within their ttl, and says
    so (once a minute): a retry of one of those would be published again."""
    monkeypatch.setattr(broker_memory, "MAX_IDEMPOTENCY_KEYS", 3)
    mem = MemoryBroker()
    opts = [
        PublishOptions(history_size=10, history_ttl=60.0, idempotency_key=f"k{n}") for n in range(5)
    ]
    with expect_log("squall.broker", r"more than 3 idempotency keys within their ttl"):
        positions = [await mem.publish("chat:idem", b"x", o) for o in opts]
    assert await mem.publish("chat:idem", b"x", opts[4]) == positions[4]  # kept
    assert (await mem.publish("chat:idem", b"x", opts[0])).offset == 6  # forgotten


async def test_memory_engine_remembers_an_idempotency_key_past_ten_thousand_others() -> None:
    """A retry is recognised after 20 000 other keyed publishes within the key's ttl (one
    broadcast with a key over as many channels): the memory engine kept 10 000 and
    published such a retry a second time. (Redis keeps every key for its ttl.)"""
    mem = MemoryBroker()
    opts = PublishOptions(history_size=10, history_ttl=60.0, idempotency_key="order-1")
    first = await mem.publish("chat:order", b"1", opts)
    for n in range(20_000):
        await mem.publish(f"chat:other-{n}", b"x", PublishOptions(idempotency_key=f"k{n}"))
    assert await mem.publish("chat:order", b"1", opts) == first
    assert [p.offset for p in (await mem.history("chat:order")).publications] == [first.offset]
