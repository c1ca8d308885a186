"""Engine contract for device telemetry: ``TelemetryStore``, and what its implementations share.

Devices publish *points* (a timestamp and a few named numbers); the hub
validates them (``server.telemetry``), fans them out live, and hands the
accepted ones to the telemetry store. Dashboards then ask the store for
downsampled series and for each device's last contact and last values.

Storage model (buckets and their summaries)
    Points are grouped per device into fixed time *buckets* of
    ``telemetry.bucket_seconds``, aligned to multiples of the bucket length
    since the epoch. A bucket has its points and, per metric, a summary:
    ``min``/``max``/``sum``/``count``. A query whose steps cover whole buckets
    reads only those summaries; partially covered buckets are read point by
    point. Both implementations keep this shape so that they answer every
    query identically (``Downsampler`` is the one aggregation both use).

Idempotency
    A point is keyed by ``(device, ts)``. Adding a point whose key is already
    stored (a device retrying a frame whose acknowledgement it lost) changes
    nothing a reader sees: not the points queries count, not the summaries,
    not the counts (the Mongo store may keep a second copy that every read
    skips), not a device's last values (see Devices). The one exception: a
    copy that carries a metric the first lacked sets that metric's last
    value if it is the newest for it, in both stores alike (the Mongo store
    cannot tell a point sent again once it is written, as it does not keep
    every ``ts``, so neither store checks). Callers
    deduplicate within one frame (``server.telemetry`` rejects a second point
    with the same ``ts``); ``add`` must still cope with keys already accepted
    earlier.

Durability
    ``add`` returns once the points are *accepted*: an implementation may
    queue them (write-behind) but must then keep them until written, across
    outages of its server, and must raise ``StoreFullError`` instead of
    accepting more than it can hold. Accepted points are visible to ``query``
    and ``devices`` at once, whether or not they are written yet.

Devices
    ``add`` also records the device's *last seen* time (server time of the
    frame, so a device with a wrong clock is still seen as online) and, per
    metric, the value of the newest point by ``ts``: an old point arriving late
    never replaces a newer last value, and at the same ``ts`` (the same point
    sent again, queued or long written) the value seen first stays. A device
    keeps the last values of at most ``device_metric_limit(cfg)`` metrics:
    after each ``add`` the ones whose newest point is the oldest (then the
    lowest names) are forgotten. Without a bound a device sending ever new
    metric names (one valid frame can carry 64 000) grows one stored document
    without end, and on FerretDB an update costs time in proportion to the
    document's fields (seconds at a few thousand), which stalls every write.

Sealing
    A store may write a bucket's summary only once the bucket is closed (it
    can take no more points on time) and read recent buckets point by point
    until then; ``seal(now)`` does that work. Answers never depend on it.

Retention
    ``retain(now)`` deletes buckets that ended more than
    ``telemetry.retention_days`` before ``now`` and devices not seen within
    that time. Implementations run it themselves every
    ``telemetry.retention_interval``; it is public so tests can drive it.
    Nothing relies on server-side TTL indexes (FerretDB v1 has none).

Times are integer milliseconds since the Unix epoch throughout.
"""

from __future__ import annotations

import heapq
import itertools
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from server.config import TelemetryConfig
from server.record import record
from server.store import StoreStatus

MS_PER_DAY: Final = 86_400_000
DEVICE_METRICS: Final = 256  # last values kept per device (at least max_metrics_per_point)


@record
class Point:
    """One validated telemetry point."""

    ts: int  # ms since the epoch
    values: Mapping[str, float]  # metric name -> finite number


@dataclass(frozen=True, slots=True)
class DeviceState:
    """What the store knows about one device."""

    id: str
    last_seen: int  # ms, server time of the last accepted frame
    last_values: Mapping[str, float]  # metric -> value of the newest point (by ts) carrying it


@dataclass(frozen=True, slots=True)
class StepStats:
    """Aggregate of one metric over one step of a query (only steps with points exist)."""

    t: int  # ms, start of the step (a multiple of the step since the epoch)
    min: float
    max: float
    avg: float
    count: int


@dataclass(slots=True)
class MetricStats:
    """Running summary of one metric in one bucket (or one step).

    The sum is kept exactly (``exact_sum``): float addition rounds at every
    step and its result depends on the order of the values, so the memory
    store (arrival order), a Mongo bucket read from its chunks, its summary,
    or points still queued would give averages differing in the last digits,
    and a sum past the float range (two points of 1e308) made ``avg`` inf.
    """

    min: float
    max: float
    exact: int  # the sum of the values, exactly, in units of 2**-SUM_SHIFT
    count: int

    @classmethod
    def of(cls, value: float) -> MetricStats:
        return cls(value, value, exact_sum(value), 1)

    def add(self, value: float) -> None:
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.exact += exact_sum(value)
        self.count += 1

    def merge(self, other: MetricStats) -> None:
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.exact += other.exact
        self.count += other.count

    @property
    def sum(self) -> float:
        """The sum rounded to a float, the largest finite one past the float range
        (FerretDB refuses to store infinities)."""
        try:
            return self.exact / SUM_SCALE
        except OverflowError:
            return sys.float_info.max if self.exact > 0 else -sys.float_info.max

    @property
    def avg(self) -> float:
        """The mean, rounded once: the same whatever the order the values came in."""
        return self.exact / (self.count << SUM_SHIFT)


# Every finite float is a whole number of 2**-1074 (the smallest subnormal), so
# a sum of floats is exactly an int in these units; int / int rounds correctly.
SUM_SHIFT: Final = 1074
SUM_SCALE: Final = 1 << SUM_SHIFT


def exact_sum(value: float) -> int:
    """A finite float as a whole number of 2**-SUM_SHIFT (see ``MetricStats``)."""
    num, den = value.as_integer_ratio()  # den is a power of two, at most 2**1074
    return num << (SUM_SHIFT + 1 - den.bit_length())


def exact_total(values: list[float]) -> int:
    """``sum(map(exact_sum, values))``, mostly at C speed.

    ``math.fsum`` adds exactly and rounds only its result; adding back the
    negated result gives the rounding error, and so on until nothing is left
    (two or three rounds). A sum past the float range takes the slow way.
    """
    total = 0
    negated: list[float] = []
    try:
        while part := math.fsum(itertools.chain(values, negated)):
            total += exact_sum(part)
            negated.append(-part)
    except OverflowError:
        return sum(map(exact_sum, values))
    return total


def sum_parts(exact: int) -> list[float]:
    """Floats, largest first, whose sum is exactly ``exact`` (units of 2**-SUM_SHIFT):
    how a sum is stored where only floats can be (a Mongo bucket summary)."""
    parts: list[float] = []
    while exact:
        try:
            part = exact / SUM_SCALE
        except OverflowError:
            part = sys.float_info.max if exact > 0 else -sys.float_info.max
        parts.append(part)
        exact -= exact_sum(part)
    return parts


class TelemetryStore(Protocol):
    """Per-device time series in buckets; see the module docstring for the contract."""

    async def start(self) -> None:
        """Connect, create indexes (idempotently) and start background tasks.

        Raises:
            EngineError: the server cannot be reached.
        """

    async def close(self) -> None:
        """Write what is queued (within the implementation's deadline), then disconnect."""

    async def add(self, device: str, points: Sequence[Point], seen: int) -> None:
        """Accept validated points of one device (unique ``ts`` within the call).

        ``seen`` is the server time of the frame (ms), recorded as last seen.

        Raises:
            StoreFullError: the write-behind queue cannot take these points now.
            EngineError: the store is not running.
        """

    async def query(
        self, device: str, metric: str, start: int, end: int, step: int
    ) -> list[StepStats]:
        """Downsample ``metric`` of ``device`` over ``[start, end)`` in steps of ``step`` ms.

        Steps are aligned to multiples of ``step`` since the epoch (the first
        and last may be partly outside the range; only points inside count).
        Only steps that contain points are returned, oldest first. ``min``,
        ``max`` and ``avg`` are exact (``avg``: the exact mean rounded once, so
        the same whatever the order the points came in or were read; see
        ``MetricStats``). Callers bound the number of steps.

        Raises:
            EngineError: the server could not be read.
        """

    async def devices(self) -> list[DeviceState]:
        """Every known device (callers filter by what the reader may see).

        Raises:
            EngineError: the server could not be read.
        """

    async def retain(self, now: int) -> int:
        """Apply retention as of ``now`` (ms); returns the number of buckets deleted.

        Raises:
            EngineError: the server could not be reached.
        """

    async def seal(self, now: int) -> int:
        """Summarize what can no longer change as of ``now`` (ms); returns buckets summarized.

        An optimisation only: answers are the same before and after. Stores that
        keep summaries up to date as points arrive return 0. Implementations run
        it themselves; it is public so tests can drive it.

        Raises:
            EngineError: the server could not be reached.
        """

    def status(self) -> StoreStatus:
        """Current health and queue depth; must not do I/O."""


def bucket_start(ts: int, bucket_ms: int) -> int:
    """Start of the bucket holding ``ts``."""
    return ts - ts % bucket_ms


def step_count(start: int, end: int, step: int) -> int:
    """Number of epoch-aligned steps a query over ``[start, end)`` touches."""
    if end <= start:
        return 0
    return (end - 1) // step - start // step + 1


class _Step:
    """One step of a query: the summaries merged into it (``stats``, exact sum)
    and the raw values added (summed once, by ``exact_total``, in ``result``)."""

    __slots__ = ("stats", "values")

    def __init__(self, stats: MetricStats) -> None:
        self.stats = stats
        self.values: list[float] = []


class Downsampler:
    """Aggregates one metric into epoch-aligned steps, from bucket summaries or raw points.

    Usage: for each bucket in range, if ``whole(bucket_start)`` feed its
    summary to ``add_stats``, else feed its points to ``add_value``; then
    ``result()``. A bucket counts as whole when it lies inside ``[start,
    end)`` and inside a single step, so its summary is exactly that step's
    share. Sums are exact (``MetricStats``), so the result does not depend on
    the order of the calls nor on which buckets came as summaries.
    """

    __slots__ = ("_bucket_ms", "_end", "_start", "_step", "_steps")

    def __init__(self, start: int, end: int, step: int, bucket_ms: int) -> None:
        self._start = start
        self._end = end
        self._step = step
        self._bucket_ms = bucket_ms
        self._steps: dict[int, _Step] = {}

    def whole(self, bucket: int) -> bool:
        last = bucket + self._bucket_ms - 1
        return (
            bucket >= self._start
            and last < self._end
            and bucket // self._step == last // self._step
        )

    def add_stats(self, bucket: int, stats: MetricStats) -> None:
        k = bucket // self._step
        cur = self._steps.get(k)
        if cur is None:
            self._steps[k] = _Step(MetricStats(stats.min, stats.max, stats.exact, stats.count))
        else:
            cur.stats.merge(stats)

    def add_value(self, ts: int, value: float) -> None:
        if not self._start <= ts < self._end:
            return
        k = ts // self._step
        cur = self._steps.get(k)
        if cur is None:
            cur = self._steps[k] = _Step(MetricStats(value, value, 0, 0))
        stats = cur.stats
        if value < stats.min:
            stats.min = value
        if value > stats.max:
            stats.max = value
        stats.count += 1
        cur.values.append(value)

    def add_points(self, points: Iterable[tuple[int, float]]) -> None:
        for ts, value in points:
            self.add_value(ts, value)

    def result(self) -> list[StepStats]:
        out = []
        for k in sorted(self._steps):
            step = self._steps[k]
            s = step.stats
            if step.values:
                s.exact += exact_total(step.values)
                step.values = []
            out.append(StepStats(k * self._step, s.min, s.max, s.avg, s.count))
        return out


def device_metric_limit(cfg: TelemetryConfig) -> int:
    """How many metrics' last values a device keeps (module docstring, Devices)."""
    return max(DEVICE_METRICS, cfg.max_metrics_per_point)


def keep_newest(last: dict[str, tuple[int, float]], limit: int) -> list[str]:
    """Forget all but the ``limit`` metrics of ``last`` (metric -> (ts, value)) with the
    newest ``ts``, then the greatest names; return the metrics forgotten."""
    if len(last) <= limit:
        return []
    gone = heapq.nsmallest(len(last) - limit, last, key=lambda m: (last[m][0], m))
    for metric in gone:
        del last[metric]
    return gone


def bucket_range(start: int, end: int, bucket_ms: int) -> tuple[int, int]:
    """First and last bucket start overlapping ``[start, end)`` (``end > start``)."""
    return bucket_start(start, bucket_ms), bucket_start(end - 1, bucket_ms)


def retention_cutoff(now: int, retention_days: float) -> int | None:
    """Buckets ending at or before this (ms) are expired; ``None`` when retention is off."""
    if retention_days <= 0:
        return None
    return now - math.ceil(retention_days * MS_PER_DAY)
