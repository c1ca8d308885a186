"""RedisBroker beyond the shared contract: several nodes, one pub/sub link, and faults.

Fault tests run against a private redis-server (``private_redis``) that they
may kill, pause, stop and restart; the bystander is a broker on the session
Redis, which must notice nothing. Logs are asserted with ``expect_log``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aredis
from tornado.ioloop import IOLoop

from server.broker import ClientInfo, PublishOptions, StreamPosition
from server.broker_redis import RedisBroker
from server.config import RedisConfig
from server.errors import ConfigError, EngineError
from tests.engines import TIME_FACTOR, RecordingEvents, eventually, until
from tests.helpers import services
from tests.helpers.logs import expect_log

HISTORY = PublishOptions(history_size=100, history_ttl=60.0)
LOGGER = "squall.broker.redis"


class Cluster:
    """Starts RedisBrokers (and admin clients) inside a test; closes them at teardown."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.brokers: list[RedisBroker] = []
        self.admins: list[aredis.Redis] = []

    async def node(self, url: str, node_id: str, **cfg: Any) -> tuple[RedisBroker, RecordingEvents]:
        settings: dict[str, Any] = {
            "socket_timeout": 1.0 * TIME_FACTOR,
            "reconnect_delay": 0.02,
            "reconnect_max_delay": 0.2,
            **cfg,
        }
        broker = RedisBroker(RedisConfig(url=url, prefix=self.prefix, **settings), node_id=node_id)
        events = RecordingEvents()
        self.brokers.append(broker)
        await broker.start(events)
        return broker, events

    def admin(self, url: str) -> aredis.Redis:
        client = aredis.Redis.from_url(url, socket_timeout=2.0)
        self.admins.append(client)
        return client

    async def close(self) -> None:
        for broker in self.brokers:
            await broker.close()
        for client in self.admins:
            await client.aclose()


@pytest.fixture
def cluster(io_loop: IOLoop, unique_prefix: str) -> Iterator[Cluster]:
    """Brokers started by the test under a unique prefix; closed at teardown."""
    c = Cluster(unique_prefix)
    yield c
    io_loop.run_sync(c.close)


@pytest.fixture
def private_redis() -> Iterator[services.ServiceProcess]:
    """A redis-server of this test's own, free to be stopped and restarted."""
    try:
        svc = services.start_redis()
    except RuntimeError as exc:
        services.unavailable(str(exc))
    yield svc
    svc.stop()


def url_of(svc: services.ServiceProcess, password: str = "") -> str:
    auth = f":{password}@" if password else ""
    return f"redis://{auth}127.0.0.1:{svc.port}/0"


async def command(client: aredis.Redis, *args: str) -> Any:
    """Run a raw Redis command (CLIENT KILL, CLIENT PAUSE, ...)."""
    # redis-py leaves execute_command unannotated.
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


async def in_thread(fn: Any) -> None:
    await asyncio.get_running_loop().run_in_executor(None, fn)


async def assert_bystander_unaffected(bystander: RedisBroker, events: RecordingEvents) -> None:
    """A node on another Redis keeps publishing and receiving, and saw no gap."""
    ch = "bystander:" + uuid.uuid4().hex[:6]
    await bystander.subscribe(ch)
    pos = await bystander.publish(ch, b"still here", HISTORY)
    await events.wait_for(lambda: len(events.pubs_in(ch)) == 1)
    assert events.pubs_in(ch)[0].offset == pos.offset
    assert events.gaps == []
    await bystander.ping()


# ---------------------------------------------------------------------- nodes and the link


async def test_publications_from_a_reach_b_in_order_with_identical_offsets(
    cluster: Cluster, redis_url: str
) -> None:
    """Concurrent publishes from two nodes arrive at both in one order with the same offsets."""
    a, a_events = await cluster.node(redis_url, "a")
    b, b_events = await cluster.node(redis_url, "b")
    await a.subscribe("room")
    await b.subscribe("room")
    positions: list[StreamPosition] = []
    for batch in range(0, 300, 50):  # 50 publishes in flight at a time, from both nodes
        sends = [
            (a if i % 3 else b).publish("room", b'{"i":%d}' % i, HISTORY)
            for i in range(batch, batch + 50)
        ]
        positions += await asyncio.gather(*sends)
    assert sorted(p.offset for p in positions) == list(range(1, 301))
    for events in (a_events, b_events):
        await events.wait_pubs("room", 300)
    a_seen = [(p.offset, p.epoch, p.data) for p in a_events.pubs_in("room")]
    b_seen = [(p.offset, p.epoch, p.data) for p in b_events.pubs_in("room")]
    assert a_seen == b_seen
    assert [o for o, _, _ in a_seen] == list(range(1, 301))
    by_data = {data: offset for offset, _, data in a_seen}
    assert all(by_data[b'{"i":%d}' % i] == positions[i].offset for i in range(300))


async def test_one_pubsub_connection_carries_every_subscription(
    cluster: Cluster, private_redis: services.ServiceProcess
) -> None:
    """Each node holds exactly one pub/sub connection, however many channels it follows."""
    url = url_of(private_redis)
    admin = cluster.admin(url)
    a, _ = await cluster.node(url, "a")
    b, _ = await cluster.node(url, "b")
    for i in range(50):
        await a.subscribe(f"c{i}")
    await b.subscribe("c0")
    clients = (await command(admin, "CLIENT", "LIST", "TYPE", "pubsub")).splitlines()
    assert len(clients) == 2
    numsub = dict(await admin.pubsub_numsub(f"{cluster.prefix}:c:c0", f"{cluster.prefix}:c:c1"))
    assert list(numsub.values()) == [2, 1]
    assert a.is_connected()
    assert b.is_connected()


async def test_subscribe_and_unsubscribe_apply_in_call_order(
    cluster: Cluster, private_redis: services.ServiceProcess
) -> None:
    """Overlapping subscribe/unsubscribe calls for a channel end in the state of the last call."""
    url = url_of(private_redis)
    admin = cluster.admin(url)
    a, events = await cluster.node(url, "a")
    key = f"{cluster.prefix}:c:flip"

    async def redis_subscribers() -> int:
        return int(dict(await admin.pubsub_numsub(key))[key.encode()])

    await asyncio.gather(a.subscribe("flip"), a.unsubscribe("flip"))
    assert await redis_subscribers() == 0
    await asyncio.gather(a.subscribe("flip"), a.unsubscribe("flip"), a.subscribe("flip"))
    assert await redis_subscribers() == 1
    await a.publish("flip", b"1", HISTORY)
    await events.wait_for(lambda: len(events.pubs_in("flip")) == 1)


async def test_malformed_pubsub_message_is_ignored_and_delivery_continues(
    cluster: Cluster, redis_url: str
) -> None:
    """Garbage published on a channel's Redis key is logged and skipped; later ones arrive."""
    admin = cluster.admin(redis_url)
    a, events = await cluster.node(redis_url, "a")
    await a.subscribe("room")
    with expect_log(LOGGER, r"malformed pubsub message"):
        await admin.publish(f"{cluster.prefix}:c:room", b"p1 9 short")
        await a.publish("room", b"ok", HISTORY)
        await events.wait_for(lambda: len(events.pubs_in("room")) == 1)
    assert events.pubs_in("room")[0].data == b"ok"


async def test_failing_event_handler_does_not_stop_the_listener(
    cluster: Cluster, redis_url: str
) -> None:
    """A hub callback that raises is logged as an error; the next publication still arrives."""
    a, events = await cluster.node(redis_url, "a")
    original = events.on_publication

    def explode_once(channel: str, pub: Any) -> None:
        events.on_publication = original  # type: ignore[method-assign]
        raise RuntimeError("boom")

    events.on_publication = explode_once  # type: ignore[method-assign]
    await a.subscribe("room")
    with expect_log(LOGGER, r"broker event handler \w+ failed"):
        await a.publish("room", b"1", HISTORY)
        await a.publish("room", b"2", HISTORY)
        await events.wait_for(lambda: len(events.pubs_in("room")) == 1)
    assert events.pubs_in("room")[0].data == b"2"


async def test_close_is_idempotent_and_later_calls_raise(cluster: Cluster, redis_url: str) -> None:
    """After close() the broker refuses work with EngineError and closing again is harmless."""
    a, _ = await cluster.node(redis_url, "a")
    await a.close()
    await a.close()
    assert not a.is_connected()
    with pytest.raises(EngineError):
        await a.publish("room", b"1", HISTORY)
    with pytest.raises(EngineError):
        await a.subscribe("room")
    with pytest.raises(EngineError):
        await a.ping()


def test_bad_settings_name_the_key() -> None:
    """A bad URL or timeout is a ConfigError naming the redis.* key."""
    with pytest.raises(ConfigError, match=r"^redis\.url: "):
        RedisBroker(RedisConfig(url="http://127.0.0.1:1"), node_id="a")
    with pytest.raises(ConfigError, match=r"^redis\.socket_timeout: "):
        RedisBroker(RedisConfig(url="redis://127.0.0.1:1", socket_timeout=0), node_id="a")


# ---------------------------------------------------------------------- faults


async def test_pubsub_kill_reports_gap_and_delivery_resumes(
    cluster: Cluster, private_redis: services.ServiceProcess, redis_url: str
) -> None:
    """After Redis drops the pub/sub links, both nodes resubscribe, report the gap, and deliver."""
    url = url_of(private_redis)
    admin = cluster.admin(url)
    a, a_events = await cluster.node(url, "a")
    b, b_events = await cluster.node(url, "b")
    bystander, by_events = await cluster.node(redis_url, "bystander")
    for ch in ("one", "two"):
        await a.subscribe(ch)
    await b.subscribe("one")
    first = await a.publish("one", b"1", HISTORY)

    with (
        expect_log(LOGGER, r"pubsub link to 127\.0\.0\.1:\d+/0 lost"),
        expect_log(LOGGER, r"pubsub link to 127\.0\.0\.1:\d+/0 restored; resubscribed 2 "),
    ):
        killed = await command(admin, "CLIENT", "KILL", "TYPE", "pubsub")
        assert killed == 2
        await a_events.wait_for(lambda: a_events.gaps)
        await b_events.wait_for(lambda: b_events.gaps)
    assert a_events.gaps == [{"one", "two"}]
    assert b_events.gaps == [{"one"}]
    assert a.is_connected()
    assert b.is_connected()

    nxt = await b.publish("one", b"2", HISTORY)
    assert nxt == StreamPosition(first.offset + 1, first.epoch)  # the stream itself survived
    for events in (a_events, b_events):
        await events.wait_pubs("one", 2)
        assert [p.offset for p in events.pubs_in("one")] == [1, 2]
    await a.publish_control(b"after")
    await b_events.wait_for(lambda: b_events.controls == [b"after"])
    await a.ping()
    await assert_bystander_unaffected(bystander, by_events)


async def subscribe_all(broker: RedisBroker, channels: list[str]) -> None:
    """Subscribe ``channels``, 20 at a time, retrying those that time out (tiny timeouts)."""
    for i in range(0, len(channels), 20):
        todo = channels[i : i + 20]
        for _ in range(5):
            results = await asyncio.gather(
                *(broker.subscribe(ch) for ch in todo), return_exceptions=True
            )
            for result in results:
                if not isinstance(result, (EngineError, type(None))):
                    raise result
            todo = [ch for ch, result in zip(todo, results, strict=True) if result is not None]
            if not todo:
                break
        assert not todo, f"could not subscribe {todo[0]!r}"


# 8 000 single subscribes to set up: 2 s normally, about 30 s under asyncio's debug
# mode (CI), which records a stack for every future and task they make.
@pytest.mark.timeout(90)
async def test_link_with_thousands_of_channels_comes_back(
    cluster: Cluster, private_redis: services.ServiceProcess
) -> None:
    """However many channels a node has, its link is resubscribed (in batches) and delivers.

    Each SUBSCRIBE batch is bounded by 2 * socket_timeout on its own; the whole
    resubscription used to be, so a node with enough channels (here 8000 long
    names against 50 ms) timed out on every attempt and never came back.
    """
    url = url_of(private_redis)
    admin = cluster.admin(url)
    a, events = await cluster.node(url, "a", socket_timeout=0.025 * TIME_FACTOR)
    publisher, _ = await cluster.node(url, "publisher")  # default timeouts: never flaky
    channels = [f"many:{'x' * 100}:{i}" for i in range(8000)]
    # Subscribing them one by one is not under test: with the tiny bound (50 ms)
    # each of 8 000 subscribes had to beat it, and a slow moment late in the
    # suite (a GC pass) made them time out and retry past the test's deadline.
    tight, a._op_timeout = a._op_timeout, 2.0 * TIME_FACTOR
    await subscribe_all(a, channels)
    a._op_timeout = tight

    with (
        expect_log(LOGGER, r"pubsub link to .* lost"),
        expect_log(LOGGER, r"pubsub link to .* restored; resubscribed 8000 "),
    ):
        assert await command(admin, "CLIENT", "KILL", "TYPE", "pubsub") == 2
        await events.wait_for(lambda: events.gaps, within=5.0)
    assert events.gaps == [set(channels)]
    assert a.is_connected()
    sample = [channels[0], channels[999], channels[1000], channels[4321], channels[-1]]
    numsub = dict(await admin.pubsub_numsub(*(f"{cluster.prefix}:c:{ch}" for ch in sample)))
    assert list(numsub.values()) == [1] * len(sample)
    await until(publisher.is_connected)
    for ch in sample:
        await publisher.publish(ch, ch.encode(), HISTORY)
    await events.wait_for(lambda: all(events.pubs_in(ch) for ch in sample))
    assert [events.pubs_in(ch)[0].data for ch in sample] == [ch.encode() for ch in sample]
    await a.ping()


async def test_unsubscribe_while_the_link_is_resubscribing_is_not_undone(
    cluster: Cluster, private_redis: services.ServiceProcess
) -> None:
    """A channel unsubscribed between two SUBSCRIBE batches ends up unsubscribed in Redis.

    One was already sent again (it is unsubscribed once the link is up), the
    other not yet (it is skipped); neither is reported as a gap.
    """
    url = url_of(private_redis)
    admin = cluster.admin(url)
    a, events = await cluster.node(url, "a")
    channels = [f"c{i}" for i in range(2500)]  # three batches
    await subscribe_all(a, channels)
    dropped = [channels[0], channels[-1]]  # in the first batch, in the last one
    original = a._subscribe_batch
    batches = 0

    async def batch_then_unsubscribe(conn: Any, keys: list[bytes]) -> None:
        nonlocal batches
        await original(conn, keys)
        batches += 1
        if batches == 1:
            assert not a.is_connected()
            for ch in dropped:
                await a.unsubscribe(ch)

    a._subscribe_batch = batch_then_unsubscribe  # type: ignore[method-assign]
    with expect_log(LOGGER, r"restored; resubscribed 2498 "):
        await command(admin, "CLIENT", "KILL", "TYPE", "pubsub")
        await events.wait_for(lambda: events.gaps, within=5.0)
    assert batches == 3
    assert events.gaps == [set(channels[1:-1])]
    keys = [f"{cluster.prefix}:c:{ch}" for ch in [*dropped, channels[1], channels[-2]]]

    async def settled() -> bool:
        return list(dict(await admin.pubsub_numsub(*keys)).values()) == [0, 0, 1, 1]

    await eventually(settled)
    await a.subscribe(channels[0])  # the link's bookkeeping is in order: works as ever
    await a.publish(channels[0], b"back", HISTORY)
    await events.wait_for(lambda: len(events.pubs_in(channels[0])) == 1)


async def test_flapping_link_backs_off_until_it_stays_up(
    cluster: Cluster, private_redis: services.ServiceProcess
) -> None:
    """A link Redis drops right after accepting it is retried ever more slowly.

    Each reconnect reports a gap, which makes every local subscriber recover.
    The backoff used to start over as soon as SUBSCRIBE succeeded, so a link
    killed again and again (output buffer limit, CLIENT KILL in a loop) came
    back, with a gap, every reconnect_delay. It starts over only after the
    link stayed up for max(reconnect_max_delay, 2 s).
    """
    url = url_of(private_redis)
    admin = cluster.admin(url)
    a, events = await cluster.node(url, "a", reconnect_delay=0.05, reconnect_max_delay=2.0)
    await a.subscribe("room")
    stop = asyncio.Event()

    async def kill_until_stopped() -> None:
        # Stopped by a flag: redis-py may swallow a cancellation on Python 3.11.
        while not stop.is_set():
            await command(admin, "CLIENT", "KILL", "TYPE", "pubsub")
            await asyncio.sleep(0.005)

    with expect_log(LOGGER, r"pubsub link to .* lost"):
        killer = asyncio.create_task(kill_until_stopped())
        await asyncio.sleep(2.5)
        stop.set()
        await killer
    # Delays of 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2 s, each jittered down to half at
    # most: no more than 6 reconnects fit in 2.5 s (without backoff about 50).
    assert 2 <= len(events.gaps) <= 9, len(events.gaps)

    for _ in range(3):
        # Stayed up for long enough: the next reconnect is quick again. On a busy host
        # the last kill can be noticed after is_connected said yes: then wait again.
        await until(a.is_connected, within=4.0)
        flaps = len(events.gaps)
        await asyncio.sleep(2.2)
        if len(events.gaps) == flaps and a.is_connected():
            break
    assert len(events.gaps) == flaps
    started = time.monotonic()
    await command(admin, "CLIENT", "KILL", "TYPE", "pubsub")
    await events.wait_for(lambda: len(events.gaps) > flaps)
    assert time.monotonic() - started < 0.5 * TIME_FACTOR  # not 1-2 s, as when backed off
    await a.publish("room", b"1", HISTORY)
    await events.wait_for(lambda: len(events.pubs_in("room")) == 1)


async def test_redis_restart_raises_engine_error_then_recovers_with_new_epoch(
    cluster: Cluster, private_redis: services.ServiceProcess, redis_url: str
) -> None:
    """While Redis is down calls fail fast with EngineError; once back, a new epoch starts."""
    url = url_of(private_redis)
    a, a_events = await cluster.node(url, "a", socket_timeout=0.5)
    b, b_events = await cluster.node(url, "b")
    bystander, by_events = await cluster.node(redis_url, "bystander")
    await a.subscribe("room")
    await b.subscribe("room")
    before = await a.publish("room", b"1", HISTORY)
    await a.add_presence("room", ClientInfo("u", "c"), 30.0)

    with expect_log(LOGGER, r"pubsub link to .* lost"):
        await in_thread(private_redis.stop)
        await until(lambda: not a.is_connected() and not b.is_connected())

    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "publish": lambda: a.publish("room", b"2", HISTORY),
        "history": lambda: a.history("room"),
        "presence": lambda: a.presence("room"),
        "join": lambda: a.publish_join("room", ClientInfo("u", "c")),
        "subscribe": lambda: a.subscribe("other"),
        "ping": a.ping,
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(EngineError):
            await call()
        assert time.monotonic() - started < 1.0 * TIME_FACTOR, name
    await a.unsubscribe("room2")  # no link: nothing to undo, and no error
    await assert_bystander_unaffected(bystander, by_events)

    with expect_log(LOGGER, r"pubsub link to .* restored; resubscribed 1 "):
        await in_thread(private_redis.start)
        await a_events.wait_for(lambda: a_events.gaps, within=5.0)
        await b_events.wait_for(lambda: b_events.gaps, within=5.0)
    assert a_events.gaps == [{"room"}]
    assert b_events.gaps == [{"room"}]

    after = await b.publish("room", b"3", HISTORY)
    assert after.offset == 1
    assert after.epoch != before.epoch  # the stream was lost: recovery must fail, not skip
    page = await a.history("room", since=before)
    assert page.publications == []
    assert page.position == after
    for events in (a_events, b_events):
        await events.wait_pubs("room", 2)
        assert [p.data for p in events.pubs_in("room")] == [b"1", b"3"]
    await a.ping()
    assert await a.presence("room") == {}


async def test_unresponsive_redis_is_detected_and_calls_stay_bounded(
    cluster: Cluster, private_redis: services.ServiceProcess, redis_url: str
) -> None:
    """A Redis that stops answering fails calls in bounded time; the silent link is replaced."""
    url = url_of(private_redis)
    admin = cluster.admin(url)
    a, events = await cluster.node(url, "a", socket_timeout=0.3, pubsub_ping_interval=0.2)
    bystander, by_events = await cluster.node(redis_url, "bystander")
    await a.subscribe("room")
    await a.publish("room", b"1", HISTORY)
    await events.wait_for(lambda: len(events.pubs_in("room")) == 1)

    with (
        expect_log(LOGGER, r"lost \(no reply to PING\)"),
        expect_log(LOGGER, r"restored"),
    ):
        await command(admin, "CLIENT", "PAUSE", str(int(1500 * TIME_FACTOR)), "ALL")
        started = time.monotonic()
        with pytest.raises(EngineError, match="redis publish"):
            await a.publish("room", b"lost", HISTORY)
        assert time.monotonic() - started < 0.7 * TIME_FACTOR
        await assert_bystander_unaffected(bystander, by_events)
        await events.wait_for(lambda: events.gaps, within=5.0)
    assert events.gaps == [{"room"}]
    await a.publish("room", b"2", HISTORY)
    await events.wait_for(lambda: len(events.pubs_in("room")) == 2)
    assert [p.offset for p in events.pubs_in("room")] == [1, 2]


async def test_a_subscribe_that_timed_out_leaves_no_subscription_in_redis(
    cluster: Cluster, private_redis: services.ServiceProcess
) -> None:
    """A SUBSCRIBE whose reply comes too late (Redis paused) fails the subscribe and
    is taken back: Redis must not go on sending that channel to this node, where
    nobody wants it, for the rest of the link's life."""
    url = url_of(private_redis)
    admin = cluster.admin(url)
    a, _ = await cluster.node(url, "a", socket_timeout=0.3)
    pause = 1.5 * TIME_FACTOR
    await command(admin, "CLIENT", "PAUSE", str(int(pause * 1000)), "ALL")
    started = time.monotonic()
    with pytest.raises(EngineError, match="SUBSCRIBE timed out"):
        await a.subscribe("late")
    await asyncio.sleep(pause - (time.monotonic() - started) + 0.2)
    await a.subscribe("later")  # its reply comes after Redis has handled "late"
    assert a.is_connected()
    channels = await admin.pubsub_channels(f"{cluster.prefix}:c:*")
    assert channels == [f"{cluster.prefix}:c:later".encode()]


async def test_broker_started_while_redis_is_down_connects_later(
    cluster: Cluster, redis_url: str
) -> None:
    """A node started before Redis is up keeps trying and works once Redis arrives."""
    port = services.free_port()
    with expect_log(LOGGER, r"pubsub link to 127\.0\.0\.1:\d+/0 down"):
        a, events = await cluster.node(f"redis://127.0.0.1:{port}/0", "a")
    bystander, by_events = await cluster.node(redis_url, "bystander")
    assert not a.is_connected()
    with pytest.raises(EngineError):
        await a.ping()
    with pytest.raises(EngineError):
        await a.subscribe("room")

    svc = await asyncio.get_running_loop().run_in_executor(None, services.start_redis, port)
    try:
        await until(a.is_connected, within=5.0)
        await a.subscribe("room")
        await a.publish("room", b"1", HISTORY)
        await events.wait_for(lambda: len(events.pubs_in("room")) == 1)
        await a.ping()
        assert events.gaps == []  # nothing was subscribed, so nothing was missed
        await assert_bystander_unaffected(bystander, by_events)
    finally:
        await in_thread(svc.stop)


async def test_log_lines_and_errors_never_show_the_password(
    cluster: Cluster,
    private_redis: services.ServiceProcess,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With a password in the URL, outage logs and EngineErrors name only host:port/db."""
    password = "s3cret-" + uuid.uuid4().hex[:8]
    await in_thread(private_redis.stop)
    private_redis.argv += ["--requirepass", password]
    await in_thread(private_redis.start)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    a, events = await cluster.node(url_of(private_redis, password), "a")
    bystander, by_events = await cluster.node(redis_url, "bystander")
    await a.subscribe("room")
    await a.publish("room", b"1", HISTORY)
    await events.wait_for(lambda: len(events.pubs_in("room")) == 1)

    with expect_log(LOGGER, r"lost"):
        await in_thread(private_redis.stop)
        await until(lambda: not a.is_connected())
    with pytest.raises(EngineError) as err:
        await a.publish("room", b"2", HISTORY)
    await assert_bystander_unaffected(bystander, by_events)
    await in_thread(private_redis.start)
    await events.wait_for(lambda: events.gaps, within=5.0)
    assert password not in str(err.value)
    assert caplog.records
    assert all(password not in rec.getMessage() for rec in caplog.records)
