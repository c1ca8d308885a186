"""In-memory ``TelemetryStore``: the default when ``mongodb.url`` is not set.

Same buckets, summaries and idempotency as ``MongoTelemetryStore`` (the
contract suite runs against both), but nothing survives a restart and memory
is bounded only by retention: meant for development and tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from server.config import TelemetryConfig
from server.store import StoreStatus
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
    exact_total,
    keep_newest,
    retention_cutoff,
)

log = logging.getLogger("squall.telemetry.memory")


class _Bucket:
    __slots__ = ("points", "stats")

    def __init__(self) -> None:
        self.points: dict[int, Point] = {}  # ts -> point
        # metric -> its summary, made when a query first needs it and dropped when a
        # point is added: ingest does not pay for them. Only metrics the bucket's
        # points carry: a query's metric names are the client's choice, and a closed
        # bucket would keep each one until retention drops it.
        self.stats: dict[str, MetricStats] = {}

    def summary(self, metric: str) -> MetricStats | None:
        try:
            return self.stats[metric]
        except KeyError:
            pass
        values = [v for p in self.points.values() if (v := p.values.get(metric)) is not None]
        if not values:
            return None
        stats = self.stats[metric] = MetricStats(
            min(values), max(values), exact_total(values), len(values)
        )
        return stats


class _Device:
    __slots__ = ("buckets", "last", "last_seen", "listed")

    def __init__(self) -> None:
        self.listed = True  # false once retention forgot the device (its buckets may remain)
        self.last_seen = 0
        self.last: dict[str, tuple[int, float]] = {}  # metric -> (ts, value)
        self.buckets: dict[int, _Bucket] = {}  # bucket start -> bucket


class MemoryTelemetryStore:
    """See the module docstring."""

    def __init__(self, cfg: TelemetryConfig) -> None:
        self._cfg = cfg
        self._bucket_ms = int(cfg.bucket_seconds * 1000)
        self._metric_limit = device_metric_limit(cfg)
        self._devices: dict[str, _Device] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None and self._cfg.retention_days > 0:
            self._task = asyncio.create_task(self._retention_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def add(self, device: str, points: Sequence[Point], seen: int) -> None:
        dev = self._devices.get(device)
        if dev is None:
            dev = self._devices[device] = _Device()
        dev.listed = True
        dev.last_seen = max(dev.last_seen, seen)
        for point in points:
            start = bucket_start(point.ts, self._bucket_ms)
            bucket = dev.buckets.get(start)
            if bucket is None:
                bucket = dev.buckets[start] = _Bucket()
            # Last values: per metric the newest ts wins, and at the same ts (this
            # point sent again) the value seen first stays, as in the Mongo store,
            # whose cache cannot tell a point sent again once it is written.
            for metric, value in point.values.items():
                last = dev.last.get(metric)
                if last is None or point.ts > last[0]:
                    dev.last[metric] = (point.ts, value)
            if point.ts in bucket.points:
                continue  # idempotent: (device, ts) is already stored
            bucket.points[point.ts] = point
            if bucket.stats:
                bucket.stats.clear()
        keep_newest(dev.last, self._metric_limit)

    async def query(
        self, device: str, metric: str, start: int, end: int, step: int
    ) -> list[StepStats]:
        dev = self._devices.get(device)
        if dev is None or end <= start:
            return []
        first, last = bucket_range(start, end, self._bucket_ms)
        ds = Downsampler(start, end, step, self._bucket_ms)
        if (last - first) // self._bucket_ms + 1 <= len(dev.buckets):
            starts = [b for b in range(first, last + 1, self._bucket_ms) if b in dev.buckets]
        else:
            starts = sorted(b for b in dev.buckets if first <= b <= last)
        for b in starts:
            bucket = dev.buckets[b]
            if ds.whole(b):
                stats = bucket.summary(metric)
                if stats is not None:
                    ds.add_stats(b, stats)
            else:  # an edge bucket (often the one still filling): its points in range
                for ts, point in bucket.points.items():
                    value = point.values.get(metric)
                    if value is not None:
                        ds.add_value(ts, value)
        return ds.result()

    async def devices(self) -> list[DeviceState]:
        return [
            DeviceState(name, dev.last_seen, {m: v for m, (_, v) in dev.last.items()})
            for name, dev in self._devices.items()
            if dev.listed
        ]

    async def retain(self, now: int) -> int:
        cutoff = retention_cutoff(now, self._cfg.retention_days)
        if cutoff is None:
            return 0
        deleted = 0
        for name, dev in list(self._devices.items()):
            old = [b for b in dev.buckets if b + self._bucket_ms <= cutoff]
            for b in old:
                del dev.buckets[b]
            deleted += len(old)
            if dev.last_seen <= cutoff:
                # Forget the device, not its points: a point's ts may be up to
                # max_skew after the frame was seen, so its bucket can outlive
                # the device; the Mongo store deletes its document only.
                if dev.buckets:
                    dev.listed = False
                    dev.last_seen = 0
                    dev.last.clear()
                else:
                    del self._devices[name]
        return deleted

    async def seal(self, now: int) -> int:
        return 0  # summaries are made when queried (``_Bucket.summary``)

    def status(self) -> StoreStatus:
        return StoreStatus(ready=True, extra={"devices": len(self._devices)})

    async def _retention_forever(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.retention_interval)  # a periodic pass, not a sync point
            deleted = await self.retain(int(time.time() * 1000))
            if deleted:
                log.debug("telemetry retention deleted buckets=%d", deleted)


def _conforms(s: MemoryTelemetryStore) -> TelemetryStore:
    return s
