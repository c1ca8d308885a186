"""``MongoStore`` beyond the shared contract: indexes, limits, and server faults.

The fault tests start their own FerretDB (``services.start_ferretdb``) so they
can kill it and bring it back on the same port and data directory; the rest
use the session's server (``mongo_url``). Documents are checked with a
separate ``AsyncMongoClient``, never through the store under test.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.uri_parser import parse_uri
from tornado.ioloop import IOLoop

from server.broker import Publication, StreamPosition
from server.errors import EngineError, StoreFullError, StoreRejectedError
from server.store import PersistOptions
from server.store_mongo import (
    EXPIRE_INDEX,
    HISTORY_INDEX,
    RECENT_INDEX,
    MongoStore,
    _recent_query,
    _top_query,
)
from tests.engines import eventually
from tests.engines.test_store_contract import mongo_config, pub
from tests.helpers import logs, services
from tests.helpers.server import TIME_FACTOR
from tests.helpers.stall_proxy import StallProxy

KEEP = PersistOptions()
EXPECTED_INDEXES = {
    "_id_": [("_id", 1)],
    HISTORY_INDEX: [("channel", 1), ("epoch", 1), ("offset", 1)],
    RECENT_INDEX: [("channel", 1), ("created_at", -1), ("offset", -1)],
    EXPIRE_INDEX: [("expire_at", 1)],
}

Factory = Callable[..., MongoStore]


# PyMongo 4.20's async driver leaks a socket when it cancels one of its own
# server monitors mid-connect (PYTHON-5867, fixed upstream by closing it), which
# an outage makes likely. The fault tests ignore exactly those leaks and collect
# garbage before they end, so the warning is raised in them, not a later test.
def tolerates_pymongo_socket_leak(test: Callable[..., Any]) -> Callable[..., Any]:
    for leaked in ("<socket.socket", "<function _SelectorTransport.__del__"):
        ignore = f"ignore:Exception ignored in. {leaked}:pytest.PytestUnraisableExceptionWarning"
        test = pytest.mark.filterwarnings(ignore)(test)
    return test


@pytest.fixture
def make_store(io_loop: IOLoop, mongo_url: str, unique_prefix: str) -> Iterator[Factory]:
    """Build (unstarted) stores on this test's database; every one is closed after the test."""
    made: list[MongoStore] = []

    def make(**overrides: Any) -> MongoStore:
        options: dict[str, Any] = {"url": mongo_url, "database": unique_prefix}
        options.update(overrides)
        url, database, driver = (
            options.pop("url"),
            options.pop("database"),
            options.pop("driver", "pymongo"),
        )
        store = MongoStore(mongo_config(url, database, driver, **options))
        made.append(store)
        return store

    yield make

    async def close_all() -> None:
        for store in made:
            await store.close()

    io_loop.run_sync(close_all)


def raw_client(url: str) -> AsyncMongoClient[dict[str, Any]]:
    return AsyncMongoClient(url, serverSelectionTimeoutMS=5000)


async def stored_offsets(url: str, database: str, channel: str) -> list[int]:
    """Offsets of the channel's documents as stored, sorted, duplicates kept."""
    client = raw_client(url)
    try:
        docs = await client[database]["publications"].find({"channel": channel}).to_list(None)
    finally:
        await client.close()
    return sorted(int(d["offset"]) for d in docs)


async def test_start_creates_indexes_idempotently(
    make_store: Factory, mongo_url: str, unique_prefix: str
) -> None:
    """Starting twice on one database leaves exactly the documented indexes."""
    first = make_store()
    await first.start()
    await first.close()
    second = make_store(driver="motor")
    await second.start()
    client = raw_client(mongo_url)
    try:
        indexes = await client[unique_prefix]["publications"].index_information()
    finally:
        await client.close()
    assert {name: spec["key"] for name, spec in indexes.items()} == EXPECTED_INDEXES
    assert indexes[HISTORY_INDEX].get("unique") is True
    if second.status().extra["ttl_index"]:
        assert indexes[EXPIRE_INDEX].get("expireAfterSeconds") == 0
    assert second.status().ready


def _stages(plan: Any) -> Iterator[dict[str, Any]]:
    """Every stage of a MongoDB explain plan tree."""
    if isinstance(plan, dict):
        if "stage" in plan:
            yield plan
        for value in plan.values():
            yield from _stages(value)
    elif isinstance(plan, list):
        for value in plan:
            yield from _stages(value)


async def test_history_query_uses_the_history_index(
    make_store: Factory, mongo_url: str, unique_prefix: str
) -> None:
    """The query behind history reads is served by the (channel, epoch, offset) index.

    On MongoDB (``SQUALL_MONGODB_URL``) the winning plan must be an IXSCAN of
    that index. FerretDB v1's SQLite backend pushes only ``_id`` equality
    down, so its explain shows a full SCAN whatever indexes exist; there the
    test checks that FerretDB reports the filter as not pushed down (if a
    future FerretDB pushes it down, this branch fails and must be tightened)
    and that the index the query needs exists with the right keys.
    """
    store = make_store()
    await store.start()
    for i in range(1, 50):
        await store.append("hist", pub(i), KEEP)
        await store.append("other", pub(i), KEEP)
    await eventually(_drained(store), within=5.0)
    plan = await store.explain_read("hist", StreamPosition(10, "e1"), limit=5)
    if "ferretdbVersion" in plan.get("serverInfo", {}):
        assert plan["filterPushdown"] is False
        assert any("SCAN" in line for line in plan["queryPlanner"]["Plan"])
        client = raw_client(mongo_url)
        try:
            indexes = await client[unique_prefix]["publications"].index_information()
        finally:
            await client.close()
        assert indexes[HISTORY_INDEX]["key"] == EXPECTED_INDEXES[HISTORY_INDEX]
    else:
        winning = plan["queryPlanner"]["winningPlan"]
        scans = [s for s in _stages(winning) if s["stage"] == "IXSCAN"]
        assert [s["indexName"] for s in scans] == [HISTORY_INDEX], winning
        assert not [s for s in _stages(winning) if s["stage"] == "COLLSCAN"], winning


@pytest.mark.parametrize(
    ("which", "index"),
    [("recent", RECENT_INDEX), ("top", HISTORY_INDEX)],
)
async def test_latest_queries_use_the_indexes(
    make_store: Factory, mongo_url: str, unique_prefix: str, which: str, index: str
) -> None:
    """The two queries behind ``latest`` (and size trimming) are index-served on MongoDB:
    the channel's most recently accepted document by ``channel_recent``, the top
    offset of an epoch by ``channel_epoch_offset``, without a sort stage or a scan of
    the collection. On FerretDB (no pushdown but ``_id``) the test only checks that the
    query still answers right (see the history index test)."""
    store = make_store()
    await store.start()
    for i in range(1, 30):
        await store.append("lq", pub(i, "a"), KEEP)
        await store.append("other", pub(i, "a"), KEEP)
    await eventually(_drained(store), within=5.0)
    query, projection, sort = _recent_query("lq") if which == "recent" else _top_query("lq", "a")
    client = raw_client(mongo_url)
    try:
        coll = client[unique_prefix]["publications"]
        found = await coll.find_one(query, projection, sort=sort)
        plan = await coll.find(query, projection, sort=sort, limit=1).explain()
    finally:
        await client.close()
    assert found is not None
    assert found["epoch" if which == "recent" else "offset"] == ("a" if which == "recent" else 29)
    if "ferretdbVersion" in plan.get("serverInfo", {}):
        return
    winning = plan["queryPlanner"]["winningPlan"]
    scans = [s for s in _stages(winning) if s["stage"] == "IXSCAN"]
    assert [s["indexName"] for s in scans] == [index], winning
    assert not [s for s in _stages(winning) if s["stage"] in ("COLLSCAN", "SORT")], winning


async def test_a_restarted_store_continues_after_the_highest_offset(
    make_store: Factory, mongo_url: str, unique_prefix: str
) -> None:
    """Publications written out of order, then a restart: latest is the highest offset, so
    the next publication gets a free offset and is stored (not taken for a duplicate)."""
    first = make_store()
    await first.start()
    await first.append("rs", pub(2), KEEP)
    await eventually(_drained(first), within=5.0)  # 1 is accepted later
    await first.append("rs", pub(1), KEEP)
    await first.close()
    second = make_store()
    await second.start()
    latest = await second.latest("rs")
    assert latest == StreamPosition(2, "e1")
    await second.append("rs", pub(latest.offset + 1), KEEP)
    await eventually(_drained(second), within=5.0)
    assert await stored_offsets(mongo_url, unique_prefix, "rs") == [1, 2, 3]
    assert await second.read_since("rs") == [pub(1), pub(2), pub(3)]


async def test_resume_skips_the_offsets_a_killed_process_may_have_handed_out(
    make_store: Factory,
) -> None:
    """A store started while the previous one of its node never closed (a killed process):
    streams it restores continue queue_size offsets past their stored top for each crash since
    their last stored publication; a clean close is no crash."""
    first = make_store(queue_size=10)
    await first.start()
    await first.append("k", pub(1), KEEP)
    await first.append("old", pub(5), KEEP)
    await eventually(_drained(first), within=5.0)
    # ``first`` stays open while the next store of its node starts: what SIGKILL leaves.
    second = make_store(queue_size=10)
    await second.start()
    assert await second.latest("k") == StreamPosition(1, "e1")
    assert await second.resume("k") == StreamPosition(11, "e1")
    assert await second.resume("none") is None
    await second.append("k", pub(12), KEEP)
    assert await second.resume("k") == StreamPosition(12, "e1")  # queued after the crash
    await eventually(_drained(second), within=5.0)
    assert await second.resume("k") == StreamPosition(12, "e1")  # written after it
    await second.close()
    third = make_store(queue_size=10)
    await third.start()
    assert await third.resume("k") == StreamPosition(12, "e1")
    assert await third.resume("old") == StreamPosition(15, "e1")  # untouched since the crash


async def test_an_old_process_closing_leaves_a_newer_ones_running_mark(
    make_store: Factory,
) -> None:
    """Two processes of one node overlapping (a rolling restart, replicas sharing the
    default name): the old one's clean close cleared the new one's running mark, so
    when the new one was then killed, the next start did not see the crash and handed
    out offsets already delivered. The close clears only its own start's mark."""
    old = make_store(queue_size=10)
    await old.start()
    new = make_store(queue_size=10)
    with logs.expect_log("squall.store.mongo", r"did not close \(killed\?\)"):
        await new.start()  # the old one still runs: taken for a crash, as before
    await new.append("k", pub(1), KEEP)
    await eventually(_drained(new), within=5.0)
    with logs.expect_log("squall.store.mongo", r"started again by another process"):
        await old.close()
    # ``new`` is killed now (never closed): the next start must see that crash
    with logs.expect_log("squall.store.mongo", r"did not close \(killed\?\)"):
        after = make_store(queue_size=10)
        await after.start()
    assert await after.resume("k") == StreamPosition(11, "e1")  # not 1: offsets after 1 were given


async def test_retention_pass_goes_on_when_remove_drops_a_channel_it_was_to_trim(
    make_store: Factory, mongo_url: str, unique_prefix: str
) -> None:
    """remove() of a channel while a retention pass trims another (the pass had listed
    both) neither fails the pass nor brings the removed channel back."""
    store = make_store(retention_interval=3600.0)  # the test drives the pass
    await store.start()
    sized = PersistOptions(size=1)
    for channel in ("a", "b", "c"):
        for i in range(1, 4):
            await store.append(channel, pub(i), sized)
    await eventually(_drained(store), within=5.0)
    trim = store._trim_channel

    async def trim_and_remove(coll: Any, channel: str, size: int) -> None:
        if channel == "a":
            await store.remove("b")  # while the pass is at "a", with "b" still to come
        await trim(coll, channel, size)

    store._trim_channel = trim_and_remove  # type: ignore[method-assign]
    await store._retention_pass()
    assert await stored_offsets(mongo_url, unique_prefix, "a") == [3]
    assert await stored_offsets(mongo_url, unique_prefix, "b") == []
    assert await stored_offsets(mongo_url, unique_prefix, "c") == [3]


def _drained(store: MongoStore) -> Callable[[], Any]:
    async def check() -> bool:
        return store.status().queue_depth == 0

    return check


async def test_oversize_or_invalid_publication_is_rejected_at_append(make_store: Factory) -> None:
    """A publication too large to store fails append with StoreRejectedError; nothing is queued."""
    store = make_store(max_document_bytes=1024)
    await store.start()
    big = Publication(1, "e1", b'"' + b"x" * 2000 + b'"')
    too_big = r"over the limit of 1024 \(mongodb.max_document_bytes\)"
    with pytest.raises(StoreRejectedError, match=too_big):
        await store.append("big", big, KEEP)
    with pytest.raises(StoreRejectedError, match="cannot be stored"):
        await store.append("big", Publication(2**64, "e1", b"{}"), KEEP)
    assert store.status().queue_depth == 0
    await store.append("big", pub(1), KEEP)
    assert await store.read_since("big") == [pub(1)]


async def test_full_queue_refuses_appends_and_close_writes_the_rest(
    make_store: Factory, mongo_url: str, unique_prefix: str
) -> None:
    """With queue_size publications waiting, append raises StoreFullError; close writes them."""
    store = make_store(queue_size=3, batch_size=100, flush_interval=60.0)
    await store.start()
    for i in range(1, 4):
        await store.append("full", pub(i), KEEP)
    with pytest.raises(StoreFullError, match="queue full"):
        await store.append("full", pub(4), KEEP)
    status = store.status()
    assert (status.queue_depth, status.queue_limit) == (3, 3)
    assert await store.read_since("full") == [pub(1), pub(2), pub(3)]
    assert await store.latest("full") == StreamPosition(3, "e1")
    await store.close()
    assert await stored_offsets(mongo_url, unique_prefix, "full") == [1, 2, 3]
    with pytest.raises(EngineError):
        await store.append("full", pub(5), KEEP)


async def test_expired_documents_are_deleted_in_the_background(
    make_store: Factory, mongo_url: str, unique_prefix: str
) -> None:
    """Without a TTL index (FerretDB) the store itself deletes expired documents."""
    store = make_store()
    await store.start()
    if store.status().extra["ttl_index"]:
        return  # the server's TTL monitor deletes them (checked in the index test)
    await store.append("exp", pub(1), PersistOptions(ttl=0.1))
    await store.append("exp", pub(2), KEEP)

    async def deleted() -> bool:
        return await stored_offsets(mongo_url, unique_prefix, "exp") == [2]

    await eventually(deleted, within=5.0)


@tolerates_pymongo_socket_leak
async def test_url_password_is_never_logged(make_store: Factory) -> None:
    """A failing start names the host but neither the error nor the logs carry the password."""
    port = services.free_port()  # nothing listens there
    store = make_store(url=f"mongodb://squall:s3cret-pw@127.0.0.1:{port}/", timeout=0.3)
    with pytest.raises(EngineError, match=f"127.0.0.1:{port}") as err:
        await store.start()
    assert "s3cret-pw" not in str(err.value)
    assert not logs.seen("squall.store.mongo", "trying again")  # unreachable: fails at once
    assert not logs.seen("", "s3cret-pw")  # any logger
    gc.collect()  # the monitor's socket to the dead port, if already unreferenced


@pytest.fixture
def stall_proxy(io_loop: IOLoop, mongo_url: str) -> Iterator[tuple[StallProxy, str]]:
    """A ``StallProxy`` in front of the test server, and the URL that goes through it.

    The proxy reads the requests, so TLS and ``mongodb+srv://`` URLs (TLS by default) do
    not go through it; with a replica set, the URL's first host must be the primary.
    """
    if mongo_url.startswith("mongodb+srv://"):
        services.unavailable("a mongodb+srv:// URL cannot be sent through a proxy")
    parsed = parse_uri(mongo_url)
    if parsed["options"].get("tls") or parsed["options"].get("ssl"):
        services.unavailable("a TLS MongoDB URL cannot be sent through a proxy")
    host, port = parsed["nodelist"][0]
    proxy = StallProxy(host, port)
    proxy_port = io_loop.run_sync(proxy.start)
    scheme, rest = mongo_url.split("://", 1)
    credentials, _, hosts_and_more = rest.rpartition("@")
    tail = hosts_and_more.partition("/")[2]
    path, _, query = tail.partition("?")
    query = "&".join(q for q in (query, "directConnection=true") if q)
    at = f"{credentials}@" if credentials else ""
    yield proxy, f"{scheme}://{at}127.0.0.1:{proxy_port}/{path}?{query}"
    io_loop.run_sync(proxy.close)


@pytest.mark.parametrize("driver", ["pymongo", "motor"])
@tolerates_pymongo_socket_leak  # the test before it (a dead port) may leak one here
async def test_start_tries_again_when_a_step_times_out_on_a_reachable_server(
    stall_proxy: tuple[StallProxy, str],
    make_store: Factory,
    mongo_url: str,
    unique_prefix: str,
    driver: str,
) -> None:
    """An index build answering later than ``mongodb.timeout`` (a busy server) no longer ends
    the start (it did, exit 1, on a loaded CI host): the step is tried again, logged."""
    proxy, url = stall_proxy
    proxy.stall_next(b"createIndexes", 2.5 * TIME_FACTOR)
    store = make_store(url=url, driver=driver, timeout=TIME_FACTOR, retry_delay=0.05)
    with logs.expect_log("squall.store.mongo", r"mongo store: start-up step failed \(attempt 1 of"):
        await store.start()
    assert proxy.stalled == 1
    assert store.status().ready
    client = raw_client(mongo_url)
    try:
        indexes = await client[unique_prefix]["publications"].index_information()
    finally:
        await client.close()
    assert set(indexes) == set(EXPECTED_INDEXES)


@tolerates_pymongo_socket_leak
async def test_a_retried_start_is_not_taken_for_a_crash_of_its_own_node(
    stall_proxy: tuple[StallProxy, str], make_store: Factory, mongo_url: str, unique_prefix: str
) -> None:
    """The marker write is applied but its answer comes too late: the step is tried again and
    finds the node marked running, by this very start. That is no crash (a crash would make
    every restored stream skip queue_size offsets)."""
    proxy, url = stall_proxy
    proxy.stall_next(b"\x02update\x00", 2.5 * TIME_FACTOR)  # the marker's upsert (first key)
    store = make_store(url=url, timeout=TIME_FACTOR, retry_delay=0.05, queue_size=10)
    await store.start()
    assert proxy.stalled == 1
    assert logs.seen("squall.store.mongo", r"start-up step failed")
    assert not logs.seen("squall.store.mongo", r"did not close")
    await store.append("k", pub(1), KEEP)
    await eventually(_drained(store), within=5.0)
    assert await store.resume("k") == StreamPosition(1, "e1")  # not 11
    client = raw_client(mongo_url)
    try:
        markers = await client[unique_prefix]["publications_writers"].find({}).to_list(None)
    finally:
        await client.close()
    assert [m.get("crashes") for m in markers] == [[]]


async def test_a_flusher_cancelled_inside_a_driver_call_that_swallows_it_still_ends(
    make_store: Factory,
) -> None:
    """The driver may turn the cancellation delivered inside its call into an error of its
    own. The flusher, which retries on errors, must end anyway: at a shutdown deadline
    asyncio.run cancels it and waits, and a flusher retrying for good kept the process
    from exiting (a CI run on a slow host). A real server cannot time this; a stand-in
    write does what the driver did."""
    store = make_store(shutdown_flush_timeout=0.2)
    await store.start()
    entered = asyncio.Event()

    async def write_that_swallows_cancel() -> None:
        entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("connection closed while cancelled") from None

    store._flush_batch = write_that_swallows_cancel  # type: ignore[method-assign]
    await store.append("c", pub(1), KEEP)
    await asyncio.wait_for(entered.wait(), 5.0)
    flusher = next(t for t in store._tasks if t.get_name() == "squall-mongo-flusher")
    with logs.expect_log("squall.store.mongo", r"flusher failed; retrying"):
        flusher.cancel()
        done, _ = await asyncio.wait([flusher], timeout=5.0)
    assert done, "the flusher is still running"
    assert flusher.cancelled()
    with logs.expect_log("squall.store.mongo", r"closed with 1 accepted publications not written"):
        await store.close()


@pytest.fixture
def ferretdb() -> Iterator[services.ServiceProcess]:
    """A FerretDB of this test's own, to kill and restart.

    Request it before ``make_store`` so the stores close while it still runs:
    PyMongo 4.20 leaks a socket (a ResourceWarning) when ``close()`` cancels a
    monitor that is connecting to a server that is shutting down.
    """
    try:
        svc = services.start_ferretdb()
    except RuntimeError as exc:
        services.unavailable(str(exc))
    yield svc
    svc.stop()
    gc.collect()  # see tolerates_pymongo_socket_leak


@pytest.mark.parametrize("driver", ["pymongo", "motor"])
@tolerates_pymongo_socket_leak
async def test_outage_queues_writes_and_recovery_drains_them_once(
    driver: str, ferretdb: services.ServiceProcess, make_store: Factory, unique_prefix: str
) -> None:
    """Killed mid-stream, the server comes back and gets every accepted publication exactly once."""
    url = f"mongodb://127.0.0.1:{ferretdb.port}/"
    store = make_store(
        url=url,
        driver=driver,
        batch_size=5,
        timeout=0.5,
        retry_delay=0.05,
        retry_max_delay=0.3,
        ping_interval=0.1,
    )
    await store.start()
    total = 0

    async def publish(upto: int) -> None:
        nonlocal total
        for i in range(total + 1, upto + 1):
            await store.append("fault", pub(i), KEEP)
            await store.append("bystander", pub(i), KEEP)
        total = upto

    async def down() -> bool:
        return not store.status().ready

    async def recovered() -> bool:
        status = store.status()
        return status.ready and status.queue_depth == 0

    await publish(10)
    await eventually(_drained(store), within=5.0)
    await publish(15)  # these may be in flight when the server dies
    with logs.expect_log("squall.store.mongo", r"unavailable; publications stay queued"):
        ferretdb.kill()
        await publish(30)
        await eventually(down, within=10.0)
    status = store.status()
    assert status.queue_depth > 0
    assert status.error
    await publish(40)  # still accepted while the server is away
    with pytest.raises(EngineError, match="unavailable"):  # history reads need the server
        await store.read_since("fault", since=StreamPosition(35, "e1"))
    with logs.expect_log("squall.store.mongo", r"recovered after .* queue_depth="):
        ferretdb.start()
        await eventually(recovered, within=20.0)
    await publish(45)
    # A FerretDB just restarted on a busy host can miss the 0.5 s timeout once
    # more (the store then retries as after any outage): not what is under test.
    await eventually(_drained(store), within=20.0)
    expected = list(range(1, 46))
    assert await stored_offsets(url, unique_prefix, "fault") == expected
    assert await stored_offsets(url, unique_prefix, "bystander") == expected
    assert await store.read_since("fault") == [pub(i) for i in expected]


@tolerates_pymongo_socket_leak
async def test_with_the_health_ping_off_a_read_outage_ends_without_a_write(
    ferretdb: services.ServiceProcess, make_store: Factory
) -> None:
    """mongodb.ping_interval 0: a history read that failed marked the store down, and
    with nothing queued no write would mark it up again: /ready stayed 503 for good
    after the server was back. The idle flusher checks every retry_max_delay instead."""
    store = make_store(
        url=f"mongodb://127.0.0.1:{ferretdb.port}/",
        timeout=0.5,
        retry_delay=0.05,
        retry_max_delay=0.3,
        ping_interval=0,
    )
    await store.start()

    async def ready() -> bool:
        return store.status().ready

    with logs.expect_log("squall.store.mongo", r"unavailable"):
        ferretdb.kill()
        with pytest.raises(EngineError, match="unavailable"):
            await store.read_since("fault", since=StreamPosition(1, "e1"))
        assert not await ready()
    with logs.expect_log("squall.store.mongo", r"recovered after"):
        ferretdb.start()
        await eventually(ready, within=20.0)
    assert store.status().queue_depth == 0  # no write brought it back


@tolerates_pymongo_socket_leak
async def test_close_during_outage_reports_what_was_not_written(
    ferretdb: services.ServiceProcess, make_store: Factory
) -> None:
    """Closing while the server is down gives up after the flush deadline and logs the count."""
    store = make_store(
        url=f"mongodb://127.0.0.1:{ferretdb.port}/",
        timeout=1.0,  # for start (a busy host's FerretDB missed 0.2 s); refused at once once killed
        retry_delay=0.05,
        shutdown_flush_timeout=0.3,
    )
    await store.start()
    ferretdb.kill()
    for i in range(1, 4):
        await store.append("lost", pub(i), KEEP)
    with logs.expect_log("squall.store.mongo", r"closed with 3 accepted publications not written"):
        await store.close()
    assert store.status().ready is False


@tolerates_pymongo_socket_leak
async def test_close_cuts_a_retry_backoff_short_and_writes_the_queue(
    ferretdb: services.ServiceProcess, make_store: Factory, unique_prefix: str
) -> None:
    """close() right after the server came back, while the flusher sleeps a long retry
    backoff: the flusher retries at once, and the queue is written within the deadline."""
    url = f"mongodb://127.0.0.1:{ferretdb.port}/"
    store = make_store(
        url=url,
        timeout=2.0,  # 0.5 s failed every reconnect of a starved CI host for 10 s
        retry_delay=60.0,  # the first retry would come 30 to 60 s later
        retry_max_delay=60.0,
        shutdown_flush_timeout=10.0,
    )
    await store.start()

    async def retrying() -> bool:
        return int(store.status().extra["write_retries"]) >= 1

    with logs.expect_log("squall.store.mongo", r"unavailable; publications stay queued"):
        ferretdb.kill()
        for i in range(1, 6):
            await store.append("back", pub(i), KEEP)
        await eventually(retrying, within=10.0)  # failed once: now in its backoff
    ferretdb.start()
    started = time.monotonic()
    await store.close()
    assert time.monotonic() - started < 10.0  # not the deadline: written
    assert store.status().queue_depth == 0
    assert await stored_offsets(url, unique_prefix, "back") == [1, 2, 3, 4, 5]
