"""``MongoTelemetryStore``: telemetry buckets in MongoDB (or FerretDB v1), written behind.

Reuses ``store_mongo``'s driver adapter (``AsyncMongoClient`` by default, Motor
with ``mongodb.driver: motor``), backoff and URL redaction; it opens its own
client (connection pool) from the same ``mongodb`` settings.

Documents
    Collection ``telemetry.collection``, one per device per bucket::

        {_id: "<device>/<bucket start ms>", device: str, start: int64, end: int64,
         n: int,                                   # points in the bucket
         ts: [int64, ...],                         # every point's ts (for idempotency)
         p: [{t: int64, v: {<metric key>: double}}, ...],
         s: {<metric key>: {min: double, max: double, sum: double, n: int}}}

    Collection ``telemetry.devices_collection``::

        {_id: "<device>", last_seen: int64, last: {<metric key>: {v: double, t: int64}}}

    Metric names may contain ``.``, which field names may not (FerretDB
    refuses them); a *metric key* is the name with ``.`` written as ``:``
    (a character metric names cannot contain, so the mapping is reversible).
    Bucket ids end with ``/<digits>``: splitting at the last ``/`` gives the
    device back, whatever characters the device id has.

Write path
    ``add`` queues points (bounded by ``telemetry.queue_size`` points;
    ``StoreFullError`` beyond) and updates an in-memory device cache. One
    flusher task takes up to ``telemetry.batch_size`` points once that many
    wait or the oldest has waited ``telemetry.flush_interval`` (stopping
    before a point that would make more than ``telemetry.max_bucket_updates``
    buckets), groups them by bucket and sends one upsert per bucket (and as
    many device upserts at most, devices taking turns)::

        q: {_id: <bucket id>, ts: {$nin: [<the group's ts>]}}
        u: {$push: {ts: {$each}, p: {$each}}, $inc: {n, s.<k>.sum, s.<k>.n},
            $min: {s.<k>.min}, $max: {s.<k>.max}, $setOnInsert: {device, start, end}}

    The update applies only when none of the group's ``ts`` is in the bucket
    yet; when one is (a retried frame, or a batch re-sent after a lost
    acknowledgement) the filter matches nothing, the upsert's insert hits the
    existing ``_id`` and the server answers duplicate key. A duplicate on a
    one-point update means "already stored"; on a larger group the group is
    re-sent point by point. Points and summaries therefore change together
    (one single-document update) and exactly once per ``(device, ts)``.

    Updates go out as raw ``update`` commands with ``ordered: true``:
    FerretDB v1 stops an unordered batch at its first error too, and its
    reply then lacks ``nModified``, which PyMongo's ``bulk_write`` cannot
    merge (KeyError). With ordered batches both servers behave alike: the
    writes before the first error are applied, the rest are sent again.
    Any other failure keeps the batch queued, marks the store not ready and
    retries with capped, jittered backoff. A write that times out may still be
    running on the server, and the same amount of work would time out again:
    the number of bucket updates per write is halved (down to one), and grows
    back by a quarter after each write that succeeds. A bucket update the server refuses
    outright (not a duplicate) is dropped and logged at ERROR, as in
    ``MongoStore``.

    Device documents: ``last_seen`` via ``$max``; last values are merged per
    metric by ``ts`` in the cache (the first time this process writes a
    device it reads the stored document and merges it in), then written
    with ``$set``. Two nodes ingesting for the same device at the same time
    may briefly overwrite each other's last values; the buckets are exact.

Read path
    ``query`` reads the per-metric summaries of the buckets in range
    (projection ``s.<key>``) and, for buckets not wholly inside one step, or
    holding points still queued, their points (projection ``p.t``,
    ``p.v.<key>``), merging queued points by ``ts`` so nothing is counted
    twice. ``devices`` merges the collection with the cache.

Retention
    A background pass every ``telemetry.retention_interval`` deletes buckets
    whose ``end`` is older than ``retention_days`` and devices not seen for
    that long (no TTL indexes: FerretDB v1 has none). On FerretDB v1 only
    ``_id`` equality is pushed down to SQLite, so range queries and retention
    scan the collection; the indexes serve MongoDB.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from server.backoff import Availability, Backoff
from server.config import MongoConfig, TelemetryConfig
from server.errors import ConfigError, EngineError, StoreFullError
from server.store import StoreStatus
from server.store_mongo import DUPLICATE_KEY_CODES, _Client, _hosts, _password, _wait
from server.telemetry_store import (
    DeviceState,
    Downsampler,
    MetricStats,
    Point,
    StepStats,
    TelemetryStore,
    bucket_range,
    bucket_start,
    retention_cutoff,
)

log = logging.getLogger("squall.telemetry.mongo")

BUCKET_INDEX: Final = "device_start"
END_INDEX: Final = "end"
SEEN_INDEX: Final = "last_seen"


def metric_key(metric: str) -> str:
    """Field name for a metric (``.`` is not allowed in field names)."""
    return metric.replace(".", ":")


def metric_name(key: str) -> str:
    return key.replace(":", ".")


def bucket_id(device: str, start: int) -> str:
    return f"{device}/{start}"


@dataclass(slots=True)
class _Pending:
    device: str
    point: Point
    accepted: float  # time.monotonic()


@dataclass(slots=True)
class _DeviceCache:
    last_seen: int = 0
    last: dict[str, tuple[int, float]] = field(default_factory=dict)  # metric -> (ts, value)
    version: int = 0  # bumped on every change; flushed when != written
    written: int = 0
    synced: bool = False  # the stored document was merged in

    def note(self, point: Point) -> None:
        for metric, value in point.values.items():
            cur = self.last.get(metric)
            if cur is None or point.ts >= cur[0]:
                self.last[metric] = (point.ts, value)


@dataclass(slots=True)
class _Group:
    device: str
    start: int
    points: list[Point]


class MongoTelemetryStore:
    """Write-behind ``TelemetryStore`` over MongoDB or FerretDB; see the module docstring."""

    def __init__(self, mongo: MongoConfig, cfg: TelemetryConfig) -> None:
        if not mongo.url:
            raise ConfigError("mongodb.url: required for the MongoDB telemetry store")
        self._mongo = mongo
        self._cfg = cfg
        self._bucket_ms = int(cfg.bucket_seconds * 1000)
        self._client: _Client | None = None
        self._queue: deque[_Pending] = deque()
        self._pending: dict[str, dict[int, _Pending]] = {}  # device -> ts -> queued item
        self._devices: dict[str, _DeviceCache] = {}
        self._wakeup = asyncio.Event()
        self._batch_ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closing = False
        self._avail = Availability(log, "telemetry store", "points")
        self._last_latency = 0.0
        self._written = 0
        self._rejected = 0
        self._max_groups = cfg.max_bucket_updates  # halved after a timeout, then regrown

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Connect, create indexes and start the flusher and retention tasks.

        Raises:
            EngineError: the server cannot be reached or refused an index.
        """
        if self._started:
            return
        self._client = _Client(self._mongo)
        try:
            buckets, devices = self._colls()
            await buckets.create_index([("device", 1), ("start", 1)], name=BUCKET_INDEX)
            await buckets.create_index([("end", 1)], name=END_INDEX)
            await devices.create_index([("last_seen", 1)], name=SEEN_INDEX)
        except Exception as exc:
            await self._client.close()
            self._client = None
            reason = self._describe(exc)
            raise EngineError(f"telemetry store: cannot create indexes: {reason}") from None
        self._started = True
        self._mark_up()
        self._tasks = [asyncio.create_task(self._flush_forever(), name="squall-telemetry-flusher")]
        if self._cfg.retention_days > 0:
            self._tasks.append(
                asyncio.create_task(self._retention_forever(), name="squall-telemetry-retention")
            )
        log.info(
            "telemetry store started driver=%s hosts=%s database=%s collections=%s,%s",
            self._mongo.driver,
            _hosts(self._mongo.url),
            self._mongo.database,
            self._cfg.collection,
            self._cfg.devices_collection,
        )

    async def close(self) -> None:
        """Write what is queued within ``mongodb.shutdown_flush_timeout``, then disconnect."""
        if self._closing:
            return
        self._closing = True
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
        if fresh:
            now = time.monotonic()
            if waiting is None:
                waiting = self._pending[device] = {}
            for point in fresh:
                item = _Pending(device, point, now)
                self._queue.append(item)
                waiting[point.ts] = item
                cache.note(point)
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
        # written first, so the query or the snapshot has it (merged by ts).
        queued: dict[int, list[tuple[int, float]]] = {}
        for ts, item in self._pending.get(device, {}).items():
            b = bucket_start(ts, self._bucket_ms)
            value = item.point.values.get(metric)
            if first <= b <= last and value is not None:
                queued.setdefault(b, []).append((ts, value))
        buckets, _ = self._colls()
        in_range = {"device": device, "start": {"$gte": first, "$lte": last}}
        docs = await self._run(
            buckets.find(
                {**in_range, f"s.{key}": {"$exists": True}}, {"_id": 0, "start": 1, f"s.{key}": 1}
            ).to_list(None)
        )
        slow: set[int] = set(queued)
        for doc in docs:
            b = int(doc["start"])
            s = doc["s"][key]
            if ds.whole(b) and b not in queued:
                stats = MetricStats(float(s["min"]), float(s["max"]), float(s["sum"]), int(s["n"]))
                ds.add_stats(b, stats)
            else:
                slow.add(b)
        if slow:
            found = await self._run(
                buckets.find(
                    {"device": device, "start": {"$in": sorted(slow)}},
                    {"_id": 0, "start": 1, "p.t": 1, f"p.v.{key}": 1},
                ).to_list(None)
            )
            for doc in found:
                b = int(doc["start"])
                stored: set[int] = set()
                for p in doc.get("p", ()):
                    ts = int(p["t"])
                    stored.add(ts)
                    value = p.get("v", {}).get(key)
                    if value is not None:
                        ds.add_value(ts, float(value))
                for ts, value in queued.pop(b, ()):
                    if ts not in stored:
                        ds.add_value(ts, value)
            for pts in queued.values():  # buckets not written at all yet
                ds.add_points(pts)
        return ds.result()

    async def devices(self) -> list[DeviceState]:
        cached = {d: (c.last_seen, dict(c.last)) for d, c in self._devices.items()}
        _, devices = self._colls()
        docs = await self._run(devices.find({}, {"last_seen": 1, "last": 1}).to_list(None))
        merged: dict[str, tuple[int, dict[str, tuple[int, float]]]] = {}
        for doc in docs:
            merged[str(doc["_id"])] = (int(doc.get("last_seen", 0)), _stored_last(doc))
        for name, (seen, last) in cached.items():
            cur = merged.get(name)
            if cur is None:
                merged[name] = (seen, last)
                continue
            values = dict(cur[1])
            for metric, (ts, value) in last.items():
                old = values.get(metric)
                if old is None or ts >= old[0]:
                    values[metric] = (ts, value)
            merged[name] = (max(seen, cur[0]), values)
        return [
            DeviceState(name, seen, {m: v for m, (_, v) in last.items()})
            for name, (seen, last) in merged.items()
        ]

    async def retain(self, now: int) -> int:
        cutoff = retention_cutoff(now, self._cfg.retention_days)
        if cutoff is None:
            return 0
        buckets, devices = self._colls()
        result = await self._run(buckets.delete_many({"end": {"$lte": cutoff}}))
        await self._run(devices.delete_many({"last_seen": {"$lte": cutoff}}))
        for name in [n for n, c in self._devices.items() if c.last_seen <= cutoff]:
            if name not in self._pending:
                del self._devices[name]
        return int(result.deleted_count)

    def status(self) -> StoreStatus:
        return StoreStatus(
            ready=self._avail.ready,
            queue_depth=len(self._queue),
            queue_limit=self._cfg.queue_size,
            last_write_latency=self._last_latency,
            error="" if self._avail.ready else self._avail.error,
            extra={"points_written": self._written, "points_refused": self._rejected},
        )

    # -- internals -------------------------------------------------------------

    def _colls(self) -> tuple[Any, Any]:
        if self._client is None:
            raise EngineError("telemetry store is not running")
        db = self._client.db
        return db[self._cfg.collection], db[self._cfg.devices_collection]

    def _dirty_devices(self) -> list[str]:
        return [d for d, c in self._devices.items() if c.version != c.written]

    async def _run(self, op: Any) -> Any:
        """Await one driver operation, mapping driver errors to ``EngineError``."""
        from pymongo.errors import ConnectionFailure, PyMongoError

        try:
            return await op
        except ConnectionFailure as exc:
            self._mark_down(exc)
            raise EngineError(f"telemetry store unavailable: {self._describe(exc)}") from None
        except PyMongoError as exc:
            raise EngineError(f"telemetry store: {self._describe(exc)}") from None

    # -- flusher ---------------------------------------------------------------

    async def _flush_forever(self) -> None:
        from pymongo.errors import PyMongoError

        backoff = Backoff(self._mongo.retry_delay, self._mongo.retry_max_delay)
        while True:
            if not self._queue and not self._dirty_devices():
                self._drained.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._queue:
                wait = self._cfg.flush_interval - (time.monotonic() - self._queue[0].accepted)
                if len(self._queue) < self._cfg.batch_size and not self._closing and wait > 0:
                    self._batch_ready.clear()
                    await _wait(self._batch_ready, wait)
            try:
                await self._flush_batch()
            except asyncio.CancelledError:
                raise
            except (PyMongoError, EngineError) as exc:
                if _is_timeout(exc) and self._max_groups > 1:
                    # The server may still be applying the command it was too slow
                    # for; sending the same amount again would time out again.
                    self._max_groups = max(1, self._max_groups // 2)
                    log.warning(
                        "telemetry write timed out; bucket updates per write now %d",
                        self._max_groups,
                    )
                self._mark_down(exc)
                await asyncio.sleep(backoff.next())  # retry backoff, not a sync point
                continue
            backoff.reset()
            if self._max_groups < self._cfg.max_bucket_updates:
                self._max_groups = min(
                    self._cfg.max_bucket_updates, self._max_groups + max(1, self._max_groups // 4)
                )

    async def _flush_batch(self) -> None:
        # The batch is the longest prefix of the queue with at most batch_size
        # points in at most _max_groups buckets: one command's work stays bounded.
        batch: list[_Pending] = []
        groups: dict[tuple[str, int], _Group] = {}
        for item in itertools.islice(self._queue, self._cfg.batch_size):
            b = bucket_start(item.point.ts, self._bucket_ms)
            group = groups.get((item.device, b))
            if group is None:
                if len(groups) >= self._max_groups:
                    break
                group = groups[(item.device, b)] = _Group(item.device, b, [])
            group.points.append(item.point)
            batch.append(item)
        # Device documents are bounded the same way; written ones move to the end
        # of the cache (below), so under sustained ingest every device takes turns.
        dirty = ((d, c.version) for d, c in self._devices.items() if c.version != c.written)
        devices = dict(itertools.islice(dirty, self._max_groups))
        started = time.monotonic()
        if groups:
            await self._write_buckets(list(groups.values()))
        if devices:
            await self._write_devices(list(devices))
        latency = time.monotonic() - started
        for item in batch:
            self._queue.popleft()
            waiting = self._pending.get(item.device)
            if waiting is not None and waiting.get(item.point.ts) is item:
                del waiting[item.point.ts]
                if not waiting:
                    del self._pending[item.device]
        for name, version in devices.items():
            cache = self._devices.pop(name, None)
            if cache is not None:
                cache.written = version
                self._devices[name] = cache
        self._written += len(batch)
        self._last_latency = latency
        if not self._queue and not self._dirty_devices():
            self._drained.set()
        self._mark_up()

    async def _write_buckets(self, groups: list[_Group]) -> None:
        work: deque[tuple[dict[str, Any], _Group]] = deque(
            (self._bucket_update(g), g) for g in groups
        )
        while work:
            errors = await self._update(self._cfg.collection, [u for u, _ in work])
            if not errors:
                return
            err = errors[0]
            index = int(err.get("index", 0))
            for _ in range(index):
                work.popleft()
            _, group = work.popleft()
            if err.get("code") in DUPLICATE_KEY_CODES:
                if len(group.points) > 1:
                    # Some of these ts are stored already: settle the group point by point.
                    for point in reversed(group.points):
                        single = _Group(group.device, group.start, [point])
                        work.appendleft((self._bucket_update(single), single))
                continue  # a single point: already stored
            self._rejected += len(group.points)
            # errmsg may quote the document (device data): log only the bucket and code.
            log.error(
                "mongo server refused telemetry points; dropped device=%s bucket=%d points=%d "
                "code=%s",
                group.device,
                group.start,
                len(group.points),
                err.get("code"),
            )

    def _bucket_update(self, group: _Group) -> dict[str, Any]:
        stats: dict[str, MetricStats] = {}
        for point in group.points:
            for metric, value in point.values.items():
                cur = stats.get(metric)
                if cur is None:
                    stats[metric] = MetricStats.of(value)
                else:
                    cur.add(value)
        inc: dict[str, Any] = {"n": len(group.points)}
        low: dict[str, float] = {}
        high: dict[str, float] = {}
        for metric, s in stats.items():
            key = metric_key(metric)
            inc[f"s.{key}.sum"] = s.sum
            inc[f"s.{key}.n"] = s.count
            low[f"s.{key}.min"] = s.min
            high[f"s.{key}.max"] = s.max
        ts = [p.ts for p in group.points]
        points = [
            {"t": p.ts, "v": {metric_key(m): v for m, v in p.values.items()}} for p in group.points
        ]
        return {
            "q": {"_id": bucket_id(group.device, group.start), "ts": {"$nin": ts}},
            "u": {
                "$push": {"ts": {"$each": ts}, "p": {"$each": points}},
                "$inc": inc,
                "$min": low,
                "$max": high,
                "$setOnInsert": {
                    "device": group.device,
                    "start": group.start,
                    "end": group.start + self._bucket_ms,
                },
            },
            "upsert": True,
        }

    async def _write_devices(self, names: list[str]) -> None:
        _, devices = self._colls()
        caches = {n: c for n in names if (c := self._devices.get(n)) is not None}
        unsynced = [n for n, c in caches.items() if not c.synced]
        if unsynced:
            cursor = devices.find({"_id": {"$in": unsynced}}, {"last_seen": 1, "last": 1})
            docs = await cursor.to_list(None)
            for doc in docs:
                cache = self._devices.get(str(doc["_id"]))
                if cache is None:
                    continue
                cache.last_seen = max(cache.last_seen, int(doc.get("last_seen", 0)))
                for metric, (ts, value) in _stored_last(doc).items():
                    cur = cache.last.get(metric)
                    if cur is None or ts > cur[0]:
                        cache.last[metric] = (ts, value)
            for n in unsynced:
                caches[n].synced = True
        updates: list[dict[str, Any]] = []
        for name, cache in caches.items():
            u: dict[str, Any] = {"$max": {"last_seen": cache.last_seen}}
            if cache.last:
                u["$set"] = {
                    f"last.{metric_key(m)}": {"v": v, "t": ts} for m, (ts, v) in cache.last.items()
                }
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

    def _mark_down(self, exc: BaseException) -> None:
        self._avail.down(self._describe(exc), len(self._queue))

    def _mark_up(self) -> None:
        self._avail.up(len(self._queue))

    def _describe(self, exc: BaseException) -> str:
        """A short, password-free description of a driver error."""
        text = str(exc).split(", Timeout:")[0].split(", full error:")[0]
        password = _password(self._mongo.url)
        if password:
            text = text.replace(password, "***")
        return f"{type(exc).__name__}: {text[:300]}"

    # -- retention -------------------------------------------------------------

    async def _retention_forever(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.retention_interval)  # a periodic pass, not a sync point
            try:
                deleted = await self.retain(int(time.time() * 1000))
            except EngineError as exc:
                log.debug("telemetry retention pass failed error=%s", exc)
                continue
            if deleted:
                log.debug("telemetry retention deleted buckets=%d", deleted)


def _is_timeout(exc: BaseException) -> bool:
    """A write the server did not finish in time (it may still be working on it)."""
    from pymongo.errors import ExecutionTimeout, NetworkTimeout, WTimeoutError

    # The flusher's writes raise driver errors as they are (no _run mapping).
    return isinstance(exc, NetworkTimeout | ExecutionTimeout | WTimeoutError)


def _stored_last(doc: Mapping[str, Any]) -> dict[str, tuple[int, float]]:
    last = doc.get("last") or {}
    return {metric_name(k): (int(v["t"]), float(v["v"])) for k, v in last.items()}


def _conforms(s: MongoTelemetryStore) -> TelemetryStore:
    return s
