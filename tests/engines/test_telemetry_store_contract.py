"""The ``TelemetryStore`` contract, run against every implementation.

One suite over the ``tstore`` fixture: ``MemoryTelemetryStore``, and
``MongoTelemetryStore`` through PyMongo's ``AsyncMongoClient`` and through
Motor, each on its own database of the session's MongoDB-compatible server
(FerretDB unless ``SQUALL_MONGODB_URL`` says otherwise).

The Mongo store writes behind and summarizes closed buckets later, so the
tests read up to three times: right after ``add`` (the points are still
queued; ``add`` never yields to the flusher), once ``status().queue_depth`` is
0 (they come from the points collection), and after ``seal`` (whole buckets
come from their summaries). The
expected aggregates are computed here from the raw points, independently of
``Downsampler``. Mongo-only tests at the end check the stored documents and
a restart.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from server.config import TelemetryConfig
from server.errors import EngineError
from server.telemetry_memory import MemoryTelemetryStore
from server.telemetry_mongo import MongoTelemetryStore, chunk_id
from server.telemetry_store import (
    MS_PER_DAY,
    Point,
    StepStats,
    TelemetryStore,
    device_metric_limit,
    exact_sum,
)
from tests.engines import eventually
from tests.engines.test_store_contract import mongo_config
from tests.helpers import logs

BUCKET_MS = 10_000
T0 = 1_700_000_000_000  # a multiple of BUCKET_MS
CFG = TelemetryConfig(bucket_seconds=BUCKET_MS / 1000, retention_days=1, flush_interval=0.01)


def make_store(kind: str, url: str, database: str, cfg: TelemetryConfig = CFG) -> TelemetryStore:
    if kind == "memory":
        return MemoryTelemetryStore(cfg)
    return MongoTelemetryStore(mongo_config(url, database, kind.removeprefix("mongo-")), cfg)


@pytest.fixture(params=["memory", "mongo-pymongo", "mongo-motor"])
def tstore(request: pytest.FixtureRequest, io_loop, unique_prefix: str) -> Iterator[TelemetryStore]:
    """A started telemetry store of one kind on a database no other test uses."""
    url = "" if request.param == "memory" else request.getfixturevalue("mongo_url")
    store = make_store(request.param, url, unique_prefix)
    io_loop.run_sync(store.start)
    yield store
    io_loop.run_sync(store.close)


async def written(store: TelemetryStore, *, within: float = 5.0) -> None:
    """Wait until nothing is queued (a no-op for the memory store)."""

    async def drained() -> bool:
        return store.status().queue_depth == 0

    await eventually(drained, within=within)


def expected(points: list[tuple[int, float]], start: int, end: int, step: int) -> list[StepStats]:
    """Reference downsampling straight from the raw points (avg: the exact mean, rounded once)."""
    steps: dict[int, list[float]] = {}
    for ts, value in points:
        if start <= ts < end:
            steps.setdefault(ts // step * step, []).append(value)
    return [
        StepStats(t, min(vs), max(vs), float(sum(map(Fraction, vs)) / len(vs)), len(vs))
        for t, vs in sorted(steps.items())
    ]


def approx(stats: list[StepStats]) -> list[Any]:
    return [(s.t, s.min, s.max, pytest.approx(s.avg), s.count) for s in stats]


def flat(stats: list[StepStats]) -> list[Any]:
    return [(s.t, s.min, s.max, s.avg, s.count) for s in stats]


async def read_each_way(
    store: TelemetryStore, query: tuple[Any, ...], want: list[StepStats], *, exactly: bool = False
) -> None:
    """The same answer while queued, once written, and once the buckets are sealed."""
    same = flat(want) if exactly else approx(want)
    assert flat(await store.query(*query)) == same
    await written(store)
    assert flat(await store.query(*query)) == same
    await store.seal(T0 + MS_PER_DAY)  # every bucket of these tests is closed by then
    assert flat(await store.query(*query)) == same


def series(n: int, *, every: int = 700, seed: int = 7) -> list[Point]:
    rng = random.Random(seed)
    return [
        Point(T0 + i * every, {"temp": round(rng.uniform(-5, 30), 2), "hum": float(i % 7)})
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("start", "end", "step"),
    [
        (T0, T0 + 70_000, 10_000),  # step = bucket: every bucket whole
        (T0, T0 + 70_000, 30_000),  # several buckets per step, one straddles
        (T0, T0 + 70_000, 20_000),  # buckets aligned inside steps
        (T0, T0 + 70_000, 3_000),  # steps smaller than buckets: raw points
        (T0 + 4_321, T0 + 55_555, 10_000),  # edges cut buckets
        (T0 - 50_000, T0 + 200_000, 60_000),  # range wider than the data
    ],
)
async def test_query_min_max_avg_per_step_are_exact(tstore: TelemetryStore, start, end, step):
    """Per-step min, max, avg and count match the raw points: queued, written and sealed."""
    points = series(100)
    await tstore.add("dev-1", points, T0)
    raw = [(p.ts, p.values["temp"]) for p in points]
    await read_each_way(
        tstore, ("dev-1", "temp", start, end, step), expected(raw, start, end, step)
    )


async def test_points_added_in_several_frames_and_out_of_order_aggregate_together(
    tstore: TelemetryStore,
):
    """Frames of one device, in any order and across buckets, form one series."""
    points = series(60, every=900)
    shuffled = points[:]
    random.Random(3).shuffle(shuffled)
    for i in range(0, len(shuffled), 7):
        await tstore.add("dev-1", shuffled[i : i + 7], T0)
    raw = [(p.ts, p.values["hum"]) for p in points]
    await read_each_way(
        tstore, ("dev-1", "hum", T0, T0 + 60_000, 5_000), expected(raw, T0, T0 + 60_000, 5_000)
    )


async def test_points_added_after_a_query_are_in_the_next_answer(tstore: TelemetryStore):
    """A query in between frames does not freeze what later queries see: steps of whole
    buckets (answered from summaries) count the points added after it."""
    points = series(60, every=900)
    query = ("dev-1", "temp", T0, T0 + 60_000, 20_000)
    await tstore.add("dev-1", points[::2], T0)
    first = [(p.ts, p.values["temp"]) for p in points[::2]]
    assert flat(await tstore.query(*query)) == approx(expected(first, T0, T0 + 60_000, 20_000))
    await tstore.add("dev-1", points[1::2], T0)
    raw = [(p.ts, p.values["temp"]) for p in points]
    await read_each_way(tstore, query, expected(raw, T0, T0 + 60_000, 20_000))


@pytest.mark.parametrize(
    ("start", "end", "step"),
    [
        (T0, T0 + 30_000, 10_000),  # step = bucket: summaries once sealed
        (T0, T0 + 30_000, 30_000),  # several summaries merged into one step
        (T0 + 1_234, T0 + 29_000, 3_000),  # raw points
    ],
)
async def test_avg_is_the_exact_mean_whatever_the_order_the_points_came_in(
    tstore: TelemetryStore, start, end, step
):
    """avg is the exact mean rounded once, so every store answers alike to the last
    digit, queued, written and sealed (float sums in arrival order, chunk order or from
    summaries differed there), and a sum past the float range does not make it inf."""
    rng = random.Random(11)
    points = [
        Point(T0 + i * 97, {"v": round(rng.uniform(-50, 50), 1), "big": 1.7e308})
        for i in range(300)
    ]
    shuffled = points[:]
    rng.shuffle(shuffled)
    for i in range(0, len(shuffled), 13):
        await tstore.add("dev-1", shuffled[i : i + 13], T0)
    for metric in ("v", "big"):
        raw = [(p.ts, p.values[metric]) for p in points]
        want = expected(raw, start, end, step)
        await read_each_way(tstore, ("dev-1", metric, start, end, step), want, exactly=True)


async def test_retried_points_are_stored_once(tstore: TelemetryStore):
    """Adding the same (device, ts) again, queued or already written, changes nothing."""
    points = series(30)
    query = ("dev-1", "temp", T0, T0 + 30_000, 10_000)
    raw = [(p.ts, p.values["temp"]) for p in points]
    want = expected(raw, T0, T0 + 30_000, 10_000)
    await tstore.add("dev-1", points, T0)
    await tstore.add("dev-1", points, T0)  # retried while still queued
    await read_each_way(tstore, query, want)
    await tstore.add("dev-1", points, T0)  # retried after it was written
    await tstore.add("dev-1", points[5:15], T0)
    await read_each_way(tstore, query, want)
    assert sum(s.count for s in await tstore.query(*query)) == 30


async def test_a_retry_mixing_stored_and_new_points_stores_only_the_new_ones(
    tstore: TelemetryStore,
):
    """A batch overlapping what is stored adds exactly its new points (same bucket)."""
    first = [Point(T0 + i, {"v": float(i)}) for i in range(0, 10)]
    overlap = [Point(T0 + i, {"v": 100.0 + i}) for i in range(5, 15)]  # 5..9 already stored
    await tstore.add("dev-1", first, T0)
    await written(tstore)
    await tstore.add("dev-1", overlap, T0)
    await written(tstore)
    [step] = await tstore.query("dev-1", "v", T0, T0 + BUCKET_MS, BUCKET_MS)
    values = [float(i) for i in range(10)] + [100.0 + i for i in range(10, 15)]
    assert (step.count, step.min, step.max) == (15, 0.0, 114.0)
    assert step.avg == pytest.approx(sum(values) / 15)


async def test_devices_are_kept_apart(tstore: TelemetryStore):
    """Points of one device never show up in another's series."""
    await tstore.add("a", [Point(T0, {"v": 1.0})], T0)
    await tstore.add("b", [Point(T0, {"v": 5.0}), Point(T0 + 1, {"v": 7.0})], T0)
    await written(tstore)
    [a] = await tstore.query("a", "v", T0, T0 + 1000, 1000)
    [b] = await tstore.query("b", "v", T0, T0 + 1000, 1000)
    assert (a.count, a.avg) == (1, 1.0)
    assert (b.count, b.avg) == (2, 6.0)
    assert await tstore.query("nobody", "v", T0, T0 + 1000, 1000) == []
    assert await tstore.query("a", "other", T0, T0 + 1000, 1000) == []


async def test_metric_names_with_dots_and_dashes_round_trip(tstore: TelemetryStore):
    """Metric names keep their dots (they are not nested fields)."""
    await tstore.add("d", [Point(T0, {"signal.rssi": -60.0, "a-b_c.d": 1.5})], T0 + 5)
    for _ in range(2):
        [s] = await tstore.query("d", "signal.rssi", T0, T0 + 1, 1)
        assert s.avg == -60.0
        [dev] = await tstore.devices()
        assert dev.last_values == {"signal.rssi": -60.0, "a-b_c.d": 1.5}
        await written(tstore)


async def test_devices_report_last_seen_and_newest_value_per_metric(tstore: TelemetryStore):
    """last_seen is the latest frame's server time; a late old point never wins."""
    await tstore.add("d", [Point(T0 + 2000, {"temp": 20.0, "hum": 40.0})], T0 + 2100)
    await tstore.add("d", [Point(T0 + 1000, {"temp": 10.0, "volt": 3.3})], T0 + 2200)
    await tstore.add("d", [Point(T0 + 3000, {"hum": 45.0})], T0 + 2000)
    for _ in range(2):
        [dev] = await tstore.devices()
        assert dev.id == "d"
        assert dev.last_seen == T0 + 2200
        assert dev.last_values == {"temp": 20.0, "hum": 45.0, "volt": 3.3}
        await written(tstore)


async def test_a_point_sent_again_keeps_the_last_values_of_its_first_copy(
    tstore: TelemetryStore,
):
    """A (device, ts) sent again with other values, while queued or once written, changes
    no last value the first copy set, nor any query. The one exception, in both stores
    alike: a metric only the copy carries becomes a last value if it is the newest."""
    await tstore.add("d", [Point(T0 + 5, {"a": 1.0})], T0 + 10)
    await tstore.add("d", [Point(T0 + 5, {"a": 7.0})], T0 + 11)  # may still be queued
    await written(tstore)
    await tstore.add("d", [Point(T0 + 5, {"a": 9.0, "b": 2.0})], T0 + 12)  # written by now
    await tstore.add("d", [Point(T0 + 4, {"b": 3.0})], T0 + 12)  # older than b's last value
    for _ in range(2):
        [dev] = await tstore.devices()
        assert dev.last_values == {"a": 1.0, "b": 2.0}
        assert dev.last_seen == T0 + 12
        [a] = await tstore.query("d", "a", T0, T0 + BUCKET_MS, BUCKET_MS)
        assert (a.count, a.min, a.max) == (1, 1.0, 1.0)
        [b] = await tstore.query("d", "b", T0, T0 + BUCKET_MS, BUCKET_MS)
        assert (b.count, b.min, b.max) == (1, 3.0, 3.0)  # only the point at T0 + 4 counts
        await written(tstore)


async def test_a_frame_of_many_points_with_many_distinct_metrics_is_stored_completely(
    tstore: TelemetryStore,
):
    """A valid but extreme frame (300 points of 64 metrics each, all different: 19 200
    metrics) is stored and readable, and a normal point sent after it is written too.
    (As one MongoDB chunk it would be some 26 MB, over the server's 16 MB.)"""
    wide = [Point(T0 + i, {f"m{i}_{j}": float(j) for j in range(64)}) for i in range(300)]
    await tstore.add("wide", wide, T0)
    await written(tstore, within=60.0)
    await tstore.add("calm", [Point(T0 + 1, {"temp": 20.0})], T0)
    await written(tstore)
    window = (T0, T0 + BUCKET_MS, BUCKET_MS)
    for i, j in [(0, 0), (151, 17), (299, 63)]:
        [s] = await tstore.query("wide", f"m{i}_{j}", *window)
        assert (s.t, s.min, s.max, s.count) == (T0, float(j), float(j), 1)
    with logs.expect_log("squall.telemetry", "too many metrics to summarize", required=False):
        await tstore.seal(T0 + MS_PER_DAY)  # too wide to summarize in MongoDB: stays exact
    [s] = await tstore.query("wide", "m299_0", *window)
    assert (s.min, s.count) == (0.0, 1)
    [calm] = await tstore.query("calm", "temp", *window)
    assert (calm.count, calm.avg) == (1, 20.0)
    status = tstore.status()
    assert status.ready
    assert status.queue_depth == 0
    devices = {d.id: d for d in await tstore.devices()}
    # Only the newest metrics' last values are kept: those of the last four points.
    assert set(devices["wide"].last_values) == {
        f"m{i}_{j}" for i in range(296, 300) for j in range(64)
    }
    assert devices["calm"].last_values == {"temp": 20.0}


async def test_a_device_keeps_the_last_values_of_its_newest_metrics_only(
    tstore: TelemetryStore,
):
    """A device sending ever new metric names keeps the last values of at most
    ``device_metric_limit`` metrics: those whose newest point is the newest."""
    limit = device_metric_limit(CFG)
    await tstore.add("many", [Point(T0 + i, {f"x{i}": float(i)}) for i in range(limit + 10)], T0)
    kept = {f"x{i}": float(i) for i in range(10, limit + 10)}
    for _ in range(2):
        [dev] = await tstore.devices()
        assert dev.last_values == kept
        await written(tstore)
    await tstore.add("many", [Point(T0 - 1, {"x5": -5.0})], T0)  # older than all kept
    await tstore.add("many", [Point(T0 + 5000, {"x0": -1.0})], T0)  # newest: x10 goes
    del kept["x10"]
    kept["x0"] = -1.0
    for _ in range(2):
        [dev] = await tstore.devices()
        assert dev.last_values == kept
        await written(tstore)
    stats = await tstore.query("many", "x5", T0 - BUCKET_MS, T0 + BUCKET_MS, BUCKET_MS)
    assert [(s.count, s.min) for s in stats] == [(1, -5.0), (1, 5.0)]  # points are all kept


async def test_retention_drops_old_buckets_and_silent_devices(tstore: TelemetryStore):
    """retain(now) deletes buckets older than retention_days and devices not seen since."""
    await tstore.add("old", [Point(T0, {"v": 1.0})], T0)
    await tstore.add("new", [Point(T0, {"v": 1.0})], T0)
    await tstore.add("new", [Point(T0 + MS_PER_DAY, {"v": 2.0})], T0 + MS_PER_DAY)
    await written(tstore)
    deleted = await tstore.retain(T0 + MS_PER_DAY + BUCKET_MS)
    assert deleted == 2  # the first bucket of each device
    assert [d.id for d in await tstore.devices()] == ["new"]
    day = (T0, T0 + 2 * MS_PER_DAY, MS_PER_DAY)
    assert [s.count for s in await tstore.query("new", "v", *day)] == [1]
    assert await tstore.query("old", "v", *day) == []


async def test_retention_keeps_points_of_a_forgotten_device(tstore: TelemetryStore):
    """A point's ts may lie after the frame's server time (up to max_skew), so its
    bucket can outlive the device: retention forgets the device but keeps those points
    until their bucket expires (the memory store dropped them with the device)."""
    ahead = T0 + 3 * BUCKET_MS  # sent at T0 by a device whose clock runs ahead
    await tstore.add("ahead", [Point(T0, {"v": 1.0}), Point(ahead, {"v": 2.0})], T0)
    await written(tstore)
    assert await tstore.retain(T0 + MS_PER_DAY + BUCKET_MS) == 1  # the bucket of T0
    assert await tstore.devices() == []  # not seen for a day
    day = (T0, T0 + 2 * MS_PER_DAY, MS_PER_DAY)
    assert [(s.count, s.max) for s in await tstore.query("ahead", "v", *day)] == [(1, 2.0)]
    await tstore.add("ahead", [Point(ahead + 1, {"w": 3.0})], T0 + MS_PER_DAY + BUCKET_MS)
    await written(tstore)
    [dev] = await tstore.devices()  # seen again: listed with the values sent since
    assert dev.last_values == {"w": 3.0}
    assert await tstore.retain(T0 + MS_PER_DAY + 4 * BUCKET_MS) == 1
    assert [s.count for s in await tstore.query("ahead", "v", *day)] == []


async def test_status_reports_ready(tstore: TelemetryStore):
    """A started store is ready, and drains its queue to zero."""
    await tstore.add("d", series(5), T0)
    await written(tstore)
    status = tstore.status()
    assert status.ready
    assert status.queue_depth == 0


# --------------------------------------------------------------------- Mongo only


@pytest.fixture(params=["pymongo", "motor"])
def mongo_kind(request: pytest.FixtureRequest) -> str:
    return f"mongo-{request.param}"


async def stored(url: str, database: str, collection: str) -> list[dict[str, Any]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url, serverSelectionTimeoutMS=5000)
    try:
        return await client[database][collection].find({}, sort=[("_id", 1)]).to_list(None)
    finally:
        await client.close()


def chunk_points(chunks: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """Every stored ``(device, ts)``, as often as it is stored."""
    return sorted((c["d"], ts) for c in chunks for ts in c["ts"])


async def test_mongo_stores_points_in_chunks_and_counts_each_once(
    mongo_url, unique_prefix, mongo_kind
):
    """One chunk per device and bucket per write, with a column per metric (null where a
    point lacks it); a chunk sent again adds nothing, a point sent again in another chunk
    counts once everywhere; sealing writes one exact summary per device and bucket; the
    device document holds last seen and last values."""
    store = make_store(mongo_kind, mongo_url, unique_prefix)
    await store.start()
    query = ("dev/1", "t.c", T0, T0 + 2 * BUCKET_MS, 5000)
    try:
        points = [Point(T0 + i * 2500, {"t.c": float(i)}) for i in range(6)]  # 2 buckets
        points[1] = Point(T0 + 2500, {"t.c": 1.0, "x": 7.0})
        points[2] = Point(T0 + 5000, {"x": 8.0})  # no t.c
        await store.add("dev/1", points[::-1], T0 + 99)
        await store.add("dev/1", points[:3], T0 + 99)  # a retry while queued: not queued again
        await written(store)
        assert await stored(mongo_url, unique_prefix, CFG.collection) == []  # not sealed yet
        chunks = await stored(mongo_url, unique_prefix, CFG.points_collection)
        assert len(chunks) == 2
        first = next(c for c in chunks if c["b"] == T0)
        written_at = first.pop("w")
        assert abs(written_at - time.time() * 1000) < 60_000
        assert first == {
            "_id": chunk_id("dev/1", T0, [T0, T0 + 2500, T0 + 5000, T0 + 7500]),
            "d": "dev/1",
            "b": T0,
            "n": 4,
            "ts": [T0, T0 + 2500, T0 + 5000, T0 + 7500],
            "v": {"t:c": [0.0, 1.0, None, 3.0], "x": [None, 7.0, 8.0, None]},
        }
        want = [(T0, 0.0, 1.0, 0.5, 2), (T0 + 5000, 3.0, 3.0, 3.0, 1)]
        want += [(T0 + BUCKET_MS, 4.0, 5.0, 4.5, 2)]
        assert flat(await store.query(*query)) == want
        # Sent again once written: the second bucket's chunk as it was (the same _id:
        # nothing new), and three points of the first bucket in a chunk of their own.
        await store.add("dev/1", points[4:], T0 + 99)
        await store.add("dev/1", points[:3], T0 + 99)
        await written(store)
        chunks = await stored(mongo_url, unique_prefix, CFG.points_collection)
        assert len(chunks) == 3
        assert chunk_points(chunks).count(("dev/1", T0)) == 2  # stored twice ...
        assert flat(await store.query(*query)) == want  # ... counted once
        # A bucket is sealed once it cannot take points on time any more.
        closes = T0 + BUCKET_MS + int((CFG.max_skew + 60) * 1000)
        assert await store.seal(closes - 1) == 0
        assert await store.seal(closes) == 1
        assert await store.seal(T0 + MS_PER_DAY) == 1
        assert await store.seal(T0 + MS_PER_DAY) == 0  # nothing new to seal
    finally:
        await store.close()
    buckets = await stored(mongo_url, unique_prefix, CFG.collection)
    assert buckets == [
        {
            "_id": f"dev/1/{T0}",
            "device": "dev/1",
            "start": T0,
            "end": T0 + BUCKET_MS,
            "n": 4,
            "s": {
                "t:c": {"min": 0.0, "max": 3.0, "sum": 4.0, "p": [4.0], "n": 3},
                "x": {"min": 7.0, "max": 8.0, "sum": 15.0, "p": [15.0], "n": 2},
            },
        },
        {
            "_id": f"dev/1/{T0 + BUCKET_MS}",
            "device": "dev/1",
            "start": T0 + BUCKET_MS,
            "end": T0 + 2 * BUCKET_MS,
            "n": 2,
            "s": {"t:c": {"min": 4.0, "max": 5.0, "sum": 9.0, "p": [9.0], "n": 2}},
        },
    ]
    [device] = await stored(mongo_url, unique_prefix, CFG.devices_collection)
    assert device == {
        "_id": "dev/1",
        "last_seen": T0 + 99,
        "last": {"t:c": {"v": 5.0, "t": T0 + 12500}, "x": {"v": 8.0, "t": T0 + 5000}},
    }


async def test_mongo_points_arriving_after_sealing_reopen_the_bucket(
    mongo_url, unique_prefix, mongo_kind
):
    """A point written into a sealed bucket (queued through an outage) counts at once, and
    the next sealing pass writes the bigger summary; retention removes points and summaries."""
    store = make_store(mongo_kind, mongo_url, unique_prefix)
    await store.start()
    query = ("d", "v", T0, T0 + BUCKET_MS, BUCKET_MS)
    try:
        await store.add("d", [Point(T0 + i, {"v": float(i)}) for i in range(4)], T0)
        await written(store)
        assert await store.seal(T0 + MS_PER_DAY) == 1
        assert [(s.count, s.max) for s in await store.query(*query)] == [(4, 3.0)]
        await store.add("d", [Point(T0 + 9, {"v": 90.0}), Point(T0 + 2, {"v": 2.0})], T0)
        assert [(s.count, s.max) for s in await store.query(*query)] == [(5, 90.0)]  # queued
        await written(store)
        assert [(s.count, s.max) for s in await store.query(*query)] == [(5, 90.0)]  # points
        assert await store.seal(T0 + MS_PER_DAY) == 1
        assert [(s.count, s.max) for s in await store.query(*query)] == [(5, 90.0)]  # summary
        [bucket] = await stored(mongo_url, unique_prefix, CFG.collection)
        assert (bucket["n"], bucket["s"]["v"]["sum"]) == (5, 96.0)
        assert await store.retain(T0 + 2 * MS_PER_DAY) == 1
        assert await stored(mongo_url, unique_prefix, CFG.collection) == []
        assert await stored(mongo_url, unique_prefix, CFG.points_collection) == []
    finally:
        await store.close()


async def test_mongo_a_step_of_a_bucket_and_a_half_reads_its_points_in_few_queries(
    mongo_url, unique_prefix, mongo_kind
):
    """A step that is not a whole number of buckets (the default step rarely is) leaves
    every other bucket read from its points: one find per such stretch made a query of
    300 steps take a minute on FerretDB (a collection scan each). Now a few finds read
    them all, and the answer is the same."""
    store = make_store(mongo_kind, mongo_url, unique_prefix)
    assert isinstance(store, MongoTelemetryStore)
    buckets = 20
    points = [Point(T0 + i * BUCKET_MS + 7 * i, {"v": float(i)}) for i in range(buckets)]
    query = ("d", "v", T0, T0 + buckets * BUCKET_MS, BUCKET_MS * 3 // 2)
    want = expected([(p.ts, p.values["v"]) for p in points], *query[2:])
    await store.start()
    try:
        await store.add("d", points, T0)
        await written(store)
        await store.seal(T0 + MS_PER_DAY)  # (the sealing task may have sealed some)
        real_run = store._run
        reads: list[Any] = []

        async def run(op: Any, keep: type[Exception] | None = None) -> Any:
            reads.append(op)
            return await real_run(op, keep)

        store._run = run  # type: ignore[method-assign]
        assert await store.query(*query) == want
        assert len(reads) <= 3  # the summaries, then the points (were 1 + 6 finds)
    finally:
        await store.close()


async def test_mongo_a_sum_past_the_float_range_is_sealed_and_read_back_exactly(
    mongo_url, unique_prefix, mongo_kind
):
    """A bucket whose sum passes the float range is summarized like any other: its
    summary used to hold sum: inf, which FerretDB refuses, so every sealing pass failed
    there and no bucket after it was ever sealed."""
    store = make_store(mongo_kind, mongo_url, unique_prefix)
    await store.start()
    try:
        await store.add("big", [Point(T0, {"v": 1.7e308}), Point(T0 + 1, {"v": 1.7e308})], T0)
        await store.add("small", [Point(T0 + 5, {"v": 0.1}), Point(T0 + 6, {"v": 0.2})], T0)
        await written(store)
        assert await store.seal(T0 + MS_PER_DAY) == 2
        big, small = await stored(mongo_url, unique_prefix, CFG.collection)
        assert big["s"]["v"]["sum"] == sys.float_info.max  # rounded, but finite
        assert sum(map(exact_sum, big["s"]["v"]["p"])) == 2 * exact_sum(1.7e308)
        assert small["s"]["v"]["p"] == [0.30000000000000004, -2.7755575615628914e-17]
        [b] = await store.query("big", "v", T0, T0 + BUCKET_MS, BUCKET_MS)
        assert (b.count, b.avg) == (2, 1.7e308)
        [s] = await store.query("small", "v", T0, T0 + BUCKET_MS, BUCKET_MS)
        assert (s.count, s.avg) == (2, float((Fraction(0.1) + Fraction(0.2)) / 2))
    finally:
        await store.close()


async def test_mongo_two_nodes_writing_one_bucket_seal_the_complete_summary(
    mongo_url, unique_prefix, mongo_kind
):
    """Two stores on one database (two Squall nodes) write overlapping points of a device
    into the same bucket; each point counts once and whichever seals last, the summary
    covers both."""
    one = make_store(mongo_kind, mongo_url, unique_prefix)
    two = make_store(mongo_kind, mongo_url, unique_prefix)
    await one.start()
    await two.start()
    try:
        await one.add("d", [Point(T0 + i, {"v": 1.0}) for i in range(0, 6)], T0)
        await written(one)
        assert await one.seal(T0 + MS_PER_DAY) == 1  # sees only its own points
        await two.add("d", [Point(T0 + i, {"v": 2.0}) for i in range(3, 10)], T0)  # 3..5 retried
        await written(two)
        assert await two.seal(T0 + MS_PER_DAY) == 1
        assert await one.seal(T0 + MS_PER_DAY) == 0
        for store in (one, two):
            [s] = await store.query("d", "v", T0, T0 + BUCKET_MS, BUCKET_MS)
            assert (s.count, s.min, s.max) == (10, 1.0, 2.0)
            assert s.avg == pytest.approx((6 * 1.0 + 4 * 2.0) / 10)
    finally:
        await one.close()
        await two.close()
    [bucket] = await stored(mongo_url, unique_prefix, CFG.collection)
    assert bucket["n"] == 10


async def test_mongo_close_flushes_and_a_new_store_reads_everything_back(
    mongo_url, unique_prefix, mongo_kind
):
    """Points queued at close are written; a restarted store serves them and merges devices."""
    slow = TelemetryConfig(bucket_seconds=BUCKET_MS / 1000, flush_interval=60.0, batch_size=100_000)
    store = make_store(mongo_kind, mongo_url, unique_prefix, slow)
    await store.start()
    points = series(40)
    await store.add("d", points, T0 + 1)
    assert store.status().queue_depth == 40  # still queued: the flush interval is long
    await store.close()
    again = make_store(mongo_kind, mongo_url, unique_prefix, slow)
    await again.start()
    try:
        raw = [(p.ts, p.values["temp"]) for p in points]
        query = ("d", "temp", T0, T0 + 40_000, 10_000)
        assert flat(await again.query(*query)) == approx(expected(raw, *query[2:]))
        # A new point with an older ts must not replace the stored last value.
        await again.add("d", [Point(T0 - 1, {"temp": -99.0})], T0 + 2)
        [dev] = await again.devices()
        assert dev.last_values["temp"] == points[-1].values["temp"]
        assert dev.last_seen == T0 + 2
    finally:
        await again.close()
    [device] = await stored(mongo_url, unique_prefix, CFG.devices_collection)
    assert device["last"]["temp"]["v"] == points[-1].values["temp"]


async def test_mongo_halves_writes_after_a_timeout_and_stores_every_point_once(
    mongo_url, unique_prefix
):
    """An insert carries at most ``batch_size`` points and a write at most
    ``max_device_updates`` device updates; after a write times out (the server may still
    be applying it) the store sends half as much, then grows back, and every point still
    ends up stored exactly once."""
    from pymongo.errors import NetworkTimeout

    cfg = dataclasses.replace(CFG, batch_size=8, max_device_updates=4, device_write_interval=0)
    store = make_store("mongo-pymongo", mongo_url, unique_prefix, cfg)
    assert isinstance(store, MongoTelemetryStore)
    sizes: list[int] = []
    device_sizes: list[int] = []
    real_insert, real_update = store._insert, store._update
    timeouts = [1]  # the first insert times out once, after the server applied it

    async def insert(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sizes.append(sum(doc["n"] for doc in docs))  # points, in chunks
        errors = await real_insert(docs)
        if timeouts:
            timeouts.pop()
            raise NetworkTimeout("timed out (injected)")
        return errors

    async def update(collection: str, updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
        device_sizes.append(len(updates))
        return await real_update(collection, updates)

    store._insert = insert  # type: ignore[method-assign]
    store._update = update  # type: ignore[method-assign]
    await store.start()
    try:
        for d in range(10):  # 10 devices x 4 points, all queued before the first write
            await store.add(f"d{d}", [Point(T0 + i * 5000, {"v": float(d)}) for i in range(4)], T0)
        await written(store)
    finally:
        await store.close()
    assert sizes[0] == 8  # at most batch_size in one insert
    assert sizes[1] == 4  # halved after the timeout (the same points, sent again)
    assert max(sizes) <= 8
    assert max(sizes[2:]) > 4  # grown back after successful writes
    assert 0 < max(device_sizes) <= 4  # device documents are bounded too
    chunks = await stored(mongo_url, unique_prefix, cfg.points_collection)
    assert chunk_points(chunks) == sorted(
        (f"d{d}", T0 + i * 5000) for d in range(10) for i in range(4)
    )  # every point once (the halved retry resent whole chunks: same ids), none lost
    devices = await stored(mongo_url, unique_prefix, cfg.devices_collection)
    assert sorted(d["_id"] for d in devices) == sorted(f"d{d}" for d in range(10))


async def test_mongo_refuses_to_start_on_points_of_the_old_layout(mongo_url, unique_prefix):
    """A points collection written by a version storing one document per point is not
    read silently as empty: the store refuses to start and says what to do."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url)
    try:
        old = {"_id": f"d/{T0}", "d": "d", "t": T0, "v": {"v": 1.0}}
        await client[unique_prefix][CFG.points_collection].insert_one(old)
    finally:
        await client.close()
    store = make_store("mongo-pymongo", mongo_url, unique_prefix)
    with pytest.raises(EngineError, match="one-document-per-point layout") as err:
        await store.start()
    assert "telemetry.points_collection" in str(err.value)
    assert not store.status().ready
    other = make_store(
        "mongo-pymongo",
        mongo_url,
        unique_prefix,
        dataclasses.replace(CFG, points_collection="telemetry_chunks"),
    )
    await other.start()  # a new collection beside the old one
    try:
        await other.add("d", [Point(T0, {"v": 2.0})], T0)
        await written(other)
        [s] = await other.query("d", "v", T0, T0 + BUCKET_MS, BUCKET_MS)
        assert (s.count, s.max) == (1, 2.0)
    finally:
        await other.close()


async def test_memory_queries_for_metrics_no_point_carries_keep_nothing():
    """A closed bucket kept a summary for every metric name a query asked about, absent
    ones too, until retention dropped it: a dashboard asking for new names grew the
    process without bound (31 MiB per 100 queries over a week of buckets). Only the
    metrics the points carry are remembered now, and answers stay the same."""
    store = MemoryTelemetryStore(CFG)
    points = series(200)  # 14 buckets
    await store.add("d1", points, T0)
    query = ("d1", "temp", T0, T0 + 200 * 700, 60_000)
    want = await store.query(*query)
    temps = [(p.ts, p.values["temp"]) for p in points]
    assert flat(want) == approx(expected(temps, *query[2:]))
    for i in range(50):
        assert await store.query("d1", f"absent{i}", T0, T0 + 200 * 700, 60_000) == []
    buckets = store._devices["d1"].buckets.values()
    assert {name for b in buckets for name in b.stats} == {"temp"}
    assert flat(await store.query(*query)) == flat(want)
