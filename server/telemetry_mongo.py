"""``MongoTelemetryStore``: telemetry in MongoDB (or FerretDB v1), written behind, insert-only.

Reuses ``store_mongo``'s driver adapter (``AsyncMongoClient`` by default, Motor
with ``mongodb.driver: motor``), backoff and URL redaction; it opens its own
client (connection pool) from the same ``mongodb`` settings.

Documents
    Collection ``telemetry.points_collection`` holds the points, the source of
    truth, in *chunks*: the points of one device in one bucket that one write
    carried, in ``ts`` order, with one array per metric (``null`` where a point
    lacks that metric). A chunk is cut short at ``MAX_CHUNK_CELLS`` points x
    metric columns (or about ``MAX_CHUNK_BYTES``): points with many different
    metrics would otherwise make one document too large for the server
    (``chunk_runs``)::

        {_id: "<device>/<bucket start>/<first ts>/<digest>", d: str, b: int64,
         w: int64,                                 # write time (ms), orders duplicates
         n: int, ts: [int64, ...], v: {<metric key>: [double | null, ...]}}

    ``digest`` is a hash of the chunk's ``ts`` list. Collection
    ``telemetry.collection``, one *summary* per device per bucket, written
    once the bucket is closed (see Sealing)::

        {_id: "<device>/<bucket start ms>", device: str, start: int64, end: int64,
         n: int,                                   # points in the bucket
         s: {<metric key>: {min: double, max: double, sum: double, n: int,
                            p: [double, ...]}}}   # doubles adding up to the exact sum

    Collection ``telemetry.devices_collection``::

        {_id: "<device>", last_seen: int64, last: {<metric key>: {v: double, t: int64}}}

    Metric names may contain ``.``, which field names may not (FerretDB
    refuses them); a *metric key* is the name with ``.`` written as ``:``
    (a character metric names cannot contain, so the mapping is reversible).
    Device ids may contain ``/``: ids are split from the right.

Why chunks, and only inserts
    Inserts are what every MongoDB-compatible server does fast: on FerretDB v1
    (SQLite) an update or a delete by ``_id`` costs time in proportion to the
    collection's size (about 20 ms at 2 000 documents), so the first layout
    (one read-modify-write upsert per bucket per flush) persisted about 60
    points/s there. One document per point then took about 10 000 points/s
    on one core of FerretDB, most of it per-document cost; chunks of ten
    points take about 58 000. On MongoDB chunks also mean fewer, smaller
    documents and index entries.

Each point counts once
    A point sent again (a device retrying a frame, a batch sent again after a
    lost acknowledgement, another node) must not count twice. A chunk whose
    ``ts`` list was stored already has the same ``_id``, and the insert's
    duplicate key means "already stored"; that covers a batch sent again
    whole (the cut into chunks depends only on the points, so the same points
    make the same chunks). A point that comes back in a chunk of other points
    is stored a second time, and every read (queries, summaries) counts each
    ``(device, ts)`` once, with the values of the chunk written first (lowest
    ``w``, then ``_id``: every node picks the same). Points still queued here
    are never queued twice.

Write path
    ``add`` queues points (bounded by ``telemetry.queue_size`` points;
    ``StoreFullError`` beyond) and updates an in-memory device cache. One
    flusher task takes up to ``telemetry.batch_size`` points once that many
    wait or the oldest has waited ``telemetry.flush_interval`` and inserts them
    as chunks, unordered (both servers go on after a duplicate and report every
    error). A duplicate chunk counts as stored; a chunk the server refuses
    outright is dropped with its points and logged at ERROR, as in
    ``MongoStore``. Any other driver failure keeps the batch queued, marks
    the store not ready and retries with capped, jittered backoff; ``close``
    cuts a backoff short and retries until its deadline. A write that times
    out may still be running on the server, and the same amount of work would
    time out again: batches (and device updates per write) shrink by half, and
    grow back by a quarter after each write that succeeds. An unexpected
    error (a bug, or a document the driver will not send) is logged at ERROR
    and shrinks writes the same way until the failing write is as small as it
    gets; that one is then dropped (``_flush_failed``): the flusher never
    stops, and one bad point costs itself, not the node's telemetry.

    Device documents are upserted: ``$max`` of ``last_seen``, ``$set`` of the
    last values the cache holds, ``$unset`` of those it forgot (beyond
    ``device_metric_limit``, see ``telemetry_store``). The cache merges the
    last values per metric by ``ts``, keeping the value seen first at an
    equal ``ts``; the first time this process writes a device it reads the
    stored document and merges it in, the stored value winning an equal
    ``ts`` (it was seen first). They are written at
    most every ``telemetry.device_write_interval`` per device and
    ``telemetry.max_device_updates`` per write, devices taking turns, and only
    while no backlog of points waits (or at close), always after the points in
    the same task: on FerretDB v1 an update next to an insert on another
    connection can hang both for good. Two nodes
    ingesting for the same device at the same time may briefly overwrite each
    other's last values; points and summaries are exact.

Sealing
    A bucket can receive points (on time) until ``max_skew`` after its end: the
    hub refuses older ones. ``SEAL_GRACE`` later, the node that wrote points
    into it reads the bucket's chunks back and writes its summary: an insert,
    or, when a summary is there already, a replace only if it counts fewer
    points (points are never removed but by retention, so more is newer; two
    nodes sealing the same bucket end with the complete summary). Points that
    reach the server later than that (queued through an outage) first delete
    the bucket's summary, then are inserted, and the bucket is sealed again.
    A summary read while the bucket was written again is not stored (the
    next pass seals it), and a bucket of more than ``SUMMARY_METRICS``
    metrics is not summarized at all (too slow to write for what it saves).
    Sealing is an optimisation: a bucket without a summary is answered from
    its points. Buckets a node wrote but could not seal before it stopped stay
    that way (exact, slower to query).

Read path
    ``query`` reads the per-metric summaries of the buckets in range
    (projection ``s.<key>``) and uses those of buckets wholly inside one step
    with no points still queued here; for every other stretch of the range it
    reads the chunks of its buckets (projection ``ts``, ``v.<key>``, ``w``),
    counts each ``ts`` once and merges the queued points by ``ts``. ``devices``
    merges the collection with the cache.

Retention
    A background pass every ``telemetry.retention_interval`` deletes the chunks
    and summaries of buckets whose end is older than ``retention_days``, and
    devices not seen for that long (no TTL indexes: FerretDB v1 has none), in
    chunks of ``RETAIN_CHUNK`` ids (FerretDB v1 fails one command deleting more
    than about 32 000 documents). On FerretDB v1 only ``_id`` equality is pushed
    down to SQLite, so range queries, sealing and retention scan a collection;
    the indexes serve MongoDB.
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from bson.errors import InvalidDocument

from server.backoff import Availability, Backoff, raise_if_cancelling
from server.config import MongoConfig, TelemetryConfig
from server.errors import ConfigError, EngineError, StoreFullError
from server.store import StoreStatus
from server.store_mongo import (
    DUPLICATE_KEY_CODES,
    _Client,
    _hosts,
    _password,
    _report_death,
    _stopped_task,
    _wait,
    check_url,
    start_steps,
)
from server.telemetry_store import (
    DeviceState,
    Downsampler,
    MetricStats,
    Point,
    StepStats,
    TelemetryStore,
    bucket_range,
    bucket_start,
    device_metric_limit,
    exact_sum,
    keep_newest,
    retention_cutoff,
    sum_parts,
)

log = logging.getLogger("squall.telemetry.mongo")

CHUNK_INDEX: Final = "device_bucket"
CHUNK_BUCKET_INDEX: Final = "bucket"
BUCKET_INDEX: Final = "device_start"
END_INDEX: Final = "end"
SEEN_INDEX: Final = "last_seen"
SEAL_GRACE: Final = 60.0  # seconds after a bucket stops taking points (end + max_skew) to seal it
MAX_UNSEALED: Final = 100_000  # buckets remembered for sealing; the oldest are forgotten beyond
RETAIN_CHUNK: Final = 1000  # ids per retention delete
MIN_WRITE_FACTOR: Final = 1 / 1024  # smallest share of batch_size/max_device_updates per write
MAX_CHUNK_CELLS: Final = 4096  # points x metric columns in one chunk (values and nulls)
MAX_CHUNK_BYTES: Final = 1 << 20  # estimated BSON size of one chunk (the server allows 16 MiB)
CELL_BYTES: Final = 16  # BSON array element, at most: type, index (<= 5 digits + NUL), 8 bytes
COLUMN_BYTES: Final = 8  # BSON per column besides its name: type, NUL, array length and end
MAX_SKIPPED: Final = 1000  # summarized buckets one chunk query skips ($nin) between stretches
SUMMARY_METRICS: Final = 2048  # metrics of a bucket past which it is not summarized (stays exact)


def metric_key(metric: str) -> str:
    """Field name for a metric (``.`` is not allowed in field names)."""
    return metric.replace(".", ":")


def metric_name(key: str) -> str:
    return key.replace(":", ".")


def bucket_id(device: str, start: int) -> str:
    return f"{device}/{start}"


def chunk_id(device: str, b: int, ts: Sequence[int]) -> str:
    """The id of the chunk of ``device`` in bucket ``b`` holding exactly ``ts`` (ascending)."""
    digest = hashlib.blake2b(array.array("q", ts).tobytes(), digest_size=8).hexdigest()
    return f"{device}/{b}/{ts[0]}/{digest}"


def chunk_bucket(cid: str) -> tuple[str, int]:
    """(device, bucket start) of a chunk id (device ids may contain ``/``)."""
    device, b, _, _ = cid.rsplit("/", 3)
    return device, int(b)


def chunk_runs(points: Sequence[Point]) -> list[list[Point]]:
    """``points`` (one device and bucket, distinct ``ts``) in ``ts`` order, cut into the
    runs stored as one chunk each.

    A chunk has a column per metric any of its points carries, each as long as
    the chunk, so its size is its points times its distinct metrics: one valid
    frame (1000 points of 64 metrics, all different) would make a chunk of
    64 million cells, far over the server's 16 MiB and seconds of encoding.
    A run ends before the point that would take its chunk past
    ``MAX_CHUNK_CELLS`` cells or about ``MAX_CHUNK_BYTES``; a point is never
    split (one alone may exceed them). The cut depends only on the points, so
    the same points always make the same chunks, with the same ``_id``: a batch
    sent again is a duplicate key chunk by chunk.
    """
    ordered = sorted(points, key=lambda p: p.ts)
    # The usual case first: all of them fit in one chunk. Both bounds only grow
    # as a run grows, so this is exactly when the loop below would not cut.
    columns = set().union(*(p.values for p in ordered))
    size = len(ordered)
    if size * len(columns) <= MAX_CHUNK_CELLS:
        names = sum(len(metric_key(m).encode()) + COLUMN_BYTES for m in columns)
        if names + size * (len(columns) + 1) * CELL_BYTES <= MAX_CHUNK_BYTES:
            return [ordered]
    runs: list[list[Point]] = []
    run: list[Point] = []
    columns = set()
    names = 0  # bytes of the run's column names, with their overhead
    for point in ordered:
        new = [m for m in point.values if m not in columns]
        width = len(columns) + len(new)
        extra = sum(len(metric_key(m).encode()) + COLUMN_BYTES for m in new) if new else 0
        size = len(run) + 1
        if run and (
            size * width > MAX_CHUNK_CELLS
            or names + extra + size * (width + 1) * CELL_BYTES > MAX_CHUNK_BYTES
        ):
            runs.append(run)
            run, columns, names = [], set(), 0
            new = list(point.values)
            extra = sum(len(metric_key(m).encode()) + COLUMN_BYTES for m in new)
        run.append(point)
        columns.update(new)
        names += extra
    if run:
        runs.append(run)
    return runs


def chunk_doc(device: str, b: int, points: Sequence[Point], written: int) -> dict[str, Any]:
    """The chunk document of ``points`` (one device, bucket ``b``, distinct ``ts``; one
    run of ``chunk_runs``)."""
    ordered = sorted(points, key=lambda p: p.ts)
    ts = [p.ts for p in ordered]
    values: dict[str, list[float | None]] = {}
    for i, point in enumerate(ordered):
        for metric, value in point.values.items():
            column = values.get(metric)
            if column is None:
                column = values[metric] = [None] * len(ordered)
            column[i] = value
    return {
        "_id": chunk_id(device, b, ts),
        "d": device,
        "b": b,
        "w": written,
        "n": len(ts),
        "ts": ts,
        "v": {metric_key(m): column for m, column in values.items()},
    }


def chunk_points(chunks: list[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any], int]]:
    """``(ts, chunk, index)`` for each point of ``chunks``, each ``ts`` once: from the
    chunk written first (lowest ``w``, then ``_id``), so every reader picks the same."""
    seen: set[int] = set()
    for chunk in sorted(chunks, key=lambda c: (int(c.get("w", 0)), str(c["_id"]))):
        for i, ts in enumerate(chunk.get("ts") or ()):
            ts = int(ts)
            if ts not in seen:
                seen.add(ts)
                yield ts, chunk, i


@dataclass(slots=True)
class _Pending:
    device: str
    point: Point
    accepted: float  # time.monotonic()


@dataclass(slots=True)
class _Write:
    """One write of the flusher: the queue's first points and the device documents due."""

    batch: list[_Pending]
    devices: dict[str, int]  # name -> cache version written
    points_done: bool = False  # the points are stored (device updates may still fail)
    fields: dict[str, set[str]] = field(default_factory=dict)  # device -> metrics it set


@dataclass(slots=True)
class _DeviceCache:
    last_seen: int = 0
    last: dict[str, tuple[int, float]] = field(default_factory=dict)  # metric -> (ts, value)
    version: int = 0  # bumped on every change; written when != written
    written: int = 0
    written_at: float = float("-inf")  # time.monotonic() of the last write
    synced: bool = False  # the stored document was merged in
    # metrics the stored document holds, as far as this process knows: those
    # no longer in ``last`` (forgotten beyond the limit) are unset at the next write
    stored: set[str] = field(default_factory=set)

    def note(self, point: Point) -> None:
        """Merge a point into the last values: per metric the newest ``ts`` wins, and at
        the same ``ts`` (the same point sent again) the value seen first stays."""
        for metric, value in point.values.items():
            cur = self.last.get(metric)
            if cur is None or point.ts > cur[0]:
                self.last[metric] = (point.ts, value)


class MongoTelemetryStore:
    """Write-behind, insert-only ``TelemetryStore`` over MongoDB or FerretDB (module docstring)."""

    def __init__(self, mongo: MongoConfig, cfg: TelemetryConfig) -> None:
        if not mongo.url:
            raise ConfigError("mongodb.url: required for the MongoDB telemetry store")
        check_url(mongo.url)
        self._mongo = mongo
        self._cfg = cfg
        self._bucket_ms = int(cfg.bucket_seconds * 1000)
        self._metric_limit = device_metric_limit(cfg)
        self._seal_delay_ms = int((cfg.max_skew + SEAL_GRACE) * 1000)
        self._client: _Client | None = None
        self._queue: deque[_Pending] = deque()
        self._pending: dict[str, dict[int, _Pending]] = {}  # device -> ts -> queued item
        self._devices: dict[str, _DeviceCache] = {}
        # (device, bucket start) written here, not sealed yet -> a mark that changes on every write
        self._unsealed: dict[tuple[str, int], int] = {}
        self._marks = itertools.count(1)
        self._wakeup = asyncio.Event()
        self._batch_ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._close_started = asyncio.Event()  # cuts the flusher's retry backoff short
        self._backoff = Backoff(mongo.retry_delay, mongo.retry_max_delay)
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closing = False
        self._avail = Availability(log, "telemetry store", "points")
        self._last_latency = 0.0
        self._written = 0
        self._rejected = 0
        self._flush_errors = 0  # writes failed by an unexpected (non-driver) error
        self._sealed = 0
        self._factor = 1.0  # share of the write limits in use: halved after a timeout, regrown
        # One write of this store at a time: on FerretDB v1 an update running beside
        # another write can hang both for good.
        self._write_lock = asyncio.Lock()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Connect, create indexes and start the flusher, sealing and retention tasks.

        Raises:
            EngineError: the server cannot be reached or refused an index.
        """
        if self._started:
            return
        self._client = _Client(self._mongo)
        points, buckets, devices = self._colls()

        async def steps() -> None:
            legacy = await points.find_one({}, {"ts": 1, "t": 1})
            if legacy is not None and "ts" not in legacy:
                raise _LegacyLayout()
            await points.create_index([("d", 1), ("b", 1)], name=CHUNK_INDEX)
            await points.create_index([("b", 1)], name=CHUNK_BUCKET_INDEX)
            await buckets.create_index([("device", 1), ("start", 1)], name=BUCKET_INDEX)
            await buckets.create_index([("end", 1)], name=END_INDEX)
            await devices.create_index([("last_seen", 1)], name=SEEN_INDEX)

        try:
            await start_steps("telemetry store", self._backoff, steps, self._describe)
        except _LegacyLayout:
            await self._client.close()
            self._client = None
            raise EngineError(
                f"telemetry store: collection {self._cfg.points_collection!r} holds points "
                "in the one-document-per-point layout of earlier Squall versions, which this "
                "version does not read; set telemetry.points_collection to a new collection "
                "(or rename the old one) and start again"
            ) from None
        except Exception as exc:
            await self._client.close()
            self._client = None
            reason = self._describe(exc)
            raise EngineError(f"telemetry store: cannot create indexes: {reason}") from None
        self._started = True
        self._mark_up()
        self._tasks = [
            asyncio.create_task(self._flush_forever(), name="squall-telemetry-flusher"),
            asyncio.create_task(self._seal_forever(), name="squall-telemetry-sealer"),
        ]
        if self._cfg.retention_days > 0:
            self._tasks.append(
                asyncio.create_task(self._retention_forever(), name="squall-telemetry-retention")
            )
        for task in self._tasks:
            task.add_done_callback(_report_death(log))
        log.info(
            "telemetry store started driver=%s hosts=%s database=%s collections=%s,%s,%s",
            self._mongo.driver,
            _hosts(self._mongo.url),
            self._mongo.database,
            self._cfg.points_collection,
            self._cfg.collection,
            self._cfg.devices_collection,
        )

    async def close(self) -> None:
        """Write what is queued within ``mongodb.shutdown_flush_timeout``, then disconnect."""
        if self._closing:
            return
        self._closing = True
        # A flusher sleeping in its retry backoff retries at once (the server may
        # be back) and, failing again, from retry_delay on: within the deadline.
        self._backoff.reset()
        self._close_started.set()
        self._wakeup.set()
        self._batch_ready.set()
        if self._started and (self._queue or self._dirty_devices()):
            try:
                async with asyncio.timeout(self._mongo.shutdown_flush_timeout):
                    await self._drained.wait()
            except TimeoutError:
                pass
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: S110 - it stopped earlier; _report_death logged it
                pass
        self._tasks = []
        if self._queue:
            log.error(
                "telemetry store closed with %d accepted points not written error=%s",
                len(self._queue),
                self._avail.error or "shutdown flush timeout",
            )
        if self._client is not None:
            await self._client.close()
            self._client = None
        self._avail.ready = False
        self._avail.error = "closed"

    # -- TelemetryStore --------------------------------------------------------

    async def add(self, device: str, points: Sequence[Point], seen: int) -> None:
        if not self._started or self._closing:
            raise EngineError("telemetry store is not running")
        waiting = self._pending.get(device)
        fresh = [p for p in points if waiting is None or p.ts not in waiting]
        if len(self._queue) + len(fresh) > self._cfg.queue_size:
            raise StoreFullError(f"telemetry queue full: {len(self._queue)} points not yet written")
        cache = self._devices.get(device)
        if cache is None:
            cache = self._devices[device] = _DeviceCache()
        cache.last_seen = max(cache.last_seen, seen)
        cache.version += 1
        # Every point, also one still queued: the rule of note() keeps a value
        # seen first, whether or not this store still knows the point was seen.
        for point in points:
            cache.note(point)
        keep_newest(cache.last, self._metric_limit)
        if fresh:
            now = time.monotonic()
            if waiting is None:
                waiting = self._pending[device] = {}
            for point in fresh:
                item = _Pending(device, point, now)
                self._queue.append(item)
                waiting[point.ts] = item
            if len(self._queue) >= self._cfg.batch_size:
                self._batch_ready.set()
        self._drained.clear()
        self._wakeup.set()

    async def query(
        self, device: str, metric: str, start: int, end: int, step: int
    ) -> list[StepStats]:
        if end <= start:
            return []
        first, last = bucket_range(start, end, self._bucket_ms)
        key = metric_key(metric)
        ds = Downsampler(start, end, step, self._bucket_ms)
        # Snapshot the queue before any await: a point leaving it meanwhile was
        # written first, so the points read or the snapshot have it (merged by ts).
        queued: dict[int, float] = {}
        queued_buckets: set[int] = set()
        for ts, item in self._pending.get(device, {}).items():
            value = item.point.values.get(metric)
            if start <= ts < end and value is not None:
                queued[ts] = value
                queued_buckets.add(bucket_start(ts, self._bucket_ms))
        points, buckets, _ = self._colls()
        docs = await self._run(
            buckets.find(
                {"device": device, "start": {"$gte": first, "$lte": last}},
                {"_id": 0, "start": 1, f"s.{key}": 1},
            ).to_list(None)
        )
        summarized: list[int] = []
        for doc in docs:
            b = int(doc["start"])
            if b in queued_buckets or not ds.whole(b):
                continue
            s = (doc.get("s") or {}).get(key)
            if s is not None:  # else: sealed without this metric
                stats = _summary_stats(s)
                if stats is None:
                    continue  # read from its points
                ds.add_stats(b, stats)
            summarized.append(b)
        # Every stretch of [start, end) not covered by a summary is read point by point.
        stretches: list[tuple[int, int]] = []
        lo = start
        for b in sorted(summarized):
            if b > lo:
                stretches.append((lo, b))
            lo = max(lo, b + self._bucket_ms)
        if lo < end:
            stretches.append((lo, end))
        # Few finds for all of them: a step that is not a whole number of buckets
        # leaves a stretch per step (300 with the default step), and a find each
        # took a minute on FerretDB, which scans the collection for every one. A
        # find spans consecutive stretches and skips the summarized buckets between
        # them ($nin; $or of ranges is as slow on FerretDB), at most MAX_SKIPPED.
        skipped = set(summarized)
        groups: list[tuple[int, int, list[int]]] = []  # first, last bucket; buckets skipped
        for lo, hi in stretches:
            b_lo, b_hi = bucket_range(lo, hi, self._bucket_ms)
            if groups:
                g_lo, g_hi, gap = groups[-1]
                between = range(g_hi + self._bucket_ms, b_lo, self._bucket_ms)  # summarized
                if len(gap) + len(between) <= MAX_SKIPPED:
                    groups[-1] = (g_lo, b_hi, [*gap, *between])
                    continue
            groups.append((b_lo, b_hi, []))
        chunks: list[dict[str, Any]] = []
        for b_lo, b_hi, gap in groups:
            span: dict[str, Any] = {"$gte": b_lo, "$lte": b_hi}
            if gap:
                span["$nin"] = gap
            chunks += await self._run(
                points.find({"d": device, "b": span}, {"ts": 1, "w": 1, f"v.{key}": 1}).to_list(
                    None
                )
            )
        stored: set[int] = set()
        for ts, chunk, i in chunk_points(chunks):
            if not start <= ts < end or bucket_start(ts, self._bucket_ms) in skipped:
                continue
            stored.add(ts)
            column = (chunk.get("v") or {}).get(key)
            if column is not None and i < len(column) and column[i] is not None:
                ds.add_value(ts, float(column[i]))
        for ts, value in queued.items():
            if ts not in stored:
                ds.add_value(ts, value)
        return ds.result()

    async def devices(self) -> list[DeviceState]:
        cached = {d: (c.last_seen, dict(c.last)) for d, c in self._devices.items()}
        _, _, devices = self._colls()
        docs = await self._run(devices.find({}, {"last_seen": 1, "last": 1}).to_list(None))
        merged: dict[str, tuple[int, dict[str, tuple[int, float]]]] = {}
        for doc in docs:
            stored_last = _stored_last(doc)
            keep_newest(stored_last, self._metric_limit)  # not unset yet, or written elsewhere
            merged[str(doc["_id"])] = (int(doc.get("last_seen", 0)), stored_last)
        for name, (seen, last) in cached.items():
            cur = merged.get(name)
            if cur is None:
                merged[name] = (seen, last)
                continue
            values = dict(cur[1])
            for metric, (ts, value) in last.items():
                old = values.get(metric)
                if old is None or ts > old[0]:  # same ts: the stored value was seen first
                    values[metric] = (ts, value)
            keep_newest(values, self._metric_limit)
            merged[name] = (max(seen, cur[0]), values)
        return [
            DeviceState(name, seen, {m: v for m, (_, v) in last.items()})
            for name, (seen, last) in merged.items()
        ]

    async def retain(self, now: int) -> int:
        cutoff = retention_cutoff(now, self._cfg.retention_days)
        if cutoff is None:
            return 0
        # A bucket has expired when it ends at or before the cutoff, that is when
        # it starts before the bucket holding the cutoff.
        first_kept = bucket_start(cutoff, self._bucket_ms)
        points, buckets, devices = self._colls()
        gone: set[str] = set()
        for cid in await self._delete_chunked(points, {"b": {"$lt": first_kept}}):
            gone.add(bucket_id(*chunk_bucket(str(cid))))
        gone.update(map(str, await self._delete_chunked(buckets, {"end": {"$lte": cutoff}})))
        await self._delete_chunked(devices, {"last_seen": {"$lte": cutoff}})
        for key in [k for k in self._unsealed if k[1] < first_kept]:
            del self._unsealed[key]
        for name in [n for n, c in self._devices.items() if c.last_seen <= cutoff]:
            if name not in self._pending:
                del self._devices[name]
        return len(gone)

    async def seal(self, now: int) -> int:
        """Write the summaries of the buckets this store wrote that closed before ``now`` (ms).

        A bucket is closed ``max_skew + SEAL_GRACE`` after its end; one with
        points still queued here waits. Returns the number of buckets sealed.
        Runs by itself every ``min(bucket_seconds, 10)`` seconds; public so
        tests can drive it.

        Raises:
            EngineError: the server could not be read or written.
        """
        closed = now - self._seal_delay_ms
        done = 0
        for key, mark in list(self._unsealed.items()):
            device, b = key
            if b + self._bucket_ms > closed or self._has_queued(device, b):
                continue
            summary = await self._summarize(device, b)
            if summary is not None and len(summary["s"]) > SUMMARY_METRICS:
                # A summary that wide is slow to write (seconds on FerretDB, over the
                # timeout: every pass would stop here) and saves little: the bucket
                # stays unsealed, answered from its points.
                log.warning(
                    "telemetry bucket has too many metrics to summarize; it stays unsealed "
                    "device=%s start=%d metrics=%d",
                    device,
                    b,
                    len(summary["s"]),
                )
                summary = None
            try:
                if summary is not None and await self._put_summary(summary, key, mark):
                    done += 1
            except InvalidDocument as exc:
                # Too large to store (very many distinct metrics in one bucket): the
                # bucket stays unsealed (exact, read from its points) rather than
                # stopping every later pass here.
                log.error(
                    "telemetry bucket summary cannot be stored; bucket stays unsealed "
                    "device=%s start=%d error=%s",
                    device,
                    b,
                    f"{type(exc).__name__}: {str(exc)[:200]}",
                )
            if self._unsealed.get(key) == mark:  # not written again meanwhile
                del self._unsealed[key]
        self._sealed += done
        return done

    def status(self) -> StoreStatus:
        dead = "" if self._closing else _stopped_task(self._tasks)
        return StoreStatus(
            ready=self._avail.ready and not dead,
            queue_depth=len(self._queue),
            queue_limit=self._cfg.queue_size,
            last_write_latency=self._last_latency,
            error=dead or ("" if self._avail.ready else self._avail.error),
            extra={
                "points_written": self._written,
                "points_refused": self._rejected,
                "write_failures": self._flush_errors,
                "buckets_sealed": self._sealed,
                "buckets_unsealed": len(self._unsealed),
            },
        )

    # -- internals -------------------------------------------------------------

    def _colls(self) -> tuple[Any, Any, Any]:
        if self._client is None:
            raise EngineError("telemetry store is not running")
        db = self._client.db
        cfg = self._cfg
        return db[cfg.points_collection], db[cfg.collection], db[cfg.devices_collection]

    def _dirty_devices(self) -> list[str]:
        return [d for d, c in self._devices.items() if c.version != c.written]

    def _has_queued(self, device: str, b: int) -> bool:
        end = b + self._bucket_ms
        return any(b <= ts < end for ts in self._pending.get(device, ()))

    async def _run(self, op: Any, keep: type[Exception] | None = None) -> Any:
        """Await one driver operation, mapping driver errors (but ``keep``) to ``EngineError``."""
        from pymongo.errors import ConnectionFailure, PyMongoError

        try:
            return await op
        except Exception as exc:
            if keep is not None and isinstance(exc, keep):
                raise
            if isinstance(exc, ConnectionFailure):
                self._mark_down(exc)
                raise EngineError(f"telemetry store unavailable: {self._describe(exc)}") from None
            if isinstance(exc, PyMongoError):
                raise EngineError(f"telemetry store: {self._describe(exc)}") from None
            raise

    async def _delete_chunked(self, coll: Any, query: dict[str, Any]) -> list[Any]:
        """Delete what ``query`` matches, ``RETAIN_CHUNK`` ids per command; the ids deleted."""
        deleted: list[Any] = []
        while True:
            docs = await self._run(coll.find(query, {"_id": 1}).limit(RETAIN_CHUNK).to_list(None))
            ids = [d["_id"] for d in docs]
            if ids:
                async with self._write_lock:
                    await self._run(coll.delete_many({"_id": {"$in": ids}}))
                deleted.extend(ids)
            if len(ids) < RETAIN_CHUNK:
                return deleted

    # -- flusher ---------------------------------------------------------------

    async def _flush_forever(self) -> None:
        from pymongo.errors import PyMongoError

        backoff = self._backoff
        while True:
            if not self._queue:
                dirty = self._dirty_devices()
                if not dirty:
                    self._drained.set()
                    self._wakeup.clear()
                    if self._avail.ready or self._closing:
                        await self._wakeup.wait()
                    elif not await _wait(self._wakeup, self._idle_check_interval()):
                        # Marked down by a read (a query, a sealing or retention pass)
                        # while nothing is queued: no write would ever mark it up again,
                        # and /ready would stay 503 after the server is back.
                        await self._ping()
                    continue
                wait = self._device_wait(dirty)
                if wait > 0 and not self._closing:
                    self._wakeup.clear()
                    await _wait(self._wakeup, wait)
                    continue
            else:
                wait = self._cfg.flush_interval - (time.monotonic() - self._queue[0].accepted)
                if len(self._queue) < self._cfg.batch_size and not self._closing and wait > 0:
                    self._batch_ready.clear()
                    await _wait(self._batch_ready, wait)
            write: _Write | None = None
            try:
                async with self._write_lock:
                    write = self._next_write()
                    await self._flush(write)
            except asyncio.CancelledError:
                raise
            except (PyMongoError, EngineError) as exc:
                if _is_timeout(exc) and self._factor > MIN_WRITE_FACTOR:
                    # The server may still be applying the command it was too slow
                    # for; sending the same amount again would time out again.
                    self._factor = max(MIN_WRITE_FACTOR, self._factor / 2)
                    log.warning(
                        "telemetry write timed out; writes now carry up to %d points "
                        "and %d device updates",
                        self._batch_limit(),
                        self._device_limit(),
                    )
                self._mark_down(exc)
                await self._retry_pause()
                continue
            except Exception:
                self._flush_failed(write)
                await self._retry_pause()
                continue
            backoff.reset()
            self._factor = min(1.0, self._factor * 1.25)

    def _flush_failed(self, write: _Write | None) -> None:
        """Handle a write that failed with an unexpected error (logged at ERROR).

        Not an outage but a bug, or a document the driver will not send (bson's
        ``InvalidDocument``, ``DocumentTooLarge``): sending the same write again
        fails the same way, and the flusher must neither die nor retry it for
        ever while the queue fills. Writes shrink by half, so the failing point
        or device ends up alone, and a write that fails at the smallest size is
        dropped: its points are counted in ``points_refused`` (unless they were
        written before its device updates failed), its device updates are
        skipped until the device changes again.
        """
        self._flush_errors += 1
        if write is None:
            log.exception("telemetry flusher failed; retrying")
            return
        if self._factor > MIN_WRITE_FACTOR and (len(write.batch) > 1 or len(write.devices) > 1):
            self._factor = max(MIN_WRITE_FACTOR, self._factor / 2)
            log.exception(
                "telemetry write failed; retrying with writes of up to %d points and %d "
                "device updates",
                self._batch_limit(),
                self._device_limit(),
            )
            return
        log.exception(
            "telemetry write failed at its smallest; dropped points=%d devices=%s",
            0 if write.points_done else len(write.batch),
            ",".join(write.devices) or "-",
        )
        if write.points_done:
            self._written += len(write.batch)
        else:
            self._rejected += len(write.batch)
        self._commit(write)

    async def _retry_pause(self) -> None:
        """Sleep before the flusher retries: the backoff, cut short when ``close`` starts.

        Once closing, the pause is the backoff again (``close`` restarts it), so
        the queue is written as soon as the server answers, until ``close``
        cancels the flusher at its deadline.
        """
        raise_if_cancelling()
        delay = self._backoff.next()
        if self._closing:
            await asyncio.sleep(delay)  # retry backoff, not a sync point
        else:
            await _wait(self._close_started, delay)

    def _batch_limit(self) -> int:
        return max(1, int(self._cfg.batch_size * self._factor))

    def _device_limit(self) -> int:
        return max(1, int(self._cfg.max_device_updates * self._factor))

    def _device_wait(self, dirty: list[str]) -> float:
        """Seconds until the first of these devices may be written again."""
        now = time.monotonic()
        interval = self._cfg.device_write_interval
        return min(self._devices[d].written_at + interval - now for d in dirty)

    def _due_devices(self) -> dict[str, int]:
        """Devices to write now (name -> version), oldest written first, bounded per write."""
        now = time.monotonic()
        interval = self._cfg.device_write_interval
        due = (
            (d, c.version)
            for d, c in self._devices.items()
            if c.version != c.written and (self._closing or now - c.written_at >= interval)
        )
        return dict(itertools.islice(due, self._device_limit()))

    def _next_write(self) -> _Write:
        batch = list(itertools.islice(self._queue, self._batch_limit()))
        # Points first: device documents wait while a backlog of points does. (On
        # FerretDB v1 an update is slow, and one running next to an insert can
        # deadlock the server, so they are never sent side by side either.)
        backlog = len(self._queue) - len(batch) >= self._cfg.batch_size
        devices = self._due_devices() if self._closing or not backlog else {}
        return _Write(batch, devices)

    async def _flush(self, write: _Write) -> None:
        started = time.monotonic()
        if write.batch:
            await self._write_points(write.batch)
        write.points_done = True
        if write.devices:
            await self._write_devices(write)
        self._last_latency = time.monotonic() - started
        self._commit(write)
        self._written += len(write.batch)
        self._mark_up()

    def _commit(self, write: _Write) -> None:
        """Take a finished (or dropped) write's points off the queue, mark its devices written."""
        batch, devices = write.batch, write.devices
        for item in batch:
            self._queue.popleft()
            waiting = self._pending.get(item.device)
            if waiting is not None and waiting.get(item.point.ts) is item:
                del waiting[item.point.ts]
                if not waiting:
                    del self._pending[item.device]
        # Written devices move to the end of the cache: under sustained ingest
        # every device takes its turn.
        now = time.monotonic()
        for name, version in devices.items():
            cache = self._devices.pop(name, None)
            if cache is not None:
                cache.written = version
                cache.written_at = now
                cache.stored = write.fields.get(name, cache.stored)
                self._devices[name] = cache
        if not self._queue and not self._dirty_devices():
            self._drained.set()

    async def _write_points(self, batch: list[_Pending]) -> None:
        _, buckets, _ = self._colls()
        # The batch's points as chunks: per device and bucket, as few as
        # ``chunk_runs`` allows (a dict keeps the batch's order; ``add`` never
        # queues a device's ts twice).
        groups: dict[tuple[str, int], list[Point]] = {}
        for item in batch:
            key = (item.device, bucket_start(item.point.ts, self._bucket_ms))
            groups.setdefault(key, []).append(item.point)
        # A bucket that may be sealed already loses its summary before more of its
        # points go in: until it is sealed again, queries read its chunks.
        now = int(time.time() * 1000)
        closed = now - self._seal_delay_ms
        late = {bucket_id(d, b) for d, b in groups if b + self._bucket_ms <= closed}
        if late:
            await buckets.delete_many({"_id": {"$in": sorted(late)}})
        chunks = [(d, b, run) for (d, b), group in groups.items() for run in chunk_runs(group)]
        docs = [chunk_doc(d, b, run, now) for d, b, run in chunks]
        errors = await self._insert(docs)
        refused: set[int] = set()
        for err in errors:
            if err.get("code") in DUPLICATE_KEY_CODES:
                continue  # this very chunk is stored already
            index = int(err.get("index", 0))
            refused.add(index)
            device, b, run = chunks[index]
            # errmsg may quote the document (device data): log only the key and code.
            log.error(
                "mongo server refused a telemetry chunk; dropped device=%s bucket=%d points=%d "
                "code=%s",
                device,
                b,
                len(run),
                err.get("code"),
            )
            self._rejected += len(run)
        for index, (device, b, _) in enumerate(chunks):
            if index not in refused:
                self._mark_unsealed(device, b)

    async def _insert(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Insert chunk documents unordered; returns the write errors (duplicates among them).

        Both servers go on after an error and report every failed document.

        Raises:
            PyMongoError: the insert failed as a whole, or was applied without the
                write concern (the caller retries the batch; duplicates are fine).
        """
        from pymongo.errors import BulkWriteError

        points, _, _ = self._colls()
        try:
            await points.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                raise
            return list(exc.details.get("writeErrors") or [])
        return []

    def _mark_unsealed(self, device: str, b: int) -> None:
        key = (device, b)
        self._unsealed.pop(key, None)  # re-inserted: the newest are kept longest
        self._unsealed[key] = next(self._marks)
        if len(self._unsealed) > MAX_UNSEALED:
            forgotten = next(iter(self._unsealed))
            del self._unsealed[forgotten]
            log.warning(
                "telemetry: more than %d buckets wait for sealing; bucket device=%s start=%d "
                "stays unsealed (queries read its points)",
                MAX_UNSEALED,
                forgotten[0],
                forgotten[1],
            )

    async def _write_devices(self, write: _Write) -> None:
        _, _, devices = self._colls()
        caches = {n: c for n in write.devices if (c := self._devices.get(n)) is not None}
        unsynced = [n for n, c in caches.items() if not c.synced]
        if unsynced:
            cursor = devices.find({"_id": {"$in": unsynced}}, {"last_seen": 1, "last": 1})
            docs = await cursor.to_list(None)
            for doc in docs:
                cache = self._devices.get(str(doc["_id"]))
                if cache is None:
                    continue
                cache.last_seen = max(cache.last_seen, int(doc.get("last_seen", 0)))
                stored_last = _stored_last(doc)
                for metric, (ts, value) in stored_last.items():
                    cur = cache.last.get(metric)
                    if cur is None or ts >= cur[0]:  # same ts: the stored value was seen first
                        cache.last[metric] = (ts, value)
                cache.stored.update(stored_last)
                keep_newest(cache.last, self._metric_limit)
            for n in unsynced:
                caches[n].synced = True
        updates: list[dict[str, Any]] = []
        for name, cache in caches.items():
            u: dict[str, Any] = {"$max": {"last_seen": cache.last_seen}}
            if cache.last:
                u["$set"] = {
                    f"last.{metric_key(m)}": {"v": v, "t": ts} for m, (ts, v) in cache.last.items()
                }
            forgotten = cache.stored.difference(cache.last)
            if forgotten:
                u["$unset"] = {f"last.{metric_key(m)}": "" for m in sorted(forgotten)}
            write.fields[name] = set(cache.last)
            updates.append({"q": {"_id": name}, "u": u, "upsert": True})
        while updates:
            errors = await self._update(self._cfg.devices_collection, updates)
            if not errors:
                return
            err = errors[0]
            index = int(err.get("index", 0))
            if err.get("code") not in DUPLICATE_KEY_CODES:  # concurrent first upsert: just retry
                log.error(
                    "mongo server refused a device update; skipped device=%s code=%s",
                    updates[index]["q"]["_id"],
                    err.get("code"),
                )
                index += 1
            updates = updates[index:]

    async def _update(self, collection: str, updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One ordered ``update`` command; returns its write errors (at most the first matters).

        Ordered because FerretDB v1 stops an unordered update batch at its first
        error too, and its reply then lacks ``nModified``, which PyMongo's
        ``bulk_write`` cannot merge; ordered, both servers behave alike.

        Raises:
            PyMongoError: the command failed as a whole (the caller retries the batch).
        """
        from pymongo.errors import WriteConcernError

        if self._client is None:
            raise EngineError("telemetry store is not running")
        reply: Mapping[str, Any] = await self._client.db.command(
            {"update": collection, "updates": updates, "ordered": True}
        )
        if reply.get("writeConcernError"):
            # applied but not durably acknowledged: retry (duplicates are fine)
            raise WriteConcernError(str(reply["writeConcernError"]))
        errors: list[dict[str, Any]] = list(reply.get("writeErrors") or [])
        return errors

    def _idle_check_interval(self) -> float:
        return self._mongo.ping_interval or self._mongo.retry_max_delay

    async def _ping(self) -> None:
        """Whether the server answers again, for a store marked down while idle."""
        from pymongo.errors import PyMongoError

        if self._client is None:
            return
        try:
            await self._client.db.command("ping")
        except asyncio.CancelledError:
            raise
        except PyMongoError as exc:
            self._mark_down(exc)
        else:
            self._mark_up()

    def _mark_down(self, exc: BaseException) -> None:
        self._avail.down(self._describe(exc), len(self._queue))
        self._wakeup.set()  # an idle flusher starts checking for the server's return

    def _mark_up(self) -> None:
        self._avail.up(len(self._queue))

    def _describe(self, exc: BaseException) -> str:
        """A short, password-free description of a driver error."""
        text = str(exc).split(", Timeout:")[0].split(", full error:")[0]
        password = _password(self._mongo.url)
        if password:
            text = text.replace(password, "***")
        return f"{type(exc).__name__}: {text[:300]}"

    # -- sealing ---------------------------------------------------------------

    async def _summarize(self, device: str, b: int) -> dict[str, Any] | None:
        """The summary document of one bucket, from its stored chunks (None: no points)."""
        points, _, _ = self._colls()
        chunks = await self._run(
            points.find({"d": device, "b": b}, {"ts": 1, "w": 1, "v": 1}).to_list(None)
        )
        stats: dict[str, MetricStats] = {}
        n = 0
        for _, chunk, i in chunk_points(chunks):
            n += 1
            for key, column in (chunk.get("v") or {}).items():
                value = column[i] if i < len(column) else None
                if value is None:
                    continue
                cur = stats.get(key)
                if cur is None:
                    stats[key] = MetricStats.of(float(value))
                else:
                    cur.add(float(value))
        if not n:
            return None
        return {
            "_id": bucket_id(device, b),
            "device": device,
            "start": b,
            "end": b + self._bucket_ms,
            "n": n,
            "s": {
                key: {
                    "min": s.min,
                    "max": s.max,
                    "sum": s.sum,
                    "p": sum_parts(s.exact),
                    "n": s.count,
                }
                for key, s in stats.items()
            },
        }

    async def _put_summary(self, summary: dict[str, Any], key: tuple[str, int], mark: int) -> bool:
        """Insert a bucket's summary, or replace one that counts fewer points; whether
        it was written.

        Not when the bucket was written again since ``mark`` (while its chunks were
        read): that write deleted the summary before its points went in, and this
        summary, read before them, would undercount it until the next pass.
        """
        from pymongo.errors import DuplicateKeyError

        _, buckets, _ = self._colls()
        async with self._write_lock:  # point writes (and their marks) are under it too
            if self._unsealed.get(key) != mark:
                return False
            try:
                await self._run(buckets.insert_one(summary), keep=DuplicateKeyError)
                return True
            except DuplicateKeyError:
                pass
            fewer = {"_id": summary["_id"], "n": {"$lt": summary["n"]}}
            await self._run(buckets.replace_one(fewer, summary))
            return True

    async def _seal_forever(self) -> None:
        interval = min(self._cfg.bucket_seconds, 10.0)
        while True:
            await asyncio.sleep(interval)  # a periodic pass, not a sync point
            raise_if_cancelling()
            try:
                await self.seal(int(time.time() * 1000))
            except EngineError as exc:
                log.debug("telemetry sealing pass failed error=%s", exc)
            except Exception:
                log.exception("telemetry sealing pass failed")  # a bug: the next pass retries

    # -- retention -------------------------------------------------------------

    async def _retention_forever(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.retention_interval)  # a periodic pass, not a sync point
            raise_if_cancelling()
            try:
                deleted = await self.retain(int(time.time() * 1000))
            except EngineError as exc:
                log.debug("telemetry retention pass failed error=%s", exc)
                continue
            except Exception:
                log.exception("telemetry retention pass failed")  # a bug: the next pass retries
                continue
            if deleted:
                log.debug("telemetry retention deleted buckets=%d", deleted)


class _LegacyLayout(Exception):
    """The points collection holds documents of the one-document-per-point layout."""


def _is_timeout(exc: BaseException) -> bool:
    """A write the server did not finish in time (it may still be working on it)."""
    from pymongo.errors import ExecutionTimeout, NetworkTimeout, WTimeoutError

    # The flusher's writes raise driver errors as they are (no _run mapping).
    return isinstance(exc, NetworkTimeout | ExecutionTimeout | WTimeoutError)


def _summary_stats(s: Mapping[str, Any]) -> MetricStats | None:
    """One metric's stats from a bucket summary; ``None`` when its sum is not usable.

    ``p`` holds the exact sum (``sum`` is rounded). A summary written before
    ``p`` existed has only ``sum``: taken as it is, unless it overflowed.
    """
    parts = s.get("p")
    if parts is None:
        parts = [s["sum"]]
    if not all(math.isfinite(part) for part in parts):
        return None
    exact = sum(exact_sum(float(part)) for part in parts)
    return MetricStats(float(s["min"]), float(s["max"]), exact, int(s["n"]))


def _stored_last(doc: Mapping[str, Any]) -> dict[str, tuple[int, float]]:
    last = doc.get("last") or {}
    return {metric_name(k): (int(v["t"]), float(v["v"])) for k, v in last.items()}


def _conforms(s: MongoTelemetryStore) -> TelemetryStore:
    return s
