"""Device telemetry: point validation, per-device rate limits, and ingest.

Both ingest paths end in ``TelemetryIngest.ingest``: a WebSocket ``publish``
to a channel of a namespace with ``telemetry: true`` (``Client``), and
``POST /api/telemetry`` (``handlers.telemetry``). The storage contract is in
``server.telemetry_store``.

Tokens
    A *device* token carries ``"device": true``; its ``sub`` is the device id
    and its channel is ``<namespace>:<sub>`` (``publish_own_channel_only``
    enforces that). A *dashboard* token carries the namespace's
    ``subscribe_claim`` (``devices`` in the shipped config): a list of glob
    patterns of the device ids its holder may watch and query.

Frames
    A frame is one point or a list of 1 to ``telemetry.max_points_per_frame``
    points. A point is ``{"ts": <ms since the epoch>, "values": {<metric>:
    <number>, ...}}``; without ``ts`` the server time is used. Nothing else
    may be in a point. Each point is validated on its own:

    * ``values`` is a non-empty object of at most ``max_metrics_per_point``
      metrics, named by 1-64 of ``A-Z a-z 0-9 _ . -``;
    * every value is a finite number (``true``/``false`` are not numbers);
    * ``ts`` is a number within ``max_skew`` seconds of server time (it is
      truncated to whole milliseconds), and no other point of the frame has
      the same ``ts``.

    Invalid points are rejected with their index and a reason and never
    stored; the valid ones of the same frame are accepted.

Order of checks (each refusal stops the frame, nothing is stored)
    1. permission: the token is a device token (else 103 / HTTP 403);
    2. shape: 1..max_points_per_frame points (else 107 / HTTP 400);
    3. rate: the device's token bucket (``max_points_per_second``, burst
       ``max_points_burst``) holds a token per point of the frame, valid or
       not (else 111 / HTTP 429 with ``Retry-After``);
    4. validation: at least one valid point (else 107 / HTTP 400, listing the
       reasons);
    5. the store accepts the points (else 1001 / HTTP 503);
    6. the normalised accepted points are published on the device's channel
       as ``{"points": [{"ts": ms, "values": {...}}, ...]}``.

    The rate limit is per node (in memory); devices reconnecting to another
    node start with a full bucket there.

Idempotency
    The store keys points by ``(device, ts)``: a retried frame counts once.
    It is still published again, so live subscribers may see a point twice;
    charts that key by ``ts`` do not notice. Points without ``ts`` get a new
    server time on every try, so devices that retry should send ``ts``.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

import orjson

from server import codes
from server.broker import ClientInfo, StreamPosition
from server.config import ChannelOptions, TelemetryConfig
from server.errors import ClientError, EngineError, StoreFullError
from server.record import record
from server.telemetry_store import Point, TelemetryStore

log = logging.getLogger("squall.telemetry")

DEVICE_CLAIM: Final = "device"
DEFAULT_DEVICES_CLAIM: Final = "devices"  # used when the namespace has no subscribe_claim
METRIC_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # fullmatch
POINT_FIELDS: Final = frozenset({"ts", "values"})
MAX_RATE_KEYS: Final = 100_000  # devices whose rate state is kept per node (LRU beyond)
MAX_REASONS_IN_MESSAGE: Final = 10  # per-point reasons quoted in a WebSocket error message
MAX_VALID_NAMES: Final = 10_000  # metric names remembered as valid (a set, emptied when full)

# Metric names that passed METRIC_NAME_RE: devices send the same few names in
# every point, and a set lookup is several times cheaper than the match.
_valid_names: set[str] = set()


class PublishFn(Protocol):
    def __call__(
        self, channel: str, data: bytes, opts: ChannelOptions, *, info: ClientInfo | None = ...
    ) -> Awaitable[StreamPosition]: ...


@record
class Rejection:
    """One refused point: its index in the frame and why."""

    index: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "reason": self.reason}


@record
class IngestResult:
    accepted: list[Point]
    rejected: list[Rejection]


class RateLimited(ClientError):
    """Error 111: the device is over its point rate; ``retry_after`` is in seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(codes.TOO_MANY_REQUESTS)
        self.retry_after = retry_after


class InvalidFrame(ClientError):
    """Error 107 for a frame without a single valid point; carries every rejection."""

    def __init__(self, message: str, rejected: list[Rejection]) -> None:
        super().__init__(codes.BAD_REQUEST, message)
        self.rejected = rejected


def is_device(claims: Mapping[str, Any]) -> bool:
    """Whether a token's claims make it a device token."""
    return claims.get(DEVICE_CLAIM) is True


def frame_points(data: Any, max_points: int) -> list[Any]:
    """The frame as a list of raw points.

    Raises:
        InvalidFrame: an empty list, or more than ``max_points`` points.
    """
    if not isinstance(data, list):
        return [data]
    if not data:
        raise InvalidFrame("no points", [])
    if len(data) > max_points:
        raise InvalidFrame(f"too many points in one frame ({len(data)} > {max_points})", [])
    return data


def validate_point(raw: Any, *, now: int, max_skew_ms: int, max_metrics: int) -> Point | str:
    """A valid ``Point``, or the reason ``raw`` is not one."""
    if not isinstance(raw, dict):
        return "not an object"
    if not POINT_FIELDS.issuperset(raw):
        key = next(k for k in raw if k not in POINT_FIELDS)
        return f"unknown field {str(key)[:64]!r}"
    ts_raw = raw.get("ts")
    if ts_raw is None:
        ts = now
    else:
        if isinstance(ts_raw, bool) or not isinstance(ts_raw, int | float):
            return "ts must be a number (milliseconds since the epoch)"
        if not math.isfinite(ts_raw):
            return "ts must be finite"
        ts = int(ts_raw)
        if abs(ts - now) > max_skew_ms:
            return f"ts {ts} is more than {max_skew_ms // 1000}s away from server time {now}"
    values = raw.get("values")
    if values is None:
        return "values missing"
    if not isinstance(values, dict):
        return "values must be an object"
    if not values:
        return "values is empty"
    if len(values) > max_metrics:
        return f"too many metrics ({len(values)} > {max_metrics})"
    out: dict[str, float] = {}
    names = _valid_names
    for name, value in values.items():
        if name not in names:
            if not isinstance(name, str) or not METRIC_NAME_RE.fullmatch(name):
                return f"invalid metric name {str(name)[:70]!r} (1-64 of A-Z a-z 0-9 _ . -)"
            if len(names) >= MAX_VALID_NAMES:
                names.clear()
            names.add(name)
        kind = type(value)  # exact types first: what JSON decoders give
        if kind is float:
            number = value
        elif kind is int:
            try:
                number = float(value)
            except OverflowError:
                return f"metric {name!r} is not finite"
        elif isinstance(value, bool):
            return f"metric {name!r} is a boolean, not a number"
        elif isinstance(value, int | float):
            number = float(value)
        else:
            return f"metric {name!r} is not a number"
        if number - number != 0.0:  # inf - inf and nan - nan are nan
            return f"metric {name!r} is not finite"
        # -0.0 + 0.0 is 0.0: FerretDB stores -0.0 as 0.0, so every store and
        # the live publication see the same value.
        out[name] = number + 0.0
    return Point(ts, out)


def validate_frame(
    raw_points: list[Any], *, now: int, cfg: TelemetryConfig
) -> tuple[list[Point], list[Rejection]]:
    """Validate every point of a frame (see the module docstring)."""
    max_skew_ms = int(cfg.max_skew * 1000)
    accepted: list[Point] = []
    rejected: list[Rejection] = []
    seen: set[int] = set()
    for index, raw in enumerate(raw_points):
        result = validate_point(
            raw, now=now, max_skew_ms=max_skew_ms, max_metrics=cfg.max_metrics_per_point
        )
        if isinstance(result, str):
            rejected.append(Rejection(index, result))
        elif result.ts in seen:
            rejected.append(Rejection(index, f"duplicate ts {result.ts} in this frame"))
        else:
            seen.add(result.ts)
            accepted.append(result)
    return accepted, rejected


def points_payload(points: list[Point]) -> bytes:
    """The publication delivered to subscribers: the normalised accepted points."""
    return orjson.dumps({"points": [{"ts": p.ts, "values": p.values} for p in points]})


class RateLimiter:
    """A token bucket per key (device): ``rate`` tokens per second, at most ``burst``.

    Keys live in an LRU of ``max_keys``; an evicted key starts again full,
    which only helps a device that has been quiet longest.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = MAX_RATE_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str, n: int) -> float:
        """Take ``n`` tokens: ``0.0`` when taken, else the seconds until they could be.

        Nothing is taken from a refused request. A request over the burst can
        never pass and returns ``math.inf``.
        """
        if self._rate <= 0:
            return 0.0
        if n > self._burst:
            return math.inf
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens >= n:
            tokens -= n
            wait = 0.0
        else:
            wait = (n - tokens) / self._rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait


class TelemetryIngest:
    """Runs the ingest steps of the module docstring for both transports (one per hub)."""

    def __init__(self, cfg: TelemetryConfig, store: TelemetryStore, publish: PublishFn) -> None:
        self.cfg = cfg
        self.store = store
        self._publish = publish
        self.limiter_burst = cfg.max_points_burst or cfg.max_points_per_frame
        self.limiter = RateLimiter(cfg.max_points_per_second, self.limiter_burst)
        self.points_accepted = 0
        self.points_rejected = 0

    async def ingest(
        self,
        device: str,
        claims: Mapping[str, Any],
        data: Any,
        *,
        channel: str,
        opts: ChannelOptions,
        info: ClientInfo | None,
    ) -> IngestResult:
        """Validate, rate-limit, store and publish one frame of ``device``.

        Raises:
            ClientError: 103 not a device token; 107 (``InvalidFrame``) bad
                shape or no valid point; 111 (``RateLimited``) over the rate;
                1001 the store cannot take the points; 100 the broker failed.
        """
        if not is_device(claims):
            raise ClientError(codes.PERMISSION_DENIED, "not a device token")
        if device in (".", ".."):
            # Its history URL, /api/devices/<id>/telemetry, would be another path in
            # every browser (they resolve "." and ".." segments, %2E too).
            raise ClientError(codes.BAD_REQUEST, f"device id {device!r} cannot be used")
        raw_points = frame_points(data, self.cfg.max_points_per_frame)
        if self.cfg.max_points_per_second > 0 and len(raw_points) > self.limiter_burst:
            # Never passes, however long the device waits: refused for good (107), not
            # 111, whose "temporary" makes devices and SDKs send it again and again.
            raise InvalidFrame(
                f"more points in one frame than telemetry.max_points_burst allows "
                f"({len(raw_points)} > {self.limiter_burst})",
                [],
            )
        wait = self.limiter.take(device, len(raw_points))
        if wait:
            log.info(
                "telemetry rate limited device=%s points=%d retry_after=%.2fs",
                device,
                len(raw_points),
                wait,
            )
            raise RateLimited(wait)
        now = int(time.time() * 1000)
        accepted, rejected = validate_frame(raw_points, now=now, cfg=self.cfg)
        self.points_rejected += len(rejected)
        if not accepted:
            log.info(
                "telemetry frame refused device=%s points=%d first_reason=%s",
                device,
                len(rejected),
                rejected[0].reason,
            )
            raise InvalidFrame(_reasons_message(rejected), rejected)
        if rejected:
            log.debug("telemetry points rejected device=%s rejected=%d", device, len(rejected))
        try:
            await self.store.add(device, accepted, now)
        except StoreFullError as exc:
            log.warning("telemetry store refused points device=%s: %s", device, exc)
            raise ClientError(codes.STORE_UNAVAILABLE, "telemetry store queue is full") from None
        except EngineError as exc:
            log.warning("telemetry store add failed device=%s: %s", device, exc)
            raise ClientError(codes.STORE_UNAVAILABLE) from None
        self.points_accepted += len(accepted)
        await self._publish(channel, points_payload(accepted), opts, info=info)
        return IngestResult(accepted, rejected)


def _reasons_message(rejected: list[Rejection]) -> str:
    shown = "; ".join(f"#{r.index}: {r.reason}" for r in rejected[:MAX_REASONS_IN_MESSAGE])
    more = len(rejected) - MAX_REASONS_IN_MESSAGE
    return f"no valid points: {shown}" + (f"; and {more} more" if more > 0 else "")
