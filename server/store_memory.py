"""In-memory ``Store``: the default when ``mongodb.url`` is not set.

It keeps the same contract as ``MongoStore`` (idempotent by position,
retention by size and age) but lives only as long as the process, so it
gives persistent namespaces deep history without surviving restarts.
Expired publications are skipped by every read and deleted at the channel's
next ``append``.

Publications may be appended out of offset order (concurrent publishes
complete in any order). A channel's publications are kept in acceptance
order, except that one arriving after higher offsets of its own epoch is
put before them: then the front is always the oldest (what size retention
drops) and ``latest`` is never an offset below one already accepted.
"""

from __future__ import annotations

import math
import time

from server.broker import Publication, StreamPosition
from server.store import PersistOptions, Store, StoreStatus, page_bounds, removed_by


class MemoryStore:
    def __init__(self) -> None:
        # channel -> {(epoch, offset): (expires_at, publication)} in arrival order,
        # offsets ascending within the trailing run of one epoch (module docstring);
        # expires_at is time.monotonic() based, inf without a ttl
        self._channels: dict[str, dict[tuple[str, int], tuple[float, Publication]]] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def append(self, channel: str, pub: Publication, opts: PersistOptions) -> None:
        items = self._channels.setdefault(channel, {})
        key = (pub.epoch, pub.offset)
        if key in items:
            return  # idempotent retry
        now = time.monotonic()
        # Late (a higher offset of its epoch came first): it goes before those.
        later = []
        for k in reversed(items):
            if k[0] != pub.epoch or k[1] < pub.offset:
                break
            later.append(k)
        moved = [(k, items.pop(k)) for k in reversed(later)]
        items[key] = (now + opts.ttl if opts.ttl > 0 else math.inf, pub)
        items.update(moved)
        while items:  # expired ones at the front (reads skip any others)
            first = next(iter(items))
            if items[first][0] > now:
                break
            del items[first]
        while opts.size > 0 and len(items) > opts.size:
            del items[next(iter(items))]

    async def read_since(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> list[Publication]:
        latest = await self.latest(channel)
        if latest is None:
            return []
        epoch = since.epoch if since is not None else latest.epoch
        low, high = page_bounds(since, reverse)
        top = math.inf if high is None else high
        items = self._channels[channel].values()
        now = time.monotonic()
        pubs = sorted(
            (p for exp, p in items if p.epoch == epoch and low < p.offset < top and exp > now),
            key=lambda p: p.offset,
            reverse=reverse,
        )
        return pubs if limit is None else pubs[:limit]

    async def latest(self, channel: str) -> StreamPosition | None:
        items = self._channels.get(channel)
        if not items:
            return None
        # The last accepted names the epoch; the offset is that epoch's highest
        # (a late publication of an older epoch may follow its higher offsets).
        epoch = next(reversed(items))[0]
        return StreamPosition(max(o for e, o in items if e == epoch), epoch)

    async def resume(self, channel: str) -> StreamPosition | None:
        return await self.latest(channel)  # nothing outlives the process: no crash to skip

    async def remove(self, channel: str, *, through: StreamPosition | None = None) -> None:
        items = self._channels.get(channel)
        if items is None:
            return
        for key in [k for k in items if removed_by(*k, through)]:
            del items[key]
        if not items:
            del self._channels[channel]

    def status(self) -> StoreStatus:
        return StoreStatus(ready=True)


def _conforms(s: MemoryStore) -> Store:
    return s
