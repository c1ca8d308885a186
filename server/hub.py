"""The hub: local subscriptions, fan-out, stream tracking and cluster control.

One hub per process. It implements ``BrokerEvents``: engines call it back with
plain function calls that only enqueue.

Fan-out
    A publication is encoded once per broadcast (``encode_push``) and the same
    bytes object is queued to every local subscriber. Clients never write to
    their socket directly: ``Client.enqueue`` marks them dirty, and one flush
    per loop tick (or per ``client.write_delay``) writes each dirty client's
    queue as one newline-batched frame. A client whose backlog would pass
    ``client.max_queue_bytes`` is disconnected with 3008 (slow); the
    publisher never waits for it.

Streams and gaps
    For channels with history the hub tracks the last offset and epoch it
    delivered. A duplicate (offset not above the last) is dropped, so nothing
    is delivered twice. A jump in offset, a changed epoch, or ``on_gap`` from
    the broker means publications were lost on the way here: every local
    subscriber of the channel gets an ``unsubscribe`` push with code 2500
    (insufficient state), and its SDK resubscribes and recovers from history.

Subscribe/recover race
    A new subscription is registered *pending* before the broker subscription
    and the history read; publications that arrive meanwhile are buffered and
    after the subscribe reply only those above the returned position are
    delivered. Recovery therefore never duplicates or skips.

Throttled subscriptions
    A subscription may ask for at most N publications per second (subscribe
    data ``{"max_rate": N}``); it then gets the latest publication of each
    interval, never a backlog (``client.Throttle``, one timer per throttled
    subscription). A channel counts its throttled subscribers; only channels
    with at least one take the slower fan-out loop, so the loop for ordinary
    subscribers stays as it is.

Telemetry
    ``hub.telemetry`` is the telemetry store engine and
    ``hub.telemetry_ingest`` the ingest both the WebSocket publish and
    ``POST /api/telemetry`` go through (``server.telemetry``); it publishes
    accepted points with ``Hub.publish``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import TYPE_CHECKING, Any, Final

import orjson

from server import __version__, codes
from server.broker import (
    Broker,
    ClientInfo,
    HistoryPage,
    NodeInfo,
    PresenceManager,
    Publication,
    PublishOptions,
    StreamPosition,
)
from server.config import ChannelOptions, Config
from server.errors import (
    ClientError,
    EngineError,
    StoreFullError,
    StoreRejectedError,
    StreamMissing,
)
from server.metrics import Metrics
from server.protocol import compact, encode_push, pub_to_dict
from server.protocol.codec import info_to_dict
from server.store import PersistOptions, Store
from server.telemetry import TelemetryIngest
from server.telemetry_store import TelemetryStore

if TYPE_CHECKING:
    from server.client import Client, FrameCache, Subscription

log = logging.getLogger("squall.hub")

MAX_RECOVERY: Final = 10_000  # publications one recovery may return
# Publications one history call returns at most (limit -1 or above it): a
# persistent channel can hold millions, and reading them all would stall the
# loop and the memory for every connection. Callers page on with ``since``.
MAX_HISTORY_PAGE: Final = 10_000
PRESENCE_REFRESH_BATCH: Final = 256  # presence refreshes in flight at once
RESTORED_CACHE: Final = 100_000  # persistent channels whose broker position was restored
LOCAL_ONLY_LOG_INTERVAL: Final = 10.0  # seconds between "delivering locally only" warnings
FLUSH_PAUSE_MIN: Final = 0.0005  # seconds: a shorter pause after a flush is not worth a timer
CANCEL_RETRY_INTERVAL: Final = 0.1  # seconds close() gives a cancelled loop before cancelling again
# Upper bounds of what a stored publication adds to its variable-length fields
# (BSON keys, type bytes, lengths, _id, offset, times, an epoch up to ~200 bytes).
STORED_OVERHEAD_BYTES: Final = 512
STORED_TAG_OVERHEAD_BYTES: Final = 32  # per tag: array index key and the {k, v} pair framing

RpcHandler = Callable[["Client", bytes], Coroutine[Any, Any, bytes]]
MessageHandler = Callable[["Client", bytes], None]


class ChannelSubs:
    """Local subscribers of one channel, and the channel's delivered position."""

    __slots__ = ("position", "ready", "subs", "throttled", "waiters")

    def __init__(self) -> None:
        self.subs: dict[Client, Subscription] = {}
        self.position: StreamPosition | None = None
        self.ready: asyncio.Future[None] | None = None  # broker subscription established
        self.throttled = 0  # subscriptions in ``subs`` with a max_rate (conflated delivery)
        # New subscriptions whose history read is ahead of what the broker has
        # delivered here: the position each waits for (see ``went_live``).
        self.waiters: dict[Client, StreamPosition] | None = None


class Hub:
    """See the module docstring. Owns the engines' lifecycle."""

    def __init__(
        self,
        config: Config,
        broker: Broker,
        presence: PresenceManager,
        store: Store,
        *,
        node_id: str = "",
        telemetry: TelemetryStore | None = None,
    ) -> None:
        self.config = config
        self.broker = broker
        self.presence_manager = presence
        self.store = store
        if telemetry is None:
            from server.telemetry_memory import MemoryTelemetryStore

            telemetry = MemoryTelemetryStore(config.telemetry)
        self.telemetry = telemetry
        self.telemetry_ingest = TelemetryIngest(config.telemetry, telemetry, self.publish)
        self.metrics = Metrics()
        self.node = NodeInfo(
            uid=node_id or uuid.uuid4().hex, name=config.node_name, version=__version__
        )
        self.started_at = time.monotonic()
        self.clients: dict[str, Client] = {}  # connected (after a successful connect)
        self.connecting: set[Client] = set()  # open connections that have not connected yet
        # user -> its connection, or a set once it has several (most users have
        # one: a set per connection would cost about 220 bytes each).
        self.users: dict[str, Client | set[Client]] = {}
        self.channels: dict[str, ChannelSubs] = {}
        self.rpc_handlers: dict[str, RpcHandler] = {}
        self.message_handlers: list[MessageHandler] = []
        self.closing = False
        self._dirty: list[Client] = []
        self._flush_scheduled = False
        self._flush_not_before = 0.0  # time.monotonic() before which no flush starts (_flush)
        self._tasks: set[asyncio.Task[Any]] = set()
        # (channel, client id) -> the last presence or join/leave call queued for that
        # subscriber: each runs after the one before it (see member_op).
        self._member_ops: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self._loops: list[asyncio.Task[None]] = []
        # Persistent channels whose broker stream was set from the store in this
        # process -> True when the stream has durable positions, else False or the
        # epoch of the empty stream a history read found (see _restore, _history).
        self._restored: OrderedDict[str, bool | str] = OrderedDict()
        self._nodes: dict[str, tuple[NodeInfo, float]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribed: asyncio.Future[None] | None = None  # see _subscribed_future
        self._drained = asyncio.Event()
        # Server API requests being answered: a graceful shutdown lets them finish
        # before it closes their connections (a publish may already be delivered).
        self.api_requests = 0
        self._api_idle = asyncio.Event()
        self._api_idle.set()
        self._local_only_logged_at = -LOCAL_ONLY_LOG_INTERVAL  # see publish()
        self._store_reserved = 0  # persistent publishes past the queue check, not yet appended
        self._register_builtin_rpc()
        self._register_gauges()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.store.start()
        await self.telemetry.start()
        await self.broker.start(self)
        interval = self.config.client.presence_interval
        if interval > 0:
            self._loops.append(asyncio.create_task(self._presence_forever(interval)))
        self._loops.append(asyncio.create_task(self._heartbeat_forever()))

    async def close(self) -> None:
        """Stop background loops, wait for pending engine calls, close engines."""
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            # Cancel again until it ends: on Python 3.11 redis-py awaits
            # asyncio.wait_for, which swallows a cancellation that lands as its
            # inner task finishes (CPython gh-86296), and the loop carries on.
            while not task.done():
                await asyncio.wait({task}, timeout=CANCEL_RETRY_INTERVAL)
                task.cancel()
            if not task.cancelled() and task.exception() is not None:
                log.error("background loop had failed", exc_info=task.exception())
        self._loops.clear()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        await self.broker.close()
        await self.store.close()
        await self.telemetry.close()

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        """Run an engine call in the background; log (never raise) its failure."""
        _ = self.spawn_task(coro, what)

    def spawn_task(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Future[Any]:
        """``spawn``, and the task."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, what))
        return task

    def member_op(
        self,
        channel: str,
        client_id: str,
        op: Callable[[], Awaitable[Any]],
        what: str,
    ) -> asyncio.Future[Any]:
        """Run ``op()`` (a presence or join/leave call of one subscriber) in the
        background, once the previous one for the same channel and connection has
        finished.

        Each is a separate engine call, on any of the pool's connections: a leave
        could otherwise reach the other nodes before its join (their members lists
        then keep a ghost), and the removal of an entry by an unsubscribe could land
        after the add of a subscribe right behind it (the subscriber missing from
        presence until the next refresh). Centrifugo makes these calls before it
        replies; here a reply does not wait for the join or leave.
        """
        key = (channel, client_id)
        prev = self._member_ops.get(key)
        task = self.spawn_task(_after(prev, op), what)
        self._member_ops[key] = task
        task.add_done_callback(functools.partial(self._member_op_done, key))
        return task

    def _member_op_done(self, key: tuple[str, str], task: asyncio.Future[Any]) -> None:
        if self._member_ops.get(key) is task:
            del self._member_ops[key]

    def _task_done(self, task: asyncio.Task[Any], what: str) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, EngineError):
            log.warning("background %s failed: %s", what, exc)
        elif exc is not None:
            log.error("background %s crashed", what, exc_info=exc)

    # ------------------------------------------------------------------ clients

    def add_client(self, client: Client) -> None:
        self.clients[client.id] = client
        user = client.user
        conns = self.users.get(user)
        if conns is None:
            self.users[user] = client
        elif isinstance(conns, set):
            conns.add(client)
        elif conns is not client:
            self.users[user] = {conns, client}

    def user_clients(self, user: str) -> list[Client]:
        """The connected clients of ``user`` on this node."""
        conns = self.users.get(user)
        if conns is None:
            return []
        return list(conns) if isinstance(conns, set) else [conns]

    def remove_client(self, client: Client) -> None:
        """Forget a closed client: its subscriptions, presence and user entry."""
        self.clients.pop(client.id, None)
        if self.closing and not self.clients:
            self._drained.set()
        user = client.user
        conns = self.users.get(user)
        if conns is client:
            del self.users[user]
        elif isinstance(conns, set):
            conns.discard(client)
            if not conns:
                del self.users[user]
        for channel in list(client.subs):
            self.remove_subscription(client, channel)

    def schedule_flush(self, client: Client) -> None:
        """Called by ``Client.enqueue`` the first time its queue becomes non-empty."""
        self._dirty.append(client)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            delay = max(self.config.client.write_delay, self._flush_not_before - time.monotonic())
            if delay > 0:
                loop.call_later(delay, self._flush)
            else:
                loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write every queued frame; then pace the next flush by this one's cost.

        A flush that took ``t`` seconds (a broadcast to many connections: one
        ``send`` each) holds the next one back ``t * (1 / share - 1)`` seconds,
        ``share`` being ``client.flush_share``: pushes queued meanwhile leave
        together, one frame per connection, so the time spent writing stays at
        about that share of the loop while commands and publications still get
        the rest. Small flushes (under ``FLUSH_PAUSE_MIN`` of pause) are not
        held back: a lightly loaded hub writes on the next loop tick.
        """
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        frames: FrameCache = {}  # one frame per distinct single payload, shared
        started = time.monotonic()
        for client in dirty:
            try:
                client.flush(frames)
            except Exception:  # one broken connection must not stall the others' output
                log.exception("flush failed client=%s", client.id)
                client.abort()
        ended = time.monotonic()
        share = self.config.client.flush_share
        pause = (ended - started) * (1.0 / share - 1.0)
        self._flush_not_before = ended + pause if pause >= FLUSH_PAUSE_MIN else 0.0

    # ------------------------------------------------------------------ subscriptions

    async def add_subscription(self, client: Client, sub: Subscription) -> None:
        """Register ``sub`` (pending) and make sure the broker delivers its channel here.

        Raises:
            ClientError: the broker subscription failed (temporary internal error).
        """
        channel = sub.channel
        chan = self.channels.get(channel)
        if chan is None:
            chan = self.channels[channel] = ChannelSubs()
        chan.subs[client] = sub
        if sub.throttle is not None:
            chan.throttled += 1
        if chan.ready is None:
            chan.ready = asyncio.ensure_future(self.broker.subscribe(channel))
        ready = chan.ready
        try:
            await asyncio.shield(ready)
        except EngineError as exc:
            log.warning("broker subscribe %s failed: %s", channel, exc)
            if chan.ready is ready and ready.done():
                chan.ready = None  # next subscriber retries
            self._drop(client, channel)
            raise ClientError(codes.INTERNAL) from None
        if chan.ready is ready and ready is not self._subscribed:
            # Keep one shared finished future instead of each channel's task
            # (about 200 bytes a channel, and channels can be one per client).
            chan.ready = self._subscribed_future()

    def _subscribed_future(self) -> asyncio.Future[None]:
        """A finished future standing for "the broker delivers this channel here"."""
        fut = self._subscribed
        if fut is None:
            fut = self._subscribed = asyncio.get_running_loop().create_future()
            fut.set_result(None)
        return fut

    def remove_subscription(self, client: Client, channel: str) -> Subscription | None:
        """Drop one local subscription; announce leave and drop presence if needed."""
        sub = client.subs.pop(channel, None)
        if sub is None:
            return None
        self._drop(client, channel)
        if sub.opts.presence:
            self.remove_presence_later(channel, client.id)
            if sub.opts.join_leave and sub.live:
                info = sub.info
                _ = self.member_op(
                    channel, client.id, lambda: self.broker.publish_leave(channel, info), "leave"
                )
        return sub

    def remove_presence_later(self, channel: str, client_id: str) -> None:
        """Remove one presence entry in the background, after the subscriber's
        earlier presence calls."""
        _ = self.member_op(
            channel,
            client_id,
            lambda: self.presence_manager.remove_presence(channel, client_id),
            "presence remove",
        )

    def _drop(self, client: Client, channel: str) -> None:
        chan = self.channels.get(channel)
        if chan is None:
            return
        sub = chan.subs.pop(client, None)
        if sub is not None and sub.throttle is not None:
            sub.throttle.cancel()
            chan.throttled -= 1
        if chan.waiters is not None:
            chan.waiters.pop(client, None)
        if not chan.subs:
            del self.channels[channel]
            ready = chan.ready
            if ready is not None and ready.done() and ready.exception() is None:
                self.spawn(self.broker.unsubscribe(channel), "broker unsubscribe")
            elif ready is not None:
                ready.add_done_callback(lambda f: self._late_unsubscribe(f, channel))

    def _late_unsubscribe(self, fut: asyncio.Future[None], channel: str) -> None:
        if not fut.cancelled() and fut.exception() is None and channel not in self.channels:
            self.spawn(self.broker.unsubscribe(channel), "broker unsubscribe")

    def went_live(self, client: Client, sub: Subscription, position: StreamPosition | None) -> None:
        """A subscription's reply is queued (with the publications buffered meanwhile
        that follow ``position``): start live delivery, then announce the join.

        The history read behind ``position`` can be ahead of what the broker
        has delivered here so far. Those publications are still on their way
        and the channel's other subscribers need them, so the channel's
        position stays as the broker's deliveries set it; this subscription
        keeps buffering instead (``chan.waiters``) until the stream reaches
        ``position``, and gets the next publication after it
        (``_release_waiters``).
        """
        chan = self.channels.get(sub.channel)
        if chan is not None and position is not None and position.offset:
            cur = chan.position
            if cur is None or cur.epoch != position.epoch or cur.offset < position.offset:
                sub.pending = []
                if chan.waiters is None:
                    chan.waiters = {}
                chan.waiters[client] = position
        if sub.opts.presence and sub.opts.join_leave:
            channel, info = sub.channel, sub.info
            _ = self.member_op(
                channel, client.id, lambda: self.broker.publish_join(channel, info), "join"
            )

    def _release_waiters(self, channel: str, chan: ChannelSubs, pub: Publication) -> None:
        """Start live delivery for the subscriptions ``pub`` brings up to date.

        A waiter whose next publication (its position's offset + 1, same epoch)
        is not the one that arrives missed something: it is unsubscribed with
        2500 and its SDK resubscribes and recovers. ``pub`` has an offset: one
        without (``skip_history``) says nothing about the stream, and a waiter
        gets it at once.
        """
        waiters = chan.waiters
        if waiters is None:
            return
        for client, pos in list(waiters.items()):
            if pub.epoch == pos.epoch and pub.offset <= pos.offset:
                continue  # still catching up to what the subscriber read
            del waiters[client]
            sub = chan.subs.get(client)
            if sub is None:
                continue
            if pub.epoch != pos.epoch or pub.offset != pos.offset + 1:
                log.info(
                    "stream gap for a new subscriber channel=%s client=%s read=%s:%d got=%s:%d",
                    channel,
                    client.id,
                    pos.epoch,
                    pos.offset,
                    pub.epoch,
                    pub.offset,
                )
                client.server_unsubscribe(channel, codes.UNSUBSCRIBE_INSUFFICIENT)
                continue
            pending, sub.pending = sub.pending or [], None
            for p in pending:
                if p.epoch == pos.epoch and p.offset > pos.offset:
                    frame = encode_push(channel, "pub", pub_to_dict(p))
                    if sub.throttle is not None:
                        sub.throttle.offer(frame)
                    else:
                        client.enqueue(frame)
        if not waiters:
            chan.waiters = None

    # ------------------------------------------------------------------ BrokerEvents

    def on_publication(self, channel: str, pub: Publication) -> None:
        chan = self.channels.get(channel)
        if chan is None:
            return
        if pub.offset:
            last = chan.position
            if last is not None:
                if last.epoch == pub.epoch and pub.offset <= last.offset:
                    return  # already delivered (duplicate from a reconnect); never twice
                if last.epoch != pub.epoch or pub.offset != last.offset + 1:
                    log.info(
                        "stream gap channel=%s last=%s:%d got=%s:%d",
                        channel,
                        last.epoch,
                        last.offset,
                        pub.epoch,
                        pub.offset,
                    )
                    chan.position = None
                    self._insufficient(channel, chan)
                    return
            chan.position = StreamPosition(pub.offset, pub.epoch)
        frame = encode_push(channel, "pub", pub_to_dict(pub))
        if chan.throttled:
            self._fan_out_throttled(chan, pub, frame)
        else:
            n = 0
            for client, sub in chan.subs.items():
                if sub.pending is None or (sub.live and not pub.offset):
                    # (a waiter, see went_live, takes publications outside the stream,
                    # skip_history ones, as they come: they are not what it waits for)
                    client.enqueue(frame)
                    n += 1
                else:
                    sub.pending.append(pub)
            self.metrics.deliveries += n
        if chan.waiters is not None and pub.offset:
            self._release_waiters(channel, chan, pub)

    def _fan_out_throttled(self, chan: ChannelSubs, pub: Publication, frame: bytes) -> None:
        """The fan-out loop for channels with a ``max_rate`` subscriber (kept off the fast path).

        A throttled subscription hands the frame to its ``Throttle``, which
        conflates: it delivers at most one publication per interval, always the
        latest one, never a backlog.
        """
        n = 0
        for client, sub in chan.subs.items():
            if sub.pending is not None and not (sub.live and not pub.offset):
                sub.pending.append(pub)
            elif sub.throttle is not None:
                sub.throttle.offer(frame)
            else:
                client.enqueue(frame)
                n += 1
        self.metrics.deliveries += n

    def on_join(self, channel: str, info: ClientInfo) -> None:
        self._push_join_leave(channel, "join", info)

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        self._push_join_leave(channel, "leave", info)

    def on_gap(self, channels: Collection[str]) -> None:
        for channel in channels:
            chan = self.channels.get(channel)
            if chan is not None:
                chan.position = None
                self._insufficient(channel, chan)

    def on_control(self, data: bytes) -> None:
        try:
            msg = orjson.loads(data)
            kind = msg["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("malformed control message ignored")
            return
        if kind == "node":
            info = NodeInfo(**msg["node"])
            self._nodes[info.uid] = (info, time.monotonic())
            return
        if kind == "history_remove":
            channel, epoch, offset = msg.get("channel"), msg.get("epoch"), msg.get("offset")
            if msg.get("node") == self.node.uid:
                return  # done before the message was sent
            if not (isinstance(channel, str) and isinstance(epoch, str) and type(offset) is int):
                log.warning("malformed history_remove control message ignored")
                return
            through = StreamPosition(offset, epoch)
            self.spawn(self.store.remove(channel, through=through), f"history remove of {channel}")
            return
        targets = self._control_targets(msg)
        if kind == "disconnect":
            d = codes.Disconnect(int(msg.get("code", 3503)), str(msg.get("reason", "")))
            keep = msg.get("whitelist") or ()
            for client in targets:
                if client.id not in keep:
                    client.disconnect(d)
        elif kind == "unsubscribe":
            for client in targets:
                _after_server_op(
                    client, client.server_unsubscribe, msg["channel"], codes.UNSUBSCRIBE_SERVER
                )
        elif kind == "subscribe":
            sub_data, sub_info = msg.get("data"), msg.get("info")  # JSON text or None
            for client in targets:
                op = self.spawn_task(
                    _server_subscribe(client, client.server_op, msg["channel"], sub_data, sub_info),
                    "server subscribe",
                )
                client.server_op = op
                op.add_done_callback(functools.partial(_server_op_done, client))
        elif kind == "refresh":
            for client in targets:
                _after_server_op(
                    client,
                    client.server_refresh,
                    bool(msg.get("expired")),
                    int(msg.get("expire_at", 0)),
                )
        elif kind == "message":
            frame = encode_push("", "message", {"data": orjson.Fragment(msg["data"].encode())})
            for client in targets:
                _after_server_op(client, client.enqueue, frame)
        else:
            log.warning("unknown control message type %r ignored", kind)

    def _control_targets(self, msg: dict[str, Any]) -> list[Client]:
        user = msg.get("user")
        if not isinstance(user, str):
            return []
        client_id = msg.get("client") or ""
        # Connected, and connecting past the token check (subscribing the token's
        # channels: their commands wait for the connect reply, see Client.server_op).
        clients = self.user_clients(user)
        clients += [c for c in self.connecting if c.server_op is not None and c.user == user]
        return [c for c in clients if not client_id or c.id == client_id]

    def _push_join_leave(self, channel: str, kind: str, info: ClientInfo) -> None:
        chan = self.channels.get(channel)
        if chan is None:
            return
        frame = encode_push(channel, kind, {"info": info_to_dict(info)})
        for client, sub in chan.subs.items():
            # Every subscription whose reply is queued, including one still
            # buffering publications until the stream reaches its position
            # (went_live): that wait lasts until the next publication, and the
            # joins and leaves meanwhile would otherwise be lost for good.
            if sub.live and sub.join_leave:
                client.enqueue(frame)

    def _insufficient(self, channel: str, chan: ChannelSubs) -> None:
        for client in list(chan.subs):
            client.server_unsubscribe(channel, codes.UNSUBSCRIBE_INSUFFICIENT)

    # ------------------------------------------------------------------ publishing

    def publish_options(self, opts: ChannelOptions, **kw: Any) -> PublishOptions:
        return PublishOptions(history_size=opts.history_size, history_ttl=opts.history_ttl, **kw)

    async def publish(
        self,
        channel: str,
        data: bytes,
        opts: ChannelOptions,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
        idempotency_key: str = "",
    ) -> StreamPosition:
        """Publish through the broker (and the store for persistent namespaces).

        While the broker's pub/sub link is down (Redis unreachable), a channel
        without history (and a publish without an idempotency key) is delivered
        to this node's subscribers only and the publish succeeds with offset 0:
        such channels promise no positions, and other nodes cannot be reached
        anyway. Channels with history are refused (temporary error 100): no
        offset can be assigned, and a locally invented one would collide with
        the stream's real offsets after Redis returns.

        In persistent namespaces a publication the store could never keep (over
        ``mongodb.max_document_bytes``) is refused with 107 *before* the broker
        publishes it, so it is neither delivered nor stored; see ``_check_storable``.
        Likewise a full store queue refuses (1001) before publishing: each
        persistent publish reserves a queue slot from the check until its
        ``append``, so concurrent publishes cannot overfill the queue after
        their publication was delivered.

        Raises:
            ClientError: the engines refused (unavailable, store full: 1001;
                too large to store: 107).
        """
        data = compact(data)  # kept in history (orjson's output would hold 4 KiB each)
        if not opts.persist:
            return await self._publish(channel, data, opts, info, tags, idempotency_key)
        status = self.store.status()
        if status.queue_limit and status.queue_depth + self._store_reserved >= status.queue_limit:
            raise ClientError(codes.STORE_UNAVAILABLE, "durable store queue is full")
        self._check_storable(channel, data, info, tags)
        self._store_reserved += 1
        try:
            fresh = channel not in self._restored
            await self._restore(channel)
            try:
                # The broker's stream must exist unless the store was found empty
                # just now: an earlier empty look may be out of date (another node
                # has published since, and then Redis lost the stream).
                position = await self._publish(
                    channel,
                    data,
                    opts,
                    info,
                    tags,
                    idempotency_key,
                    require_stream=not fresh or self._restored.get(channel) is True,
                    last_try=False,
                )
            except StreamMissing:
                # The broker lost the stream while this process ran (Redis restarted
                # without its data, or the position expired): continue it from the
                # store rather than start a new epoch that hides the durable history.
                await self._restore(channel, again=True)
                restored = self._restored.get(channel) is True
                if restored:
                    log.warning(
                        "the broker lost the stream of %s; continuing it from the store", channel
                    )
                position = await self._publish(
                    channel, data, opts, info, tags, idempotency_key, require_stream=restored
                )
            if position.offset and channel in self._restored:
                self._restored[channel] = True
            return position
        finally:
            self._store_reserved -= 1

    async def _publish(
        self,
        channel: str,
        data: bytes,
        opts: ChannelOptions,
        info: ClientInfo | None,
        tags: dict[str, str] | None,
        idempotency_key: str,
        *,
        require_stream: bool = False,
        last_try: bool = True,
    ) -> StreamPosition:
        """Publish through the broker, then append to the store (persistent channels).

        Raises:
            StreamMissing: ``require_stream`` and the broker has no position for
                the channel, unless ``last_try`` (then 100, like any engine
                failure).
        """
        popts = self.publish_options(
            opts,
            info=info,
            tags=tags,
            idempotency_key=idempotency_key,
            require_stream=opts.persist and require_stream,
        )
        try:
            position = await self.broker.publish(channel, data, popts)
        except StreamMissing:
            if not last_try:
                raise
            log.warning("publish to %s failed: the broker lost its stream again", channel)
            raise ClientError(codes.INTERNAL) from None
        except EngineError as exc:
            if opts.history_enabled or opts.persist or idempotency_key or self._broker_linked():
                log.warning("publish to %s failed: %s", channel, exc)
                raise ClientError(codes.INTERNAL) from None
            self._publish_locally(channel, data, popts, exc)
            return StreamPosition(0, "")
        self.metrics.publications += 1
        if opts.persist and position.offset:
            pub = Publication(
                position.offset, position.epoch, data, info, int(time.time() * 1000), tags
            )
            try:
                await self.store.append(
                    channel, pub, PersistOptions(size=opts.persist_size, ttl=opts.persist_ttl)
                )
            except StoreFullError:
                raise ClientError(codes.STORE_UNAVAILABLE, "durable store queue is full") from None
            except StoreRejectedError as exc:
                # Past _check_storable's bound only in odd cases (an unencodable
                # field): the broker has delivered it, but it is not stored.
                log.warning(
                    "store refused a publication to %s (delivered, not stored): %s", channel, exc
                )
                raise ClientError(codes.BAD_REQUEST, str(exc)) from None
            except EngineError as exc:
                log.warning("store append to %s failed: %s", channel, exc)
                raise ClientError(codes.STORE_UNAVAILABLE) from None
        return position

    def _check_storable(
        self, channel: str, data: bytes, info: ClientInfo | None, tags: dict[str, str] | None
    ) -> None:
        """Refuse (107) a publication over the store's document limit before it is published.

        The broker delivers a publication the moment it accepts it, so the store's
        own check at ``append`` would come too late. This bound counts every
        variable-length field at its byte length plus ``STORED_OVERHEAD_BYTES``
        (and ``STORED_TAG_OVERHEAD_BYTES`` per tag), so it never under-estimates
        the stored document: a publication within a few hundred bytes of
        ``mongodb.max_document_bytes`` may be refused although it would just fit.
        Only MongoDB has a limit; the memory store takes anything.
        """
        limit = self.config.mongodb.max_document_bytes if self.config.mongodb.url else 0
        if limit <= 0:
            return
        size = len(data) + len(channel.encode()) + STORED_OVERHEAD_BYTES
        if info is not None:
            size += len(info.user.encode()) + len(info.client.encode())
            size += len(info.conn_info or b"") + len(info.chan_info or b"")
        for key, value in (tags or {}).items():
            size += len(key.encode()) + len(value.encode()) + STORED_TAG_OVERHEAD_BYTES
        if size > limit:
            raise ClientError(
                codes.BAD_REQUEST,
                f"publication too large to store: {len(data)} bytes of data, about {size} "
                f"bytes stored, over the limit of {limit} (mongodb.max_document_bytes)",
            )

    def _broker_linked(self) -> bool:
        """False only when the broker reports its pub/sub link down (``RedisBroker``).

        With the link up, a failed publish may still have reached Redis (a
        timeout), and would then come back through the link: delivering it
        locally as well could deliver it twice, so it is refused instead.
        """
        is_connected = getattr(self.broker, "is_connected", None)
        return not callable(is_connected) or bool(is_connected())

    def _publish_locally(
        self, channel: str, data: bytes, popts: PublishOptions, exc: EngineError
    ) -> None:
        """Deliver a history-less publication to this node's subscribers only (broker down)."""
        now = time.monotonic()
        if now - self._local_only_logged_at >= LOCAL_ONLY_LOG_INTERVAL:
            self._local_only_logged_at = now
            log.warning(
                "broker unreachable (%s): publications to channels without history "
                "reach this node's subscribers only",
                exc,
            )
        self.metrics.publications += 1
        pub = Publication(0, "", data, popts.info, int(time.time() * 1000), popts.tags)
        self.on_publication(channel, pub)

    async def _restore(self, channel: str, *, again: bool = False) -> None:
        """Continue a persistent channel's offsets from the store.

        Once per process (and channel), or ``again`` when the broker turned out
        to have lost the stream since: a publish then gets ``StreamMissing``,
        a history read position 0. ``_restored`` remembers whether the store
        had a position: from then on publishes require the broker's stream.
        """
        if channel in self._restored and not again:
            self._restored.move_to_end(channel)
            return
        try:
            latest = await self.store.resume(channel)
            if latest is not None:
                await self.broker.restore_position(channel, latest)
        except EngineError as exc:
            log.warning("restoring position of %s failed: %s", channel, exc)
            raise ClientError(codes.INTERNAL) from None
        self._restored[channel] = latest is not None
        self._restored.move_to_end(channel)
        while len(self._restored) > RESTORED_CACHE:
            self._restored.popitem(last=False)

    # ------------------------------------------------------------------ history

    async def history(
        self,
        channel: str,
        opts: ChannelOptions,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryPage:
        """History of a channel; persistent namespaces read beyond the broker's window.

        ``since`` pages forward (publications after it) or, with ``reverse``,
        back (those before it, newest first); an empty epoch in it stands for
        the stream's current one (Centrifugo's rule). A ``since`` naming another
        epoch gets an empty page: callers answer 112 for it.

        A ``limit`` of ``None`` (all) or above ``MAX_HISTORY_PAGE`` is cut to it.

        Raises:
            ClientError: 107 for ``reverse`` with ``since.offset`` 0 (nothing is
                before it; Centrifugo's answer), 100 when an engine failed.
        """
        if limit is None or limit > MAX_HISTORY_PAGE:
            limit = MAX_HISTORY_PAGE
        return await self._history(channel, opts, since=since, limit=limit, reverse=reverse)

    async def _history(
        self,
        channel: str,
        opts: ChannelOptions,
        *,
        since: StreamPosition | None,
        limit: int,
        reverse: bool,
    ) -> HistoryPage:
        if since is not None and reverse and since.offset == 0:
            raise ClientError(codes.BAD_REQUEST, "reverse history needs since.offset above 0")
        try:
            fresh = opts.persist and channel not in self._restored
            if opts.persist:
                await self._restore(channel)
            page = await self.broker.history(channel, since=since, limit=limit, reverse=reverse)
            if opts.persist and not page.position.offset:
                known = self._restored.get(channel)
                # The broker has no offsets: it lost the stream (see _restore) if the
                # store had positions, or if the store was empty at an earlier look
                # and the stream's epoch changed since (another node may have
                # published in between). The same empty epoch: nothing happened.
                if known is True or (not fresh and known != page.position.epoch):
                    await self._restore(channel, again=True)
                    if self._restored.get(channel) is True:
                        page = await self.broker.history(
                            channel, since=since, limit=limit, reverse=reverse
                        )
                if channel in self._restored and self._restored[channel] is not True:
                    self._restored[channel] = page.position.epoch
            if not opts.persist or limit == 0:
                return page
            top = page.position
            if since is None:  # the whole stream: the page before (top + 1) when reversed
                since = StreamPosition(top.offset + 1 if reverse else 0, top.epoch)
            elif not since.epoch:
                since = StreamPosition(since.offset, top.epoch)
            elif since.epoch != top.epoch:
                return page
            stored = await self.store.read_since(channel, since=since, limit=limit, reverse=reverse)
            # Publications accepted after the broker read are past this page's own
            # top: a recovery would count them as a gap in the stream.
            stored = [p for p in stored if p.offset <= top.offset]
            # The broker's window is what every node has published; the store
            # lacks, for a moment, what other nodes accepted but have not written
            # yet (each writes behind from its own queue): take both.
            found = {p.offset: p for p in stored}
            # history_ttl is renewed by every publish (it keeps the whole window
            # alive), so the window may hold publications past persist_ttl, which
            # reads never return.
            oldest = (time.time() - opts.persist_ttl) * 1000 if opts.persist_ttl > 0 else 0.0
            for p in page.publications:
                if p.time >= oldest:
                    found.setdefault(p.offset, p)
            pubs = [found[o] for o in sorted(found, reverse=reverse)]
            return HistoryPage(pubs[:limit], top)
        except EngineError as exc:
            log.warning("history of %s failed: %s", channel, exc)
            raise ClientError(codes.INTERNAL) from None

    async def remove_history(self, channel: str, opts: ChannelOptions) -> None:
        """Drop the channel's history (broker and, for persistent namespaces, the store
        and what every other node's store still queues).

        Raises:
            ClientError: 100 when an engine failed, as every other engine call.
        """
        try:
            await self.broker.remove_history(channel)
            if not opts.persist:
                return
            await self.store.remove(channel)
            top = (await self.broker.history(channel, limit=0)).position
        except EngineError as exc:
            log.warning("history remove of %s failed: %s", channel, exc)
            raise ClientError(codes.INTERNAL) from None
        # Other nodes may hold publications of the channel in their stores' write
        # queues: written after the delete above, they would come back. Each drops
        # those up to the stream's position now, not the ones published since.
        await self.control(
            "history_remove",
            channel=channel,
            epoch=top.epoch,
            offset=top.offset,
            node=self.node.uid,
        )

    async def recover(
        self, channel: str, opts: ChannelOptions, since: StreamPosition
    ) -> tuple[list[Publication], StreamPosition, bool]:
        """Publications after ``since``; ``recovered`` only when none is missing.

        An empty epoch means the current one, as in Centrifugo: centrifuge-js
        sends none for a ``since`` position given without one.
        """
        # One more than a recovery may return: enough to tell "too many" from
        # "all of them", never the whole of a long persistent stream.
        page = await self._history(
            channel, opts, since=since, limit=MAX_RECOVERY + 1, reverse=False
        )
        pos = page.position
        pubs = page.publications
        if since.epoch and since.epoch != pos.epoch:
            return [], pos, False
        if since.offset == pos.offset:
            return [], pos, True
        if (
            since.offset < pos.offset
            and len(pubs) <= MAX_RECOVERY
            and pubs
            and pubs[0].offset == since.offset + 1
            and pubs[-1].offset == pos.offset
            # None missing in between: a store read may lack one another node
            # has accepted but not written yet.
            and len(pubs) == pos.offset - since.offset
        ):
            return pubs, pos, True
        return [], pos, False

    async def position(self, channel: str, opts: ChannelOptions) -> StreamPosition:
        page = await self.history(channel, opts, limit=0)
        return page.position

    # ------------------------------------------------------------------ presence

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        try:
            return await self.presence_manager.presence(channel)
        except EngineError as exc:
            log.warning("presence of %s failed: %s", channel, exc)
            raise ClientError(codes.INTERNAL) from None

    async def presence_stats(self, channel: str) -> tuple[int, int]:
        try:
            return await self.presence_manager.presence_stats(channel)
        except EngineError as exc:
            log.warning("presence stats of %s failed: %s", channel, exc)
            raise ClientError(codes.INTERNAL) from None

    async def add_presence(self, sub: Subscription) -> None:
        """Add one subscription's presence entry (after the subscriber's earlier
        presence calls); failures are logged, not raised."""
        channel, info, ttl = sub.channel, sub.info, self.config.client.presence_ttl

        async def add() -> None:
            try:
                await self.presence_manager.add_presence(channel, info, ttl)
            except EngineError as exc:
                log.warning("presence add for %s failed: %s", channel, exc)

        await self.member_op(channel, info.client, add, "presence add")

    async def _presence_forever(self, interval: float) -> None:
        """Refresh this node's presence entries every ``interval`` seconds.

        Up to ``PRESENCE_REFRESH_BATCH`` calls at a time: one after another, a pass
        over tens of thousands of subscriptions took longer than entries live
        (``presence_ttl``), and present subscribers dropped out of presence.
        """
        ttl = self.config.client.presence_ttl
        while True:
            await asyncio.sleep(interval)
            failed: list[BaseException] = []
            batch: list[asyncio.Future[Any]] = []
            for chan_name, chan in list(self.channels.items()):
                for client, sub in list(chan.subs.items()):
                    # Skip one that ended during this pass (the awaits let it): its
                    # entry is removed, and adding it back would keep it presence_ttl.
                    if sub.opts.presence and sub.live and chan.subs.get(client) is sub:
                        batch.append(self._refresh_presence(chan_name, sub.info, ttl, failed))
                    if len(batch) >= PRESENCE_REFRESH_BATCH:
                        await asyncio.wait(batch)
                        batch = []
            if batch:
                await asyncio.wait(batch)
            if failed:
                log.warning("presence refresh failed for %d entries: %s", len(failed), failed[0])

    def _refresh_presence(
        self, channel: str, info: ClientInfo, ttl: float, failed: list[BaseException]
    ) -> asyncio.Future[Any]:
        async def refresh() -> None:
            try:
                await self.presence_manager.add_presence(channel, info, ttl)
            except EngineError as exc:
                failed.append(exc)

        return self.member_op(channel, info.client, refresh, "presence refresh")

    # ------------------------------------------------------------------ control

    async def control(self, kind: str, **fields: Any) -> None:
        """Send a control message to every node (this one included)."""
        if not self._broker_linked():
            # The message would reach the other nodes but not this one (pub/sub keeps
            # nothing for a link that is down), and the caller would be told it went out.
            log.warning("control %s refused: the broker's pub/sub link is down", kind)
            raise ClientError(codes.INTERNAL)
        try:
            await self.broker.publish_control(orjson.dumps({"type": kind, **fields}))
        except EngineError as exc:
            log.warning("control %s failed: %s", kind, exc)
            raise ClientError(codes.INTERNAL) from None

    def node_info(self) -> NodeInfo:
        node = self.node
        node.num_clients = len(self.clients)
        node.num_users = len(self.users)
        node.num_channels = len(self.channels)
        node.num_subs = sum(len(c.subs) for c in self.channels.values())
        node.uptime = int(time.monotonic() - self.started_at)
        status = self.store.status()
        node.extra = {
            "store": {
                "ready": status.ready,
                "queue_depth": status.queue_depth,
                "queue_limit": status.queue_limit,
                "last_write_latency": status.last_write_latency,
            },
            "pid": os.getpid(),
        }
        return node

    def nodes(self) -> list[NodeInfo]:
        """Live nodes of the cluster (this one always first)."""
        now = time.monotonic()
        me = self.node_info()
        others = [
            info
            for uid, (info, seen) in self._nodes.items()
            if uid != me.uid and seen + self.config.server.node_expiry > now
        ]
        return [me, *others]

    async def _heartbeat_forever(self) -> None:
        failing = False  # heartbeats fail while the broker is down: say so once, not per beat
        while True:
            node = self.node_info()
            payload = {
                "uid": node.uid,
                "name": node.name,
                "version": node.version,
                "num_clients": node.num_clients,
                "num_users": node.num_users,
                "num_subs": node.num_subs,
                "num_channels": node.num_channels,
                "uptime": node.uptime,
                "extra": node.extra,
            }
            try:
                await self.broker.publish_control(orjson.dumps({"type": "node", "node": payload}))
            except EngineError as exc:
                if not failing:  # the next beat retries; a Redis outage is logged by the broker
                    failing = True
                    log.warning("node heartbeats failing until the broker is back: %s", exc)
            else:
                if failing:
                    failing = False
                    log.info("node heartbeats sent again")
            now = time.monotonic()
            expiry = self.config.server.node_expiry
            for uid in [u for u, (_, seen) in self._nodes.items() if seen + expiry <= now]:
                del self._nodes[uid]
            await asyncio.sleep(self.config.server.node_heartbeat_interval)

    # ------------------------------------------------------------------ rpc / send

    def _register_builtin_rpc(self) -> None:
        async def echo(client: Client, data: bytes) -> bytes:
            return data

        async def whoami(client: Client, data: bytes) -> bytes:
            return orjson.dumps({"user": client.user, "client": client.id})

        self.rpc_handlers["echo"] = echo
        self.rpc_handlers["whoami"] = whoami

    def on_client_message(self, client: Client, data: bytes) -> None:
        for handler in self.message_handlers:
            try:
                handler(client, data)
            except Exception:
                log.exception("message handler failed")

    # ------------------------------------------------------------------ metrics

    def _register_gauges(self) -> None:
        m = self.metrics
        m.gauge("squall_connections", "Connected clients.", lambda: len(self.clients))
        m.gauge("squall_users", "Distinct connected users.", lambda: len(self.users))
        m.gauge("squall_channels", "Channels with local subscribers.", lambda: len(self.channels))
        m.gauge(
            "squall_subscriptions",
            "Local subscriptions.",
            lambda: sum(len(c.subs) for c in self.channels.values()),
        )
        m.gauge(
            "squall_store_queue_depth",
            "Publications accepted but not yet durable.",
            lambda: self.store.status().queue_depth,
        )
        m.gauge(
            "squall_telemetry_queue_depth",
            "Telemetry points accepted but not yet written.",
            lambda: self.telemetry.status().queue_depth,
        )

    # ------------------------------------------------------------------ shutdown

    def disconnect_all(self, d: codes.Disconnect) -> None:
        """Close every connection, connected or still connecting, with ``d``."""
        for client in [*self.clients.values(), *self.connecting]:
            client.disconnect(d)

    def api_request_started(self) -> None:
        self.api_requests += 1
        self._api_idle.clear()

    def api_request_done(self) -> None:
        self.api_requests -= 1
        if not self.api_requests:
            self._api_idle.set()

    async def wait_api_idle(self) -> None:
        """Wait until no server API request is being answered (callers bound the wait)."""
        await self._api_idle.wait()

    async def wait_drained(self) -> None:
        """Wait until every client has gone after shutdown began (callers bound the wait)."""
        if self.clients:
            await self._drained.wait()


async def _server_subscribe(
    client: Client,
    before: asyncio.Future[Any] | None,
    channel: str,
    data: str | None,
    info: str | None,
) -> None:
    """A server API subscribe, once the one before it for this connection is done."""
    if before is not None and not before.done():
        await asyncio.wait([before])
    if client.connected:  # not a connect that failed meanwhile
        await client.server_subscribe(channel, data=data, info=info)


def _after_server_op(client: Client, action: Callable[..., None], *args: Any) -> None:
    """Run ``action(*args)`` now, or once the server API subscribe still running for
    ``client`` is done: a batch's subscribe then unsubscribe (the memory broker hands
    both over in one loop turn) must not leave the user subscribed."""
    op = client.server_op
    if op is None or op.done():
        action(*args)
    else:
        op.add_done_callback(lambda _: _if_connected(client, action, *args))


def _if_connected(client: Client, action: Callable[..., None], *args: Any) -> None:
    if client.connected:  # not a connect that failed meanwhile
        action(*args)


def _server_op_done(client: Client, op: asyncio.Future[Any]) -> None:
    """Forget a finished server subscribe (nothing waits for it any more)."""
    if client.server_op is op:
        client.server_op = None


async def _after(prev: asyncio.Future[Any] | None, op: Callable[[], Awaitable[Any]]) -> Any:
    """``await op()`` once ``prev`` has finished, however it finished (its own
    task reports its failure)."""
    if prev is not None and not prev.done():
        await asyncio.wait([prev])
    return await op()
