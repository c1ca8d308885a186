"""``MongoTelemetryStore`` beyond the shared contract: chunk bounds, a flusher that
survives what it does not expect, shutdown during a retry backoff, sealing races, and
device documents.

Stored documents are checked with a separate ``AsyncMongoClient``. The fault tests
start their own FerretDB (``services.start_ferretdb``) so they can kill it and bring
it back; the rest use the session's server (``mongo_url``).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from bson.errors import InvalidDocument
from pymongo import AsyncMongoClient
from tornado.ioloop import IOLoop

from server.config import TelemetryConfig
from server.telemetry_mongo import (
    CHUNK_BUCKET_INDEX,
    CHUNK_INDEX,
    MAX_CHUNK_CELLS,
    MongoTelemetryStore,
    chunk_runs,
)
from server.telemetry_store import MS_PER_DAY, Point, device_metric_limit
from tests.engines import eventually
from tests.engines.test_store_contract import mongo_config
from tests.engines.test_store_mongo import ferretdb, stall_proxy, tolerates_pymongo_socket_leak
from tests.engines.test_telemetry_store_contract import (
    BUCKET_MS,
    CFG,
    T0,
    chunk_points,
    stored,
    written,
)
from tests.helpers import logs, services
from tests.helpers.server import TIME_FACTOR
from tests.helpers.stall_proxy import StallProxy

__all__ = ["ferretdb", "stall_proxy"]  # fixtures of test_store_mongo, used here too

Factory = Callable[..., MongoTelemetryStore]


@pytest.fixture
def make_store(io_loop: IOLoop, mongo_url: str, unique_prefix: str) -> Iterator[Factory]:
    """Build (unstarted) stores on this test's database; every one is closed after the test.

    Keyword arguments go to ``TelemetryConfig`` (``cfg`` replaces it whole), those
    starting with ``mongo_`` to ``MongoConfig`` (``mongo_url``, ``mongo_timeout``...).
    """
    made: list[MongoTelemetryStore] = []

    def make(cfg: TelemetryConfig = CFG, **overrides: Any) -> MongoTelemetryStore:
        mongo = {k.removeprefix("mongo_"): v for k, v in overrides.items() if k[:6] == "mongo_"}
        url = mongo.pop("url", mongo_url)
        options = {k: v for k, v in overrides.items() if k[:6] != "mongo_"}
        store = MongoTelemetryStore(
            mongo_config(url, unique_prefix, "pymongo", **mongo),
            dataclasses.replace(cfg, **options),
        )
        made.append(store)
        return store

    yield make

    async def close_all() -> None:
        for store in made:
            await store.close()

    io_loop.run_sync(close_all)


def wide_points(count: int, metrics: int = 64) -> list[Point]:
    """``count`` points of ``metrics`` metrics each, no two points sharing a name."""
    return [Point(T0 + i, {f"m{i}_{j}": float(j) for j in range(metrics)}) for i in range(count)]


def test_chunk_runs_bound_cells_and_depend_only_on_the_points() -> None:
    """Runs keep the points in ts order, each within MAX_CHUNK_CELLS cells (points x
    distinct metrics), and the same points give the same runs in whatever order they
    come (so a batch sent again makes the same chunk ids). A point never splits."""
    points = wide_points(300)
    runs = chunk_runs(points)
    shuffled = points[:]
    random.Random(5).shuffle(shuffled)
    assert chunk_runs(shuffled) == runs
    assert [p for run in runs for p in run] == points
    for run in runs:
        columns = {m for p in run for m in p.values}
        assert len(run) * len(columns) <= MAX_CHUNK_CELLS
    narrow = [Point(T0 + i, {"a": 1.0, "b": 2.0}) for i in range(1000)]
    assert chunk_runs(narrow) == [narrow]  # the usual case: one chunk
    huge = Point(T0, {f"k{j}": 1.0 for j in range(MAX_CHUNK_CELLS + 1)})
    assert chunk_runs([huge, Point(T0 + 1, {"k0": 2.0})]) == [[huge], [Point(T0 + 1, {"k0": 2.0})]]


def test_chunk_runs_are_greedy_around_the_bound() -> None:
    """Near the cell bound, in both the one-chunk fast path and the cutting loop, each
    run is as long as the bound allows: it could not take the next point."""
    rng = random.Random(11)
    for _ in range(200):
        count = rng.randint(1, 120)
        names = [f"m{j}" for j in range(rng.randint(1, 80))]
        points = [
            Point(T0 + i, {m: 1.0 for m in rng.sample(names, rng.randint(1, len(names)))})
            for i in range(count)
        ]
        runs = chunk_runs(points)
        assert [p for run in runs for p in run] == points

        def cells(run: list[Point]) -> int:
            return len(run) * len({m for p in run for m in p.values})

        for i, run in enumerate(runs):
            assert len(run) == 1 or cells(run) <= MAX_CHUNK_CELLS
            if i + 1 < len(runs):
                assert cells([*run, runs[i + 1][0]]) > MAX_CHUNK_CELLS
        assert (len(runs) == 1) == (cells(points) <= MAX_CHUNK_CELLS)


async def test_a_wide_frame_is_stored_in_bounded_chunks_and_a_resent_batch_adds_nothing(
    make_store: Factory, mongo_url: str, unique_prefix: str
) -> None:
    """The chunks of a frame of many distinct metrics stay within the cell bound, hold
    every point once, and the same batch sent again hits the duplicate key chunk by chunk
    (nothing new is stored)."""
    store = make_store()
    await store.start()
    points = wide_points(200)
    await store.add("wide", points, T0)
    await written(store, within=60.0)
    chunks = await stored(mongo_url, unique_prefix, CFG.points_collection)
    assert len(chunks) > 1
    assert all(c["n"] * len(c["v"]) <= MAX_CHUNK_CELLS for c in chunks)
    assert chunk_points(chunks) == [("wide", p.ts) for p in points]
    await store.add("wide", points[::-1], T0)  # written already: queued and sent again
    await written(store, within=60.0)
    again = await stored(mongo_url, unique_prefix, CFG.points_collection)
    assert sorted(c["_id"] for c in again) == sorted(c["_id"] for c in chunks)
    assert store.status().extra["points_refused"] == 0


async def test_the_flusher_drops_only_a_write_that_fails_unexpectedly_and_goes_on(
    make_store: Factory, mongo_url: str, unique_prefix: str
) -> None:
    """An insert failing with an unexpected error (here bson's InvalidDocument, as for a
    document too large to send) is retried in smaller writes until the failing point is
    alone; that point is dropped, logged at ERROR, and everything else is written."""
    store = make_store(batch_size=8, mongo_retry_delay=0.01, mongo_retry_max_delay=0.05)
    real_insert = store._insert

    async def insert(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if any(doc["d"] == "poison" for doc in docs):
            raise InvalidDocument("cannot encode (injected)")
        return await real_insert(docs)

    store._insert = insert  # type: ignore[method-assign]
    await store.start()
    with (
        logs.expect_log("squall.telemetry.mongo", r"write failed; retrying with writes"),
        logs.expect_log("squall.telemetry.mongo", r"at its smallest; dropped points=1"),
    ):
        await store.add("good-1", [Point(T0 + i, {"v": 1.0}) for i in range(5)], T0)
        await store.add("poison", [Point(T0, {"v": 2.0})], T0)
        await store.add("good-2", [Point(T0 + i, {"v": 3.0}) for i in range(5)], T0)
        await written(store)
    await store.add("good-3", [Point(T0, {"v": 4.0})], T0)  # the flusher still writes
    await written(store)
    status = store.status()
    assert status.ready
    assert status.extra["points_refused"] == 1
    assert status.extra["points_written"] == 11
    assert int(status.extra["write_failures"]) >= 1
    chunks = await stored(mongo_url, unique_prefix, CFG.points_collection)
    assert chunk_points(chunks) == sorted(
        [("good-1", T0 + i) for i in range(5)]
        + [("good-2", T0 + i) for i in range(5)]
        + [("good-3", T0)]
    )
    assert await store.query("poison", "v", T0, T0 + BUCKET_MS, BUCKET_MS) == []


async def test_start_tries_again_when_an_index_build_answers_late(
    stall_proxy: tuple[StallProxy, str], make_store: Factory, mongo_url: str, unique_prefix: str
) -> None:
    """An index build answering later than ``mongodb.timeout`` (a busy server) is tried again
    instead of ending the start ("cannot create indexes", exit 1, on a loaded CI host)."""
    proxy, url = stall_proxy
    proxy.stall_next(b"createIndexes", 2.5 * TIME_FACTOR)
    store = make_store(mongo_url=url, mongo_timeout=TIME_FACTOR, mongo_retry_delay=0.05)
    with logs.expect_log("squall.store.mongo", r"telemetry store: start-up step failed"):
        await store.start()
    assert proxy.stalled == 1
    await store.add("dev", [Point(T0, {"t": 1.0})], T0)
    await written(store)
    chunks = await stored(mongo_url, unique_prefix, CFG.points_collection)
    assert chunk_points(chunks) == [("dev", T0)]
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_url, serverSelectionTimeoutMS=5000
    )
    try:
        indexes = await client[unique_prefix][CFG.points_collection].index_information()
    finally:
        await client.close()
    assert set(indexes) == {"_id_", CHUNK_INDEX, CHUNK_BUCKET_INDEX}


async def test_status_reports_a_flusher_that_stopped(make_store: Factory) -> None:
    """Should the flusher die all the same (here a bug injected outside its error
    handling), the store says so: not ready, the task named, logged at ERROR; close()
    still works."""
    store = make_store(mongo_shutdown_flush_timeout=0.2)

    def broken(dirty: list[str]) -> float:
        raise RuntimeError("injected bug")

    store._device_wait = broken  # type: ignore[method-assign]
    await store.start()

    async def stopped() -> bool:
        # The flusher's own report: not just "not ready", which a slow health ping on
        # a busy host can also give for a moment.
        status = store.status()
        return not status.ready and "squall-telemetry-flusher stopped" in (status.error or "")

    with logs.expect_log(
        "squall.telemetry.mongo", r"background task squall-telemetry-flusher stopped"
    ):
        await store.add("d", [Point(T0, {"v": 1.0})], T0)
        await written(store)
        await store.add("d", [Point(T0 + 1, {"v": 1.0})], T0)  # the device write must wait
        await eventually(stopped, within=5.0)
    status = store.status()
    assert "squall-telemetry-flusher stopped (RuntimeError: injected bug)" in status.error
    await store.close()


@tolerates_pymongo_socket_leak
async def test_close_cuts_a_retry_backoff_short_and_writes_the_queue(
    ferretdb: services.ServiceProcess, make_store: Factory, unique_prefix: str
) -> None:
    """close() right after the server came back, while the flusher sleeps a long retry
    backoff: the flusher retries at once, and the points are written within the deadline."""
    url = f"mongodb://127.0.0.1:{ferretdb.port}/"
    store = make_store(
        mongo_url=url,
        mongo_timeout=0.5,
        mongo_retry_delay=60.0,  # the first retry would come 30 to 60 s later
        mongo_retry_max_delay=60.0,
        mongo_shutdown_flush_timeout=10.0,
    )
    await store.start()

    async def down() -> bool:
        return not store.status().ready

    with logs.expect_log("squall.telemetry.mongo", r"unavailable; points stay queued"):
        ferretdb.kill()
        await store.add("d", [Point(T0 + i, {"v": float(i)}) for i in range(5)], T0)
        await eventually(down, within=10.0)  # failed once: now in its backoff
    ferretdb.start()
    started = time.monotonic()
    await store.close()
    assert time.monotonic() - started < 10.0  # not the deadline: written
    assert store.status().queue_depth == 0
    chunks = await stored(url, unique_prefix, CFG.points_collection)
    assert chunk_points(chunks) == [("d", T0 + i) for i in range(5)]


async def test_a_summary_read_while_its_bucket_is_written_again_is_not_stored(
    make_store: Factory, mongo_url: str, unique_prefix: str
) -> None:
    """Points written into a bucket while a sealing pass reads its chunks: that pass
    stores no summary (it would miss them and queries would undercount), the next one
    seals the bucket whole."""
    store = make_store()
    await store.start()
    window = ("d", "v", T0, T0 + BUCKET_MS, BUCKET_MS)
    await store.add("d", [Point(T0 + i, {"v": 1.0}) for i in range(3)], T0)
    await written(store)
    summarize = store._summarize

    async def summarize_then_write(device: str, b: int) -> dict[str, Any] | None:
        summary = await summarize(device, b)
        await store.add("d", [Point(T0 + 5, {"v": 9.0})], T0)
        await written(store)  # in the bucket, after its chunks were read
        return summary

    store._summarize = summarize_then_write  # type: ignore[method-assign]
    assert await store.seal(T0 + MS_PER_DAY) == 0
    assert [(s.count, s.max) for s in await store.query(*window)] == [(4, 9.0)]
    store._summarize = summarize  # type: ignore[method-assign]
    assert await store.seal(T0 + MS_PER_DAY) == 1
    assert [(s.count, s.max) for s in await store.query(*window)] == [(4, 9.0)]
    [bucket] = await stored(mongo_url, unique_prefix, CFG.collection)
    assert bucket["n"] == 4


async def test_a_bucket_with_too_many_metrics_is_not_summarized(
    make_store: Factory, mongo_url: str, unique_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bucket with more than SUMMARY_METRICS metrics stays unsealed (a warning), and
    queries over it stay exact."""
    monkeypatch.setattr("server.telemetry_mongo.SUMMARY_METRICS", 2)
    store = make_store()
    await store.start()
    await store.add("d", [Point(T0, {"a": 1.0, "b": 2.0, "c": 3.0})], T0)
    await written(store)
    with logs.expect_log("squall.telemetry.mongo", r"too many metrics to summarize.*metrics=3"):
        assert await store.seal(T0 + MS_PER_DAY) == 0
    assert store.status().extra["buckets_unsealed"] == 0  # not tried again
    assert await stored(mongo_url, unique_prefix, CFG.collection) == []
    [s] = await store.query("d", "c", T0, T0 + BUCKET_MS, BUCKET_MS)
    assert (s.count, s.avg) == (1, 3.0)


async def test_a_point_sent_again_after_a_restart_keeps_the_stored_last_value(
    make_store: Factory, mongo_url: str, unique_prefix: str
) -> None:
    """A restarted store does not know which points were written: a point sent again
    with another value still leaves the stored last value (seen first) as it was."""
    first = make_store()
    await first.start()
    await first.add("d", [Point(T0 + 5, {"a": 1.0})], T0)
    await first.close()
    second = make_store()
    await second.start()
    await second.add("d", [Point(T0 + 5, {"a": 9.0})], T0 + 1)
    [dev] = await second.devices()
    assert dev.last_values == {"a": 1.0}
    assert dev.last_seen == T0 + 1
    await second.close()
    [device] = await stored(mongo_url, unique_prefix, CFG.devices_collection)
    assert device["last"] == {"a": {"v": 1.0, "t": T0 + 5}}
    assert device["last_seen"] == T0 + 1


async def test_the_device_document_holds_the_newest_metrics_only(
    make_store: Factory, mongo_url: str, unique_prefix: str
) -> None:
    """The stored device document keeps the last values of at most device_metric_limit
    metrics: forgotten ones are unset, and a restarted store reads the same."""
    store = make_store(device_write_interval=0.0)
    await store.start()
    limit = device_metric_limit(CFG)
    await store.add("d", [Point(T0 + i, {f"x{i}": float(i)}) for i in range(limit + 10)], T0)
    kept = {f"x{i}" for i in range(10, limit + 10)}

    async def stored_metrics() -> set[str]:
        docs = await stored(mongo_url, unique_prefix, CFG.devices_collection)
        return set(docs[0]["last"]) if docs else set()

    async def holds(expected: set[str]) -> bool:
        return await stored_metrics() == expected

    await eventually(lambda: holds(kept), within=10.0)
    await store.add("d", [Point(T0 + 5000, {"x0": -1.0})], T0)  # newest: x10 is forgotten
    kept = (kept - {"x10"}) | {"x0"}
    await eventually(lambda: holds(kept), within=10.0)
    await store.close()
    again = make_store()
    await again.start()
    [dev] = await again.devices()
    assert set(dev.last_values) == kept
