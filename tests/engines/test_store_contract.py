"""The ``Store`` contract, run against every implementation.

One suite over the ``store`` fixture: ``MemoryStore``, and ``MongoStore``
through PyMongo's ``AsyncMongoClient`` and through Motor, each on its own
database of the session's MongoDB-compatible server (FerretDB unless
``SQUALL_MONGODB_URL`` says otherwise).

``MongoStore`` writes behind, so most tests read twice: right after
``append`` (the publications are still queued; ``append`` never yields to the
flusher, so the first read is guaranteed to see the queue) and again once
``status().queue_depth`` is 0 (they come from the collection).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from tornado.ioloop import IOLoop

from server.broker import ClientInfo, Publication, StreamPosition
from server.config import MongoConfig
from server.store import PersistOptions, Store
from server.store_memory import MemoryStore
from server.store_mongo import MongoStore
from tests.engines import TIME_FACTOR, eventually

KEEP = PersistOptions()


def mongo_config(url: str, database: str, driver: str, **overrides: object) -> MongoConfig:
    """Small intervals so written-behind state settles quickly in tests."""
    options: dict[str, object] = {
        "url": url,
        "database": database,
        "driver": driver,
        "flush_interval": 0.01,
        "retention_interval": 0.05,
        "ping_interval": 0.5,
        "timeout": 5.0,
    }
    options.update(overrides)
    return MongoConfig(**options)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "mongo-pymongo", "mongo-motor"])
def store(request: pytest.FixtureRequest, io_loop: IOLoop, unique_prefix: str) -> Iterator[Store]:
    """A started store of one kind, on a database no other test uses; closed after the test."""
    if request.param == "memory":
        s: Store = MemoryStore()
    else:
        url = request.getfixturevalue("mongo_url")
        s = MongoStore(mongo_config(url, unique_prefix, request.param.removeprefix("mongo-")))
    io_loop.run_sync(s.start)
    yield s
    io_loop.run_sync(s.close)


def pub(offset: int, epoch: str = "e1", **kw: object) -> Publication:
    return Publication(offset, epoch, b'{"n":%d}' % offset, **kw)  # type: ignore[arg-type]


async def written(store: Store) -> None:
    """Wait until nothing is queued (a no-op for stores that write through)."""

    async def drained() -> bool:
        return store.status().queue_depth == 0

    await eventually(drained, within=5.0)


async def outlive(ttl: float) -> None:
    """Let a TTL run out: the passing time is the behaviour under test, not a sync point."""
    await asyncio.sleep(ttl * 1.2)


async def test_publications_read_back_in_offset_order(store: Store) -> None:
    """What was appended reads back oldest first, right after append and once written."""
    for i in range(1, 6):
        await store.append("ch", pub(i), KEEP)
    expected = [pub(i) for i in range(1, 6)]
    assert await store.read_since("ch") == expected
    await written(store)
    assert await store.read_since("ch") == expected


async def test_every_field_round_trips_exactly(store: Store) -> None:
    """Data bytes, client info, tags and time come back exactly as given."""
    data = '{"b": [1, 2.50, 1e3],  "a": "\\u00e9 é ☃", "z": null}'.encode()
    full = Publication(
        7,
        "epoch-x",
        data,
        info=ClientInfo("user-1", "client-1", b'{"name": "Ann"}', b"[1,2]"),
        time=1_700_000_000_123,
        tags={"a.b": "1", "$x": "y", "": "empty key"},
    )
    bare = Publication(8, "epoch-x", b"{}", info=ClientInfo("", "c2"))
    await store.append("rt", full, KEEP)
    await store.append("rt", bare, KEEP)
    assert await store.read_since("rt") == [full, bare]
    await written(store)
    got = await store.read_since("rt")
    assert got == [full, bare]
    assert got[0].data == data


async def test_since_limit_and_reverse_select_the_page(store: Store) -> None:
    """since skips up to its offset, limit caps the page, reverse returns newest first."""
    for i in range(1, 11):
        await store.append("pg", pub(i), KEEP)
    for _ in range(2):  # queued, then written
        since = StreamPosition(4, "e1")
        assert [p.offset for p in await store.read_since("pg", since=since)] == list(range(5, 11))
        page = await store.read_since("pg", since=since, limit=3)
        assert [p.offset for p in page] == [5, 6, 7]
        # Reversed, since pages back: the publications before it, newest first.
        back = await store.read_since("pg", since=since, limit=2, reverse=True)
        assert [p.offset for p in back] == [3, 2]
        back = await store.read_since("pg", since=StreamPosition(11, "e1"), reverse=True)
        assert [p.offset for p in back] == list(range(10, 0, -1))
        assert await store.read_since("pg", since=StreamPosition(1, "e1"), reverse=True) == []
        newest = await store.read_since("pg", limit=3, reverse=True)
        assert [p.offset for p in newest] == [10, 9, 8]
        assert [p.offset for p in await store.read_since("pg", reverse=True)] == list(
            range(10, 0, -1)
        )
        assert await store.read_since("pg", limit=0) == []
        assert await store.read_since("pg", since=StreamPosition(10, "e1")) == []
        await written(store)


async def test_positions_past_the_int64_range_read_as_past_every_offset(store: Store) -> None:
    """Clients may send any uint64 offset; BSON integers are signed 64-bit. A bound
    above that range is past every stored offset, never an error."""
    for i in (1, 2, 3):
        await store.append("big", pub(i), KEEP)
    for _ in range(2):  # queued, then written
        for offset in (2**63, 2**64 - 1):
            since = StreamPosition(offset, "e1")
            assert await store.read_since("big", since=since) == []
            back = await store.read_since("big", since=since, reverse=True)
            assert [p.offset for p in back] == [3, 2, 1]
        await written(store)


async def test_epochs_are_kept_apart(store: Store) -> None:
    """A new epoch starts a separate stream; the old one stays readable by its epoch."""
    for i in range(1, 4):
        await store.append("ep", pub(i, "old"), KEEP)
    await written(store)
    for i in range(1, 3):
        await store.append("ep", pub(i, "new"), KEEP)
    for _ in range(2):
        assert await store.read_since("ep") == [pub(1, "new"), pub(2, "new")]
        old = await store.read_since("ep", since=StreamPosition(0, "old"))
        assert old == [pub(i, "old") for i in range(1, 4)]
        assert await store.read_since("ep", since=StreamPosition(1, "new")) == [pub(2, "new")]
        assert await store.latest("ep") == StreamPosition(2, "new")
        await written(store)


async def test_latest_is_the_last_accepted_position(store: Store) -> None:
    """latest() is None for an unknown channel, then the last appended position."""
    assert await store.latest("lt") is None
    assert await store.read_since("lt") == []
    await store.append("lt", pub(1), KEEP)
    assert await store.latest("lt") == StreamPosition(1, "e1")
    await store.append("lt", pub(2), KEEP)
    assert await store.latest("lt") == StreamPosition(2, "e1")
    await written(store)
    assert await store.latest("lt") == StreamPosition(2, "e1")
    assert await store.latest("other") is None
    # No process was killed: a restored stream continues right after the latest.
    assert await store.resume("lt") == StreamPosition(2, "e1")
    assert await store.resume("other") is None


async def test_duplicate_append_is_stored_once(store: Store) -> None:
    """Appending the same position again (a retry) keeps one copy, queued or written."""
    await store.append("dup", pub(1), KEEP)
    await store.append("dup", pub(2), KEEP)
    await store.append("dup", pub(2), KEEP)  # while the first copy may still be queued
    assert await store.read_since("dup") == [pub(1), pub(2)]
    await written(store)
    await store.append("dup", pub(1), KEEP)  # after it was written
    await store.append("dup", pub(2), KEEP)
    assert await store.read_since("dup") == [pub(1), pub(2)]
    await written(store)
    assert await store.read_since("dup") == [pub(1), pub(2)]
    assert await store.latest("dup") == StreamPosition(2, "e1")


async def test_size_retention_keeps_the_newest(store: Store) -> None:
    """With size N, only the newest N publications of the channel are kept; others untouched."""
    sized = PersistOptions(size=3)
    for i in range(1, 8):
        await store.append("sz", pub(i), sized)
        await store.append("bystander", pub(i), KEEP)

    async def trimmed() -> bool:
        return [p.offset for p in await store.read_since("sz")] == [5, 6, 7]

    await eventually(trimmed, within=5.0)
    assert [p.offset for p in await store.read_since("bystander")] == list(range(1, 8))
    assert await store.latest("sz") == StreamPosition(7, "e1")


async def test_latest_is_the_highest_offset_when_appends_arrive_out_of_order(
    store: Store,
) -> None:
    """Concurrent publishes reach the store in any order: latest never goes below an
    accepted offset (a restarted node continues from it, so a lower one would hand out
    a taken offset), and reads stay in offset order, queued and once written."""
    await store.append("ooo", pub(2), KEEP)
    await written(store)  # so that offset 1 is accepted (and stored) at a later time
    await store.append("ooo", pub(1), KEEP)
    for _ in range(2):  # 1 queued, then written
        assert await store.latest("ooo") == StreamPosition(2, "e1")
        assert await store.read_since("ooo") == [pub(1), pub(2)]
        assert [p.offset for p in await store.read_since("ooo", limit=1, reverse=True)] == [2]
        await written(store)
    await store.append("ooo", pub(3), KEEP)
    await written(store)
    await store.append("ooo", pub(2), KEEP)  # a late retry of a stored one, while 3 is stored
    assert await store.latest("ooo") == StreamPosition(3, "e1")
    await written(store)
    assert await store.latest("ooo") == StreamPosition(3, "e1")
    assert await store.read_since("ooo") == [pub(1), pub(2), pub(3)]


async def test_size_retention_keeps_the_highest_offsets_whatever_the_arrival_order(
    store: Store,
) -> None:
    """Size retention keeps the highest offsets, not the last arrived: each publication
    is written before the next arrives (so each is accepted at a later time)."""
    sized = PersistOptions(size=2)
    for offset in (3, 1, 4, 2):
        await store.append("sz-ooo", pub(offset), sized)
        await written(store)

    async def trimmed() -> bool:
        return [p.offset for p in await store.read_since("sz-ooo")] == [3, 4]

    await eventually(trimmed, within=5.0)
    assert await store.latest("sz-ooo") == StreamPosition(4, "e1")


async def test_size_retention_keeps_the_current_epoch_first(store: Store) -> None:
    """Size counts across epochs: the current epoch's publications are kept first, then
    the newest of the older epoch, until the current one alone fills the size."""
    sized = PersistOptions(size=3)
    for i in range(1, 6):
        await store.append("sz-ep", pub(i, "old"), sized)
    await written(store)
    for i in (2, 1):  # out of order too
        await store.append("sz-ep", pub(i, "new"), sized)
        await written(store)

    async def kept(old: list[int], new: list[int]) -> bool:
        olds = await store.read_since("sz-ep", since=StreamPosition(0, "old"))
        news = await store.read_since("sz-ep", since=StreamPosition(0, "new"))
        return [p.offset for p in olds] == old and [p.offset for p in news] == new

    await eventually(lambda: kept([5], [1, 2]), within=5.0)
    await store.append("sz-ep", pub(3, "new"), sized)
    await store.append("sz-ep", pub(4, "new"), sized)
    await eventually(lambda: kept([], [2, 3, 4]), within=5.0)
    assert await store.latest("sz-ep") == StreamPosition(4, "new")


async def test_ttl_retention_drops_expired(store: Store) -> None:
    """Publications older than ttl seconds disappear; newer ones and other channels stay."""
    ttl = 0.3 * TIME_FACTOR
    short = PersistOptions(ttl=ttl)
    await store.append("ttl", pub(1), short)
    await store.append("ttl", pub(2), short)
    await store.append("bystander", pub(1), KEEP)
    started = time.monotonic()
    assert [p.offset for p in await store.read_since("ttl")] == [1, 2]
    await outlive(ttl)
    assert time.monotonic() - started > ttl
    await store.append("ttl", pub(3), short)

    async def expired() -> bool:
        return [p.offset for p in await store.read_since("ttl")] == [3]

    await eventually(expired, within=5.0)
    assert await store.read_since("bystander") == [pub(1)]


async def test_reads_never_return_expired_publications(store: Store) -> None:
    """Once its ttl has passed a publication is gone from reads, before any cleanup runs."""
    ttl = 0.3 * TIME_FACTOR
    await store.append("ttl-read", pub(1), PersistOptions(ttl=ttl))
    await store.append("ttl-read", pub(2), KEEP)
    assert [p.offset for p in await store.read_since("ttl-read")] == [1, 2]
    await outlive(ttl)
    assert [p.offset for p in await store.read_since("ttl-read")] == [2]
    assert [p.offset for p in await store.read_since("ttl-read", reverse=True, limit=5)] == [2]


async def test_remove_deletes_queued_and_written(store: Store) -> None:
    """remove() drops a channel's publications, written or still queued; others stay."""
    for i in range(1, 4):
        await store.append("rm", pub(i), KEEP)
        await store.append("bystander", pub(i), KEEP)
    await written(store)
    await store.append("rm", pub(4), KEEP)  # still queued when removed
    await store.remove("rm")
    assert await store.read_since("rm") == []
    assert await store.latest("rm") is None
    await written(store)
    assert await store.read_since("rm") == []
    assert [p.offset for p in await store.read_since("bystander")] == [1, 2, 3]
    await store.append("rm", pub(1, "e2"), KEEP)
    assert await store.read_since("rm") == [pub(1, "e2")]


async def test_remove_through_a_position_keeps_what_came_after_it(store: Store) -> None:
    """remove(through=...) (another node removed the history at that position) drops the
    older epoch and the offsets up to it, written or queued, and keeps the later ones."""
    await store.append("rmt", pub(7, "old"), KEEP)
    for i in range(1, 4):
        await store.append("rmt", pub(i), KEEP)
    await written(store)
    await store.append("rmt", pub(4), KEEP)  # queued, up to the position
    await store.append("rmt", pub(5), KEEP)  # queued, after it
    await store.append("bystander", pub(1), KEEP)
    await store.remove("rmt", through=StreamPosition(4, "e1"))
    assert await store.read_since("rmt") == [pub(5)]
    await written(store)
    assert await store.read_since("rmt") == [pub(5)]
    assert await store.read_since("rmt", since=StreamPosition(0, "old")) == []
    assert await store.read_since("bystander") == [pub(1)]
    assert await store.latest("rmt") == StreamPosition(5, "e1")


async def test_status_reports_health_without_io(store: Store) -> None:
    """status() is ready after start and counts nothing queued once written."""
    await store.append("st", pub(1), KEEP)
    await written(store)
    status = store.status()
    assert status.ready
    assert status.queue_depth == 0
    assert status.error == ""
