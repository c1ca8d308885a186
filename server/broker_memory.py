"""In-memory ``Broker`` and ``PresenceManager`` for a single Squall process.

Used when ``redis.url`` is not set. Publishing assigns the offset, appends to
history and delivers to this node in one synchronous step, so ordering and
atomicity hold trivially. Memory is bounded per channel by ``history_size``;
streams whose history has expired and whose position has not been touched
for ``meta_ttl`` seconds are dropped by a periodic sweep. Reading history
creates a stream (and fixes its epoch), as in every engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Final

from server.broker import (
    Broker,
    BrokerEvents,
    ClientInfo,
    HistoryPage,
    PresenceManager,
    Publication,
    PublishOptions,
    StreamPosition,
)
from server.errors import StreamMissing

log = logging.getLogger("squall.broker")

DEFAULT_META_TTL: Final = 24 * 3600.0  # seconds a stream position outlives its last use
# idempotency_key results remembered (about 300 bytes each): the oldest go first,
# before their ttl once there are more (a broadcast with a key adds one per channel).
MAX_IDEMPOTENCY_KEYS: Final = 100_000
EVICTION_LOG_INTERVAL: Final = 60.0  # seconds between warnings about early evictions


def new_epoch() -> str:
    return uuid.uuid4().hex[:8]


@dataclass(slots=True)
class _Stream:
    epoch: str
    offset: int = 0
    items: deque[Publication] = field(default_factory=deque)
    expires_at: float = 0.0  # monotonic; history items vanish after this
    touched_at: float = 0.0


class MemoryBroker:
    """Single-process broker; see the module docstring."""

    def __init__(self, *, meta_ttl: float = DEFAULT_META_TTL) -> None:
        self._events: BrokerEvents | None = None
        self._streams: dict[str, _Stream] = {}
        self._subscribed: set[str] = set()
        self._idempotency: OrderedDict[tuple[str, str], tuple[StreamPosition, float]] = (
            OrderedDict()
        )
        self._evicted_logged_at = -EVICTION_LOG_INTERVAL  # time.monotonic() of the last warning
        self._meta_ttl = meta_ttl
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, events: BrokerEvents) -> None:
        self._events = events
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            try:
                await sweeper
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # close() itself was cancelled

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    def _stream(self, channel: str, now: float) -> _Stream:
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream(epoch=new_epoch())
        elif stream.items and stream.expires_at <= now:
            stream.items.clear()
        stream.touched_at = now
        return stream

    async def publish(self, channel: str, data: bytes, opts: PublishOptions) -> StreamPosition:
        now = time.monotonic()
        if opts.idempotency_key:
            seen = self._idempotency.get((channel, opts.idempotency_key))
            if seen is not None and seen[1] > now:
                return seen[0]
        epoch, offset = "", 0
        if opts.history_size > 0 and opts.history_ttl > 0:
            if opts.require_stream:
                known = self._streams.get(channel)
                if known is None or not known.offset:
                    raise StreamMissing(f"stream of {channel!r} has no position")
            stream = self._stream(channel, now)
            stream.offset += 1
            epoch, offset = stream.epoch, stream.offset
        pub = Publication(
            offset=offset,
            epoch=epoch,
            data=data,
            info=opts.info,
            time=int(time.time() * 1000),
            tags=opts.tags,
        )
        if offset:
            stream.items.append(pub)
            while len(stream.items) > opts.history_size:
                stream.items.popleft()
            stream.expires_at = now + opts.history_ttl
        position = StreamPosition(offset, epoch)
        if opts.idempotency_key:
            ttl = opts.history_ttl or 300.0
            self._idempotency[(channel, opts.idempotency_key)] = (position, now + ttl)
            while len(self._idempotency) > MAX_IDEMPOTENCY_KEYS:
                _, (_, expires) = self._idempotency.popitem(last=False)
                if expires > now and now - self._evicted_logged_at >= EVICTION_LOG_INTERVAL:
                    self._evicted_logged_at = now
                    log.warning(
                        "more than %d idempotency keys within their ttl: the oldest are "
                        "forgotten early (a retry of one would publish again)",
                        MAX_IDEMPOTENCY_KEYS,
                    )
        if channel in self._subscribed and self._events is not None:
            self._events.on_publication(channel, pub)
        return position

    async def publish_join(self, channel: str, info: ClientInfo) -> None:
        if channel in self._subscribed and self._events is not None:
            self._events.on_join(channel, info)

    async def publish_leave(self, channel: str, info: ClientInfo) -> None:
        if channel in self._subscribed and self._events is not None:
            self._events.on_leave(channel, info)

    async def publish_control(self, data: bytes) -> None:
        if self._events is not None:
            self._events.on_control(data)

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        stream = self._stream(channel, time.monotonic())
        position = StreamPosition(stream.offset, stream.epoch)
        if limit == 0 or (since is not None and since.epoch not in ("", stream.epoch)):
            return HistoryPage([], position)
        items = list(stream.items)
        if since is not None and reverse:
            items = [p for p in items if p.offset < since.offset]
        elif since is not None:
            items = [p for p in items if p.offset > since.offset]
        if reverse:
            items.reverse()
        if limit is not None and limit > 0:
            items = items[:limit]
        return HistoryPage(items, position)

    async def remove_history(self, channel: str) -> None:
        stream = self._streams.get(channel)
        if stream is not None:
            stream.items.clear()

    async def restore_position(self, channel: str, position: StreamPosition) -> StreamPosition:
        stream = self._streams.get(channel)
        if stream is None or (stream.offset == 0 and not stream.items):
            stream = self._streams[channel] = _Stream(
                epoch=position.epoch, offset=position.offset, touched_at=time.monotonic()
            )
        return StreamPosition(stream.offset, stream.epoch)

    async def ping(self) -> None:
        return None

    async def _sweep_forever(self) -> None:
        interval = min(60.0, self._meta_ttl / 2)
        while True:
            await asyncio.sleep(interval)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """Drop expired history items and streams unused for ``meta_ttl``."""
        for channel in list(self._streams):
            stream = self._streams[channel]
            if stream.items and stream.expires_at <= now:
                stream.items.clear()
            if stream.touched_at + self._meta_ttl <= now and stream.expires_at <= now:
                del self._streams[channel]
        while self._idempotency:
            key, (_, expires) = next(iter(self._idempotency.items()))
            if expires > now:
                break
            del self._idempotency[key]


class MemoryPresenceManager:
    """Presence for a single process; entries expire like Redis ones would."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, tuple[ClientInfo, float]]] = {}

    def _live(self, channel: str) -> dict[str, tuple[ClientInfo, float]]:
        entries = self._entries.get(channel)
        if not entries:
            return {}
        now = time.monotonic()
        dead = [cid for cid, (_, exp) in entries.items() if exp <= now]
        for cid in dead:
            del entries[cid]
        if not entries:
            del self._entries[channel]
        return entries

    async def add_presence(self, channel: str, info: ClientInfo, ttl: float) -> None:
        self._entries.setdefault(channel, {})[info.client] = (info, time.monotonic() + ttl)

    async def remove_presence(self, channel: str, client_id: str) -> None:
        entries = self._entries.get(channel)
        if entries is not None:
            entries.pop(client_id, None)
            if not entries:
                del self._entries[channel]

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        return {cid: info for cid, (info, _) in self._live(channel).items()}

    async def presence_stats(self, channel: str) -> tuple[int, int]:
        entries = self._live(channel)
        return len(entries), len({info.user for info, _ in entries.values()})


def _conforms(b: MemoryBroker, p: MemoryPresenceManager) -> tuple[Broker, PresenceManager]:
    return b, p
