"""``MongoStore``: durable publications in MongoDB (or FerretDB), written behind.

Write path
    ``append`` BSON-encodes the document at once, so an invalid or oversized
    publication is refused right there with ``StoreRejectedError`` (the
    caller's bug, not an outage), then puts it on a bounded in-memory queue and
    returns. ``StoreFullError`` when the queue holds ``queue_size``
    publications. One flusher task writes the queue head with
    ``insert_many(ordered=False)`` once ``batch_size`` publications wait or the
    oldest has waited ``flush_interval``; a batch leaves the queue only after
    the server acknowledged it, so batches reach the server in queue order.
    Duplicate-key errors count as written (a retry after a lost
    acknowledgement, STYLE.md 16). Any other failure keeps the batch, marks
    the store not ready and retries with capped, jittered exponential
    backoff until the server is back. A document the server refuses outright
    (a per-document write error other than a duplicate key) is dropped and
    logged at ERROR with its position: retrying it would stall every channel.

Read path
    ``read_since`` and ``latest`` merge the queue with the collection (the
    queue is snapshotted before the query, then deduplicated by position),
    so history and recovery see a publication as soon as ``append`` returned.
    ``latest`` names the epoch of the most recently *accepted* publication of
    the channel (as ``MemoryStore`` does) and the highest offset of that epoch,
    queued or stored: not the offset of the last one accepted, because
    concurrent publishes (through Redis, or from several nodes) can reach the
    store out of offset order, and a ``latest`` that went back would make a
    restarted node hand out an offset that is taken (the new publication's
    insert would then hit the duplicate key and be lost as "already stored").

Documents (collection ``MongoConfig.collection``)::

    {_id: ObjectId, channel: str, epoch: str, offset: int64,
     data: BinData(0),                 # the raw JSON bytes, exactly as given
     info: {user, client, conn_info: BinData|absent, chan_info: BinData|absent}
           | absent,
     tags: [{k: str, v: str}, ...] | absent,
     time: int64 (unix ms, from the broker), created_at: date (accepted at),
     expire_at: date | absent}        # created_at + PersistOptions.ttl

    ``data`` stays binary so it round-trips byte for byte (no re-encoding of
    numbers or key order). Tags are an array of pairs, not a subdocument,
    because tag keys may contain ``.`` or start with ``$``; pairs are
    documents, not arrays, because FerretDB v1 rejects nested arrays.

Indexes, created idempotently by ``start``
    ``channel_epoch_offset`` unique (channel, epoch, offset): idempotent
    writes, and serves ``read_since`` (equality on channel and epoch, range
    and sort on offset; also the top offset of an epoch, ``latest``).
    ``channel_recent`` (channel, created_at -1, offset -1): the channel's
    most recently accepted document, whose epoch is the current one, and
    acceptance order in size trimming. ``expire_at``: a
    TTL index (``expireAfterSeconds: 0``, each document carries its own
    deadline because ``ttl`` differs per channel) where the server supports
    it; FerretDB v1 answers NotImplemented, so there it is a plain index and
    a background pass deletes expired documents.

Retention
    Reads never return a publication past its ``expire_at``. A background
    pass every ``retention_interval`` deletes up to ``retention_batch``
    expired documents (when there is no TTL index) and trims up to
    ``retention_batch`` channels, written to since the last pass, to their
    newest ``PersistOptions.size`` publications: the highest offsets of the
    current epoch, then (while that has fewer) those of older epochs, most
    recently accepted first. Offsets, not acceptance order, rank a stream's
    publications because they may be accepted out of order.

Start-up
    A step that times out or loses its connection on a server that was
    reached (an index build on a busy server, say) is tried again, up to
    ``START_ATTEMPTS`` in all with the write retries' backoff between them;
    a server that cannot be selected at all fails the start at once. Every
    step is idempotent, the marker's included (it carries this start's id,
    so a write applied before its answer was lost is not taken for a crash).

Shutdown
    ``close`` wakes the flusher from a retry backoff (the server may be back
    by then) and lets it go on retrying, from ``retry_delay`` again, until
    ``shutdown_flush_timeout``.

Crashes
    A killed process loses its queue, and the offsets it handed out to those
    publications were delivered: a new process that continued the stream from
    the stored top would give them again to other publications, and a client
    that saw a lost one would miss its namesake with ``recovered: true``. So
    each node keeps a marker ``{_id: node, running, crashes}`` in
    ``<collection>_writers``: ``start`` sets ``running`` and, when it finds it
    still set (the previous process never closed), appends the time to
    ``crashes``; ``close`` clears it once the queue is written. ``resume``
    moves a channel's stored top past ``queue_size`` offsets (the most a
    process can have handed out unwritten) for each crash after the
    channel's last stored publication: such a stream continues after a gap,
    and recovery across it answers ``recovered: false``. Markers are per node
    name (``server.name``): nodes sharing a database need distinct names.

FerretDB v1 (SQLite backend) pushes only ``_id`` equality down to SQLite:
every other filter and sort runs over a full scan, so on FerretDB the
indexes above enforce uniqueness but do not speed reads up. ``explain_read``
shows what the server does with the exact history query.

Errors: driver exceptions become ``EngineError`` here; ``status()`` reports
the last failure. The URL (which may carry a password) is never logged.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

import bson
from bson import ObjectId
from bson.errors import InvalidDocument
from bson.raw_bson import RawBSONDocument

from server.backoff import Availability, Backoff, raise_if_cancelling
from server.broker import ClientInfo, Publication, StreamPosition
from server.config import MongoConfig, check_mongo
from server.errors import ConfigError, EngineError, StoreFullError, StoreRejectedError
from server.store import PersistOptions, Store, StoreStatus, page_bounds, removed_by

log = logging.getLogger("squall.store.mongo")
_T = TypeVar("_T")

HISTORY_INDEX: Final = "channel_epoch_offset"
WRITERS_SUFFIX: Final = "_writers"  # collection of the per-node markers (module docstring, Crashes)
MAX_CRASHES: Final = 64  # crash times a marker keeps
RECENT_INDEX: Final = "channel_recent"
EXPIRE_INDEX: Final = "expire_at"
DUPLICATE_KEY_CODES: Final = frozenset({11000, 11001, 12582})
# createIndexes answers meaning "no TTL index here": NotImplemented (FerretDB v1),
# InvalidIndexSpecificationOption, CannotCreateIndex, IndexOptionsConflict.
NO_TTL_CODES: Final = frozenset({238, 197, 67, 85})
START_ATTEMPTS: Final = 3  # tries of a start-up step that timed out (module docstring)
STATS_LOG_INTERVAL: Final = 10.0  # seconds between DEBUG write-latency summaries
# Offsets are unsigned 64-bit on the wire but BSON integers are signed: no stored
# offset is above this, and PyMongo cannot send a larger bound (OverflowError).
MAX_STORED_OFFSET: Final = 2**63 - 1
_PROJECTION: Final = {"_id": 0, "offset": 1, "epoch": 1, "data": 1, "info": 1, "tags": 1, "time": 1}


@dataclass(slots=True)
class _Pending:
    """One accepted publication waiting for the flusher."""

    channel: str
    pub: Publication
    doc: RawBSONDocument
    size: int  # PersistOptions.size, applied once written
    expire_at: datetime | None
    accepted: float  # time.monotonic()
    created_at: datetime  # as stored


@dataclass(frozen=True, slots=True)
class _TrimMark:
    """A channel to trim to ``size``: the last publication of it written here."""

    size: int
    epoch: str  # the current epoch, as far as this node knows
    created_at: datetime


def start_transient(exc: BaseException) -> bool:
    """Whether a start-up step's failure is worth another try.

    A timeout or a dropped connection on a server that was selected is; a server
    that cannot be selected at all (unreachable, wrong port) is not: the start
    fails at once, as documented.
    """
    from pymongo.errors import AutoReconnect, ExecutionTimeout, ServerSelectionTimeoutError

    if isinstance(exc, ServerSelectionTimeoutError):
        return False
    return isinstance(exc, AutoReconnect | ExecutionTimeout)


async def start_steps(
    what: str,
    backoff: Backoff,
    steps: Callable[[], Awaitable[_T]],
    describe: Callable[[BaseException], str],
) -> _T:
    """Run an engine's idempotent start-up ``steps``, again after a transient failure.

    Up to ``START_ATTEMPTS`` runs, each retry logged at WARNING; the last failure
    (or the first one that is not transient) is raised as it is. ``backoff`` paces
    the retries and is reset when they are over.
    """
    try:
        for attempt in range(1, START_ATTEMPTS):
            try:
                return await steps()
            except Exception as exc:
                if not start_transient(exc):
                    raise
                delay = backoff.next()
                log.warning(
                    "%s: start-up step failed (attempt %d of %d), trying again in %.2fs error=%s",
                    what,
                    attempt,
                    START_ATTEMPTS,
                    delay,
                    describe(exc),
                )
                await asyncio.sleep(delay)
        return await steps()  # the last try: whatever it raises ends the start
    finally:
        backoff.reset()


def check_url(url: str) -> None:
    """Refuse a ``mongodb.url`` the driver cannot parse, as a configuration error.

    Without I/O: a ``mongodb+srv://`` URL needs a DNS lookup to be parsed whole, so
    only its scheme is checked here; the lookup happens when the store starts.
    """
    from pymongo.errors import ConfigurationError
    from pymongo.uri_parser import parse_uri

    if url.startswith("mongodb+srv://"):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown options: the driver warns itself later
            parse_uri(url, warn=True)
    except (ConfigurationError, ValueError) as exc:
        # The driver's messages name no part of the URL (which may hold a password).
        raise ConfigError(f"mongodb.url: {exc}") from None


class _Client:
    """The one place where AsyncMongoClient and Motor differ; both are imported lazily.

    Collections, cursors and their methods (``insert_many``, ``find(...).to_list``,
    ``find_one``, ``delete_many``, ``create_index``, ``command``) are awaited the
    same way with either driver; only construction and ``close`` differ.
    """

    def __init__(self, cfg: MongoConfig) -> None:
        ms = max(1, int(cfg.timeout * 1000))
        options: dict[str, Any] = {
            "serverSelectionTimeoutMS": ms,
            "connectTimeoutMS": ms,
            "socketTimeoutMS": ms,
            "tz_aware": True,
            "appname": "squall",
        }
        self.driver = cfg.driver
        if cfg.driver == "motor":
            from motor.motor_asyncio import AsyncIOMotorClient  # optional driver

            self.client: Any = AsyncIOMotorClient(cfg.url, **options)
        else:
            from pymongo import AsyncMongoClient

            self.client = AsyncMongoClient(cfg.url, **options)
        self.db: Any = self.client[cfg.database]
        self.coll: Any = self.db[cfg.collection]
        self.writers: Any = self.db[cfg.collection + WRITERS_SUFFIX]

    async def close(self) -> None:
        if self.driver == "motor":
            self.client.close()  # Motor: a plain method
        else:
            await self.client.close()


class MongoStore:
    """Write-behind ``Store`` over MongoDB or FerretDB; see the module docstring."""

    def __init__(self, cfg: MongoConfig, *, node: str = "") -> None:
        check_mongo(cfg)
        check_url(cfg.url)
        self._cfg = cfg
        self._node = node  # the marker's _id (module docstring, Crashes)
        self._start_id = ObjectId()  # this process's start, in its marker (Start-up)
        self._crashes: list[datetime] = []  # of every node on this database, as of start
        # Set by an outage: the server may come back without this store's indexes and
        # marker (wiped, or a new one), so the next batch or ping creates them again.
        self._recreate = False
        self._client: _Client | None = None
        self._queue: deque[_Pending] = deque()
        # channel -> {(epoch, offset): item}, in acceptance order (for merged reads)
        self._pending: dict[str, dict[tuple[str, int], _Pending]] = {}
        self._trim: dict[str, _TrimMark] = {}  # channels written since the last pass
        self._write_lock = asyncio.Lock()  # one writer: flusher batch or remove()
        self._wakeup = asyncio.Event()  # something was queued (or close started)
        self._batch_ready = asyncio.Event()  # a full batch waits (or close started)
        self._drained = asyncio.Event()
        self._drained.set()
        self._stop = asyncio.Event()  # background tasks return at their next step
        self._close_started = asyncio.Event()  # cuts the flusher's retry backoff short
        self._backoff = Backoff(cfg.retry_delay, cfg.retry_max_delay)
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closing = False
        self._ttl_index = False
        self._avail = Availability(log, "mongo store", "publications")
        self._last_latency = 0.0
        self._written = 0
        self._rejected = 0
        self._retries = 0
        self._stats = [0, 0, 0.0, 0.0]  # batches, documents, latency sum, latency max
        self._stats_logged = time.monotonic()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Connect, create indexes (idempotently) and start the background tasks.

        Raises:
            EngineError: the server cannot be reached or refused an index.
        """
        if self._started:
            return
        try:
            self._client = _Client(self._cfg)  # raises on a malformed URL
            client = self._client

            async def steps() -> list[datetime]:
                await self._create_indexes(client.coll)
                return await self._register(client.writers)

            self._crashes = await start_steps("mongo store", self._backoff, steps, self._describe)
        except Exception as exc:
            if self._client is not None:
                await self._client.close()
                self._client = None
            raise EngineError(f"mongo store: cannot start: {self._describe(exc)}") from None
        self._started = True
        self._mark_up()
        self._tasks = [
            asyncio.create_task(self._flush_forever(), name="squall-mongo-flusher"),
            asyncio.create_task(self._retention_forever(), name="squall-mongo-retention"),
        ]
        for task in self._tasks:
            task.add_done_callback(_report_death(log))
        log.info(
            "mongo store started driver=%s hosts=%s database=%s collection=%s ttl_index=%s",
            self._cfg.driver,
            _hosts(self._cfg.url),
            self._cfg.database,
            self._cfg.collection,
            self._ttl_index,
        )

    async def close(self) -> None:
        """Write what is queued within ``shutdown_flush_timeout``, then disconnect. Idempotent."""
        if self._closing:
            return
        self._closing = True
        # A flusher sleeping in its retry backoff retries at once (the server may
        # be back) and, failing again, from retry_delay on: within the deadline.
        self._backoff.reset()
        self._close_started.set()
        self._wakeup.set()
        self._batch_ready.set()
        if self._started and self._queue:
            await _wait(self._drained, self._cfg.shutdown_flush_timeout)
        await self._stop_tasks()
        if self._queue:
            log.error(
                "mongo store closed with %d accepted publications not written error=%s",
                len(self._queue),
                self._avail.error or "shutdown flush timeout",
            )
        elif self._started and self._client is not None:
            await self._unregister(self._client.writers)
        if self._client is not None:
            await self._client.close()
            self._client = None
        self._avail.ready = False
        self._avail.error = "closed"

    async def _stop_tasks(self) -> None:
        # Tasks are asked to stop rather than cancelled: cancelling PyMongo while it
        # opens a connection leaks the socket. Each driver call ends within
        # ``timeout``, so asking is enough; cancelling is the fallback.
        self._stop.set()
        self._wakeup.set()
        self._batch_ready.set()
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        _, stuck = await asyncio.wait(tasks, timeout=self._cfg.timeout + 1.0)
        for task in stuck:
            log.warning("mongo store task did not stop; cancelling task=%s", task.get_name())
            task.cancel()
        if stuck:
            await asyncio.wait(stuck, timeout=1.0)

    # -- Store -----------------------------------------------------------------

    async def append(self, channel: str, pub: Publication, opts: PersistOptions) -> None:
        """Accept one publication; it is written in the background.

        Raises:
            StoreRejectedError: the document is invalid or larger than ``max_document_bytes``.
            StoreFullError: ``queue_size`` publications are already waiting.
            EngineError: the store is not started or already closed.
        """
        if not self._started or self._closing:
            raise EngineError("mongo store is not running")
        key = (pub.epoch, pub.offset)
        waiting = self._pending.get(channel)
        if waiting is not None and key in waiting:
            return  # idempotent: the same position is already queued
        item = self._encode(channel, pub, opts)
        if len(self._queue) >= self._cfg.queue_size:
            raise StoreFullError(
                f"mongo store queue full: {len(self._queue)} publications not yet written"
            )
        self._queue.append(item)
        self._pending.setdefault(channel, {})[key] = item
        self._drained.clear()
        self._wakeup.set()
        if len(self._queue) >= self._cfg.batch_size:
            self._batch_ready.set()

    async def read_since(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> list[Publication]:
        # Snapshot the queue before any await: whatever leaves it during the
        # query was written before being removed, so the query or the snapshot
        # has it.
        queued = list(self._pending.get(channel, {}).values())
        if since is None:
            epoch = queued[-1].pub.epoch if queued else await self._db_epoch(channel)
            if epoch is None:
                return []
        else:
            epoch = since.epoch
        if limit == 0:
            return []
        low, high = page_bounds(since, reverse)
        now = datetime.now(UTC)
        query, sort = _history_query(channel, epoch, low, high, now, reverse)
        docs = await self._run(
            self._coll().find(query, _PROJECTION, sort=sort, limit=limit or 0).to_list(None)
        )
        found = {int(d["offset"]): _decode(d) for d in docs}
        for item in queued:
            p = item.pub
            if p.epoch != epoch or p.offset <= low or (high is not None and p.offset >= high):
                continue
            if not _expired(item.expire_at, now):
                found.setdefault(p.offset, p)
        pubs = [found[o] for o in sorted(found, reverse=reverse)]
        return pubs if limit is None else pubs[:limit]

    async def latest(self, channel: str) -> StreamPosition | None:
        queued = list(self._pending.get(channel, {}).values())  # snapshot before the queries
        # The last accepted publication names the epoch; the offset is the
        # highest of that epoch, queued or stored: publications may be accepted
        # out of offset order, and a queued retry of a stored one must not pull
        # the offset back either.
        epoch = queued[-1].pub.epoch if queued else await self._db_epoch(channel)
        if epoch is None:
            return None
        top = await self._db_top(channel, epoch)
        for item in queued:
            if item.pub.epoch == epoch and (top is None or item.pub.offset > top):
                top = item.pub.offset
        return None if top is None else StreamPosition(top, epoch)

    async def resume(self, channel: str) -> StreamPosition | None:
        """``latest``, moved past the offsets crashed processes may have handed out unwritten.

        ``queue_size`` offsets for each crash (module docstring, Crashes) after
        the channel's last stored publication; none when this process has
        queued some for it (then it has continued the stream already).
        """
        if not self._crashes or self._pending.get(channel):
            return await self.latest(channel)
        query, projection, sort = _recent_query(channel)
        recent = await self._run(self._coll().find_one(query, projection, sort=sort))
        if recent is None:
            return None
        epoch = str(recent["epoch"])
        top = await self._db_top(channel, epoch)
        if top is None:
            return None
        crashes = sum(1 for at in self._crashes if at > recent["created_at"])
        return StreamPosition(top + crashes * self._cfg.queue_size, epoch)

    async def remove(self, channel: str, *, through: StreamPosition | None = None) -> None:
        """Drop the channel's queued and stored publications (``through``: up to it).

        Raises:
            EngineError: the server could not be reached (queued ones are gone anyway).
        """
        async with self._write_lock:  # not while a batch holding this channel is in flight
            pending = self._pending.get(channel)
            if pending is not None:
                dropped = [key for key in pending if removed_by(*key, through)]
                for key in dropped:
                    del pending[key]
                if not pending:
                    del self._pending[channel]
                if dropped:
                    self._queue = deque(
                        p
                        for p in self._queue
                        if p.channel != channel
                        or not removed_by(p.pub.epoch, p.pub.offset, through)
                    )
                    if not self._queue:
                        self._drained.set()
            query: dict[str, Any] = {"channel": channel}
            if through is None:
                self._trim.pop(channel, None)
            else:
                query["$or"] = [
                    {"epoch": {"$ne": through.epoch}},
                    {"offset": {"$lte": through.offset}},
                ]
            await self._run(self._coll().delete_many(query))

    def status(self) -> StoreStatus:
        oldest = time.monotonic() - self._queue[0].accepted if self._queue else 0.0
        dead = _stopped_task(self._tasks)
        return StoreStatus(
            ready=self._avail.ready and not dead,
            queue_depth=len(self._queue),
            queue_limit=self._cfg.queue_size,
            last_write_latency=self._last_latency,
            error=dead or ("" if self._avail.ready else self._avail.error),
            extra={
                "driver": self._cfg.driver,
                "database": self._cfg.database,
                "collection": self._cfg.collection,
                "ttl_index": self._ttl_index,
                "written": self._written,
                "rejected": self._rejected,
                "write_retries": self._retries,
                "oldest_queued_age": round(oldest, 3),
            },
        )

    # -- diagnostics -----------------------------------------------------------

    async def explain_read(
        self,
        channel: str,
        since: StreamPosition,
        *,
        limit: int | None = None,
        reverse: bool = False,
    ) -> dict[str, Any]:
        """The server's ``explain`` of the query ``read_since`` sends for these arguments."""
        low, high = page_bounds(since, reverse)
        query, sort = _history_query(channel, since.epoch, low, high, datetime.now(UTC), reverse)
        cursor = self._coll().find(query, _PROJECTION, sort=sort, limit=limit or 0)
        plan: dict[str, Any] = await self._run(cursor.explain())
        return plan

    # -- internals -------------------------------------------------------------

    def _coll(self) -> Any:
        if self._client is None:
            raise EngineError("mongo store is not running")
        return self._client.coll

    async def _create_indexes(self, coll: Any) -> None:
        from pymongo.errors import OperationFailure

        await coll.create_index(
            [("channel", 1), ("epoch", 1), ("offset", 1)], name=HISTORY_INDEX, unique=True
        )
        await coll.create_index(
            [("channel", 1), ("created_at", -1), ("offset", -1)], name=RECENT_INDEX
        )
        try:
            await coll.create_index([("expire_at", 1)], name=EXPIRE_INDEX, expireAfterSeconds=0)
            self._ttl_index = True
        except OperationFailure as exc:
            if exc.code not in NO_TTL_CODES:
                raise
            log.info(
                "mongo server has no TTL indexes (code=%s); expiring in the background", exc.code
            )
            await coll.create_index([("expire_at", 1)], name=EXPIRE_INDEX)
            self._ttl_index = False

    async def _register(self, writers: Any) -> list[datetime]:
        """Mark this node running; the crash times of every node's marker (docstring, Crashes)."""
        now = datetime.now(UTC)
        marker = await writers.find_one({"_id": self._node})
        crashes = list(marker.get("crashes", [])) if marker is not None else []
        # Running, and not by this start's own write (a retried step whose first
        # write was applied before its answer was lost): the last process never closed.
        if marker is not None and marker.get("running") and marker.get("start") != self._start_id:
            crashes = [*crashes, now][-MAX_CRASHES:]
            log.warning(
                "mongo store: the previous process of node %r did not close (killed?); "
                "publications it had queued are lost, and persistent streams restored "
                "from the store continue %d offsets further on",
                self._node,
                self._cfg.queue_size,
            )
        await writers.update_one(
            {"_id": self._node},
            {
                "$set": {
                    "running": True,
                    "crashes": crashes,
                    "started_at": now,
                    "start": self._start_id,
                }
            },
            upsert=True,
        )
        docs = await writers.find({}, {"_id": 0, "crashes": 1}).to_list(None)
        return sorted(at for doc in docs for at in doc.get("crashes", []))

    async def _unregister(self, writers: Any) -> None:
        """Clear this node's ``running`` mark: every accepted publication was written."""
        from pymongo.errors import PyMongoError

        try:
            # Only this start's mark: a newer process of the same node (an overlapping
            # restart, replicas sharing the default name) owns the marker now, and
            # clearing its mark would hide its crash from the next start.
            result = await writers.update_one(
                {"_id": self._node, "start": self._start_id}, {"$set": {"running": False}}
            )
        except PyMongoError as exc:
            log.warning(
                "mongo store: could not mark node %r closed (the next start takes it for a "
                "crash) error=%s",
                self._node,
                self._describe(exc),
            )
            return
        if result.matched_count == 0:
            log.warning(
                "mongo store: node %r was started again by another process while this one "
                "ran; its running mark is left to it (give every instance its own "
                "server.name)",
                self._node,
            )

    def _encode(self, channel: str, pub: Publication, opts: PersistOptions) -> _Pending:
        if not isinstance(pub.data, bytes):
            raise StoreRejectedError(
                f"publication data must be bytes (raw JSON), got {type(pub.data).__name__}"
            )
        now = datetime.now(UTC)
        doc: dict[str, Any] = {
            "_id": ObjectId(),
            "channel": channel,
            "epoch": pub.epoch,
            "offset": pub.offset,
            "data": pub.data,
            "time": pub.time,
            "created_at": now,
        }
        if pub.info is not None:
            info: dict[str, Any] = {"user": pub.info.user, "client": pub.info.client}
            if pub.info.conn_info is not None:
                info["conn_info"] = pub.info.conn_info
            if pub.info.chan_info is not None:
                info["chan_info"] = pub.info.chan_info
            doc["info"] = info
        if pub.tags:
            doc["tags"] = [{"k": k, "v": v} for k, v in pub.tags.items()]
        expire_at = now + timedelta(seconds=opts.ttl) if opts.ttl > 0 else None
        if expire_at is not None:
            doc["expire_at"] = expire_at
        try:
            raw = bson.encode(doc)
        except (InvalidDocument, OverflowError, TypeError, ValueError) as exc:
            raise StoreRejectedError(
                f"publication {channel!r} offset {pub.offset}: cannot be stored: {exc}"
            ) from None
        if len(raw) > self._cfg.max_document_bytes:
            raise StoreRejectedError(
                f"publication {channel!r} offset {pub.offset}: stored document is {len(raw)} "
                f"bytes, over the limit of {self._cfg.max_document_bytes} "
                "(mongodb.max_document_bytes)"
            )
        return _Pending(
            channel, pub, RawBSONDocument(raw), opts.size, expire_at, time.monotonic(), now
        )

    async def _db_epoch(self, channel: str) -> str | None:
        """The epoch of the channel's most recently accepted stored publication."""
        query, projection, sort = _recent_query(channel)
        doc = await self._run(self._coll().find_one(query, projection, sort=sort))
        return None if doc is None else str(doc["epoch"])

    async def _db_top(self, channel: str, epoch: str) -> int | None:
        """The highest stored offset of one epoch of the channel."""
        query, projection, sort = _top_query(channel, epoch)
        doc = await self._run(self._coll().find_one(query, projection, sort=sort))
        return None if doc is None else int(doc["offset"])

    async def _run(self, op: Any) -> Any:
        """Await one driver operation, mapping driver errors to ``EngineError``."""
        from pymongo.errors import ConnectionFailure, PyMongoError

        try:
            return await op
        except ConnectionFailure as exc:
            self._mark_down(exc)
            raise EngineError(f"mongo store unavailable: {self._describe(exc)}") from None
        except PyMongoError as exc:
            raise EngineError(f"mongo store: {self._describe(exc)}") from None

    # -- flusher ---------------------------------------------------------------

    async def _flush_forever(self) -> None:
        from pymongo.errors import PyMongoError

        backoff = self._backoff
        while not self._stop.is_set():
            if not self._queue:
                self._wakeup.clear()
                # With the health ping off, a store marked down by a read (nothing
                # queued, so no write would mark it up) still checks every
                # retry_max_delay: /ready would otherwise stay 503 after the server is back.
                idle = self._cfg.ping_interval or (
                    None if self._avail.ready else self._cfg.retry_max_delay
                )
                if not await _wait(self._wakeup, idle) and not self._stop.is_set():
                    await self._ping()
                continue
            wait = self._cfg.flush_interval - (time.monotonic() - self._queue[0].accepted)
            if len(self._queue) < self._cfg.batch_size and not self._closing and wait > 0:
                self._batch_ready.clear()
                await _wait(self._batch_ready, wait)
            try:
                await self._flush_batch()
            except asyncio.CancelledError:
                raise
            except PyMongoError as exc:
                self._retries += 1
                self._mark_down(exc)
                await self._retry_pause()
                continue
            except Exception:
                # A bug, not an outage: say so loudly, keep the queue, keep trying.
                log.exception("mongo store flusher failed; retrying")
                await self._retry_pause()
                continue
            backoff.reset()

    async def _retry_pause(self) -> None:
        """Sleep before the flusher retries a batch: the backoff, cut short by ``close``.

        Once closing, the pause is the backoff again (restarted by ``close``):
        the queue is written as soon as the server answers, until the deadline
        (``_stop``) ends it.
        """
        raise_if_cancelling()
        delay = self._backoff.next()
        await _wait(self._stop if self._closing else self._close_started, delay)

    async def _flush_batch(self) -> None:
        from pymongo.errors import BulkWriteError

        async with self._write_lock:
            batch = list(itertools.islice(self._queue, self._cfg.batch_size))
            if not batch:
                return
            if self._recreate:
                await self._recreate_after_outage()
            started = time.monotonic()
            try:
                await self._coll().insert_many([p.doc for p in batch], ordered=False)
            except BulkWriteError as exc:
                details = exc.details or {}
                if details.get("writeConcernErrors"):
                    raise  # applied but not durably acknowledged: retry (duplicates are fine)
                self._reject(batch, details.get("writeErrors", []))
            latency = time.monotonic() - started
            for item in batch:
                self._queue.popleft()
                queued = self._pending.get(item.channel)
                key = (item.pub.epoch, item.pub.offset)
                if queued is not None and queued.get(key) is item:
                    del queued[key]
                    if not queued:
                        del self._pending[item.channel]
                if item.size > 0:
                    self._trim[item.channel] = _TrimMark(item.size, item.pub.epoch, item.created_at)
            if not self._queue:
                self._drained.set()
        self._written += len(batch)
        self._last_latency = latency
        self._note_batch(len(batch), latency)
        self._mark_up()

    async def _recreate_after_outage(self) -> None:
        """Indexes and the running marker again: after an outage, before the first write
        (or ping), and when a ping finds the marker gone.

        Both are idempotent. Without the unique index a retried batch could be
        stored twice (and the next start could not create the index); without
        the marker a crash would go unnoticed. A refusal other than the server
        being unreachable is logged, not retried: it must not stall the writes.
        """
        from pymongo.errors import ConnectionFailure, PyMongoError

        if self._client is None:
            return
        try:
            await self._create_indexes(self._client.coll)
            await self._client.writers.update_one(
                {"_id": self._node},
                {"$set": {"running": True, "start": self._start_id}},
                upsert=True,
            )
        except ConnectionFailure:
            raise  # still unreachable: the flusher retries
        except PyMongoError as exc:
            log.warning(
                "mongo store: indexes or marker not recreated after an outage error=%s",
                self._describe(exc),
            )
        self._recreate = False

    def _reject(self, batch: list[_Pending], errors: list[dict[str, Any]]) -> None:
        for err in errors:
            if err.get("code") in DUPLICATE_KEY_CODES:
                continue  # already stored by an earlier attempt
            item = batch[int(err.get("index", 0))]
            self._rejected += 1
            # errmsg may quote the document (user data): log only its position and the code.
            log.error(
                "mongo server refused a publication; dropped channel=%s epoch=%s offset=%d code=%s",
                item.channel,
                item.pub.epoch,
                item.pub.offset,
                err.get("code"),
            )

    async def _ping(self) -> None:
        from pymongo.errors import PyMongoError

        if self._client is None:
            return
        try:
            # This node's marker (an _id lookup, cheap on FerretDB too) rather than the
            # ping command: the server answers, and still holds this store's data. A
            # server back without it (wiped, or a new one) gets indexes and marker again.
            marker = await self._client.writers.find_one({"_id": self._node}, {"_id": 1})
            if marker is None or self._recreate:
                await self._recreate_after_outage()
        except asyncio.CancelledError:
            raise
        except PyMongoError as exc:
            self._mark_down(exc)
        else:
            self._mark_up()

    def _mark_down(self, exc: BaseException) -> None:
        self._recreate = True
        self._avail.down(self._describe(exc), len(self._queue))
        self._wakeup.set()  # an idle flusher starts checking for the server's return

    def _mark_up(self) -> None:
        self._avail.up(len(self._queue))

    def _note_batch(self, count: int, latency: float) -> None:
        s = self._stats
        s[0] += 1
        s[1] += count
        s[2] += latency
        s[3] = max(s[3], latency)
        now = time.monotonic()
        if now - self._stats_logged >= STATS_LOG_INTERVAL:
            log.debug(
                "mongo writes batches=%d publications=%d latency_avg=%.4fs latency_max=%.4fs "
                "queue_depth=%d",
                s[0],
                s[1],
                s[2] / s[0],
                s[3],
                len(self._queue),
            )
            self._stats = [0, 0, 0.0, 0.0]
            self._stats_logged = now

    # -- retention -------------------------------------------------------------

    async def _retention_forever(self) -> None:
        from pymongo.errors import PyMongoError

        while not await _wait(self._stop, self._cfg.retention_interval):
            raise_if_cancelling()
            try:
                await self._retention_pass()
            except asyncio.CancelledError:
                raise
            except PyMongoError as exc:
                # Readiness is the flusher's and pinger's call; the next pass retries.
                log.debug("mongo retention pass failed error=%s", self._describe(exc))
            except Exception:
                log.exception("mongo store retention pass failed")

    async def _retention_pass(self) -> None:
        coll = self._coll()
        if not self._ttl_index:
            expired = await coll.find(
                {"expire_at": {"$lte": datetime.now(UTC)}},
                {"_id": 1},
                limit=self._cfg.retention_batch,
            ).to_list(None)
            if expired:
                await coll.delete_many({"_id": {"$in": [d["_id"] for d in expired]}})
        for channel in list(itertools.islice(self._trim, self._cfg.retention_batch)):
            if self._stop.is_set():
                return
            mark = self._trim.pop(channel, None)
            if mark is None:
                continue  # remove() dropped the channel while an earlier one was trimmed
            try:
                await self._trim_channel(coll, channel, mark)
            except BaseException:
                self._trim.setdefault(channel, mark)  # try again next pass
                raise

    async def _trim_channel(self, coll: Any, channel: str, mark: _TrimMark) -> None:
        """Keep the channel's newest ``mark.size`` publications (module docstring, Retention).

        The current epoch is that of the last publication written here (the
        most recently accepted one, unless another node has begun a new epoch
        meanwhile: then each node keeps its epoch's and the older epochs'
        are trimmed as usual). Two commands a pass, over its size or not (three
        more when older epochs are to be trimmed): on FerretDB each one scans
        the collection. Driver errors pass through as they are: the retention
        loop reports them at DEBUG (readiness is the flusher's call).
        """
        size = mark.size
        current, projection, sort = _top_query(channel, mark.epoch)
        # Older epochs: only what was accepted before the current epoch's newest,
        # so a stream begun meanwhile (a newer epoch) is never deleted.
        older = {
            "channel": channel,
            "epoch": {"$ne": mark.epoch},
            "created_at": {"$lte": mark.created_at},
        }
        boundary = await coll.find_one(current, projection, sort=sort, skip=size)
        if boundary is not None:  # the current epoch alone fills ``size``
            await coll.delete_many(
                {"$or": [older, {**current, "offset": {"$lte": boundary["offset"]}}]}
            )
            return
        recent, _, by_acceptance = _recent_query(channel)
        if await coll.find_one(recent, {"_id": 1}, sort=by_acceptance, skip=size) is None:
            return  # no more than ``size`` in all (the common case)
        room = size - await coll.count_documents(current)
        if room < 0:
            return  # grew past size meanwhile: the next pass trims it
        boundary = await coll.find_one(
            older, {"_id": 0, "created_at": 1, "offset": 1}, sort=by_acceptance, skip=room
        )
        if boundary is None:
            return
        at = boundary["created_at"]
        await coll.delete_many(
            {
                **older,
                "$or": [
                    {"created_at": {"$lt": at}},
                    {"created_at": at, "offset": {"$lte": boundary["offset"]}},
                ],
            }
        )

    def _describe(self, exc: BaseException) -> str:
        """A short, password-free description of a driver error."""
        text = str(exc).split(", Timeout:")[0].split(", full error:")[0]
        password = _password(self._cfg.url)
        if password:
            text = text.replace(password, "***")
        return f"{type(exc).__name__}: {text[:300]}"


def _recent_query(channel: str) -> tuple[dict[str, Any], dict[str, int], list[tuple[str, int]]]:
    """``find_one`` arguments for the channel's most recently accepted document.

    Served by ``channel_recent`` on MongoDB (equality on its prefix, its sort).
    """
    return (
        {"channel": channel},
        {"_id": 0, "epoch": 1, "created_at": 1},
        [("created_at", -1), ("offset", -1)],
    )


def _top_query(
    channel: str, epoch: str
) -> tuple[dict[str, Any], dict[str, int], list[tuple[str, int]]]:
    """``find_one`` arguments for the highest offset of one epoch of the channel.

    Served by ``channel_epoch_offset`` on MongoDB (equality on channel and
    epoch, the index walked backwards on offset).
    """
    return {"channel": channel, "epoch": epoch}, {"_id": 0, "offset": 1}, [("offset", -1)]


def _history_query(
    channel: str, epoch: str, low: int, high: int | None, now: datetime, reverse: bool
) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    # A client may give any uint64 position: one past MAX_STORED_OFFSET is past
    # every stored offset (a lower bound matching none, an upper bound matching all).
    offset: dict[str, int] = {"$gt": min(low, MAX_STORED_OFFSET)}
    if high is not None and high <= MAX_STORED_OFFSET:
        offset["$lt"] = high
    query = {
        "channel": channel,
        "epoch": epoch,
        "offset": offset,
        "expire_at": {"$not": {"$lte": now}},  # also matches documents without a deadline
    }
    return query, [("offset", -1 if reverse else 1)]


def _decode(doc: Mapping[str, Any]) -> Publication:
    info = doc.get("info")
    tags = doc.get("tags")
    return Publication(
        offset=int(doc["offset"]),
        epoch=str(doc["epoch"]),
        data=bytes(doc["data"]),
        info=None
        if info is None
        else ClientInfo(
            user=info["user"],
            client=info["client"],
            conn_info=_opt_bytes(info.get("conn_info")),
            chan_info=_opt_bytes(info.get("chan_info")),
        ),
        time=int(doc.get("time", 0)),
        tags=None if tags is None else {t["k"]: t["v"] for t in tags},
    )


def _opt_bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _expired(expire_at: datetime | None, now: datetime) -> bool:
    return expire_at is not None and expire_at <= now


def _stopped_task(tasks: Iterable[asyncio.Task[None]]) -> str:
    """Why a background task of a running store ended (none should), or "" while all run.

    ``close`` empties the task list first, so a task it stopped is never reported.
    """
    for task in tasks:
        if not task.done():
            continue
        if task.cancelled():
            reason = "cancelled"
        elif (exc := task.exception()) is None:
            reason = "returned"
        else:
            reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        return f"background task {task.get_name()} stopped ({reason})"
    return ""


def _report_death(logger: logging.Logger) -> Callable[[asyncio.Task[None]], None]:
    """A done-callback logging, at ERROR, a background task that ended with an exception:
    whatever it did (writing, sealing, retention) has stopped; ``status`` says so too."""

    def report(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("background task %s stopped", task.get_name(), exc_info=exc)

    return report


async def _wait(event: asyncio.Event, seconds: float | None) -> bool:
    """Wait for ``event`` up to ``seconds`` (forever if ``None``); whether it was set."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


def _netloc(url: str) -> str:
    rest = url.partition("://")[2]
    return rest.split("/", 1)[0].split("?", 1)[0]


def _hosts(url: str) -> str:
    """``host:port[,host:port]`` of a MongoDB URL, without user or password."""
    return _netloc(url).rpartition("@")[2]


def _password(url: str) -> str:
    userinfo, at, _ = _netloc(url).rpartition("@")
    return userinfo.partition(":")[2] if at else ""


def _conforms(s: MongoStore) -> Store:
    return s
